"""When this worker last served a client, for work that can wait for a quiet moment.

Background work, such as writing frames the memory tier already serves to the shared disk tier
(diskwriter.py), competes with the clients being served for the same cores. It asks `quiet_for()` and
waits while clients keep coming. Every DICOMweb request marks the worker busy when it starts and when
it ends; operations requests (health checks, metric scrapes) do not.
"""

from __future__ import annotations

import time

_last = -1e9  # monotonic time a client request last started or ended


def client() -> None:
    """A client request starts or ends now."""
    global _last
    _last = time.monotonic()


def quiet_for() -> float:
    """Seconds since a client request last started or ended."""
    return time.monotonic() - _last
