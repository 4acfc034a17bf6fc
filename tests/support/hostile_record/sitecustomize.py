"""Imported at the start of every Python process of a hostile site whose PYTHONPATH names this
folder (hostile_site.py sets it for the RECORD_KINDS). In Flower's ClientApp process only, it
replaces the encoder Pollinate's ClientApp sends the adapter with by hostile_site's, which
writes the record itself: what a modified client could send over the real wire."""

import os
import sys

if os.environ.get("POLLINATE_HOSTILE_RECORD") and os.path.basename(sys.argv[0]) == "flwr-clientapp":
    from functools import partial

    import hostile_site
    from pollinate_runtime import client_app

    client_app.to_record = partial(hostile_site.hostile_record, os.environ["POLLINATE_HOSTILE_RECORD"])
