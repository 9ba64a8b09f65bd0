"""The circuit breaker's states (issue 3, point 7)."""

import time

from proxy.upstream.archive import CLOSED, HALF_OPEN, OPEN, Breaker


def test_opens_after_consecutive_failures_and_half_opens_after_cooldown(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    b = Breaker(threshold=3, cooldown=10)
    b.failure()
    b.failure()
    b.success()  # a success resets the count
    b.failure()
    b.failure()
    assert b.state == CLOSED and b.allow()
    b.failure()
    assert b.state == OPEN and not b.allow()
    now[0] += 9.9
    assert not b.allow()
    now[0] += 0.2
    assert b.state == HALF_OPEN and b.allow()
    b.failure()  # the trial failed: open again, for a full cool-down
    assert b.state == OPEN
    now[0] += 10
    assert b.allow()
    b.success()
    assert b.state == CLOSED
