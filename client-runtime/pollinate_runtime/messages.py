"""What travels in Flower messages between Pollinate's server and client apps: one place for
the record names and keys both sides use.

Server -> site, message type:
- `query`: "give me your freshly initialised adapter" (the server holds no model, so the
  first global adapter comes from a site, seeded identically everywhere).
- `train`: the global adapter (full rank) and the round; the site evaluates it on its own
  held-out data, trains, and replies with its adapter (its own rank) and metrics. Evaluating
  the incoming global adapter in the same message saves a second message per round.
- `evaluate`: the final global adapter, evaluated only (after the last round).
"""

from __future__ import annotations

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys.
ROUND = "round"
SITE = "site"
ERROR = "error"  # a site that could not do what was asked says why, under its own name
# In the next message to a site whose last reply the server refused: which round, and why
# ("round 3: NonFiniteValues: ..."), so the site learns it from the server itself.
REFUSED = "refused"

# MetricRecord keys a site reports.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"          # of the global adapter the site received
EVAL_EXAMPLES = "eval-examples"
GENERAL_LOSS = "general-loss"    # on general held-out text: forgetting
ADAPTER_NORM = "adapter-norm"
TRAIN_SECONDS = "train-seconds"
LOAD_SECONDS = "load-seconds"
EVAL_SECONDS = "eval-seconds"
SITE_RANK = "rank"
