"""One bounded, reproducible Hypothesis profile for the fuzz tests of external input.

Derandomized and without an example database, so CI runs the same examples every time and
writes nothing into the clone; the example counts keep the whole folder well under a minute
on two cores.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "pollinate-fuzz",
    max_examples=100,
    deadline=2000,  # ms per example: a parser that stalls on some input fails here
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
