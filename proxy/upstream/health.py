"""Archive health: a circuit breaker per archive, fed by real traffic and a periodic cheap probe.

closed → (N consecutive failures) → open → (cool-down) → half-open → success: closed / failure: open.
While open, the archive costs a federated search nothing: it is skipped and named in a Warning.
"""

from __future__ import annotations

import time

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class Breaker:
    """Consecutive-failure circuit breaker."""

    def __init__(self, threshold: int = 3, cooldown: float = 10.0) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at = 0.0
        self._state = CLOSED

    @property
    def state(self) -> str:
        """closed, half_open or open (open turns half-open once the cool-down has passed)."""
        if self._state == OPEN and time.monotonic() - self.opened_at >= self.cooldown:
            self._state = HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """Whether to send this archive a request now."""
        return self.state != OPEN

    def success(self) -> None:
        """The archive answered."""
        self.failures = 0
        self._state = CLOSED

    def failure(self) -> None:
        """The archive was unreachable, timed out or answered 502/503/504."""
        self.failures += 1
        if self._state == HALF_OPEN or self.failures >= self.threshold:
            self._state = OPEN
            self.opened_at = time.monotonic()
