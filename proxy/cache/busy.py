"""When this worker last served a client, for work that can wait for a quiet moment.

Background work, such as writing frames the memory tier already serves to the shared disk tier
(writer.py), competes with the clients being served for the same cores. It asks `quiet_for()` and
waits while clients keep coming. Every DICOMweb request marks the worker busy when it starts and when
it ends; operations requests (health checks, metric scrapes) do not.
"""

from __future__ import annotations

import time


class Activity:
    """When this worker last served a client: one per worker, made by the composition root (runtime.py)
    and given to the edge layer, which marks it, and to the disk writer, which asks it."""

    def __init__(self) -> None:
        self.last = -1e9  # monotonic time a client request last started or ended

    def client(self) -> None:
        """A client request starts or ends now."""
        self.last = time.monotonic()

    def quiet_for(self) -> float:
        """Seconds since a client request last started or ended."""
        return time.monotonic() - self.last
