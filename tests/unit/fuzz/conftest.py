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
    # No per-example deadline: on a cold machine (numba compiling its kernels) or a loaded
    # one an example may take seconds; a parser that stalls for good hits the test timeout.
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
