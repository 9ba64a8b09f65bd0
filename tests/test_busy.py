"""When the worker last served a client (proxy/cache/busy.py): every DICOMweb request marks it, at its start in
the edge layer and at its end, also a hit the protocol answers; operations requests do not."""

import time

from proxy.cache import busy
from proxy.http.edge import account


def test_dicomweb_requests_mark_the_worker_busy_and_operations_requests_do_not(monkeypatch):
    monkeypatch.setattr(busy, "_last", time.monotonic() - 100.0)
    account("other", "GET", 200, 0.001, 0.001, 15, 0, {})  # /healthz, /metrics
    assert busy.quiet_for() >= 100.0
    account("frames", "GET", 200, 0.001, 0.001, 524_686, 0, {})  # what the protocol's cache phase calls
    assert busy.quiet_for() < 100.0


async def test_a_routed_request_marks_the_worker_busy_when_it_starts(monkeypatch):
    from proxy.http.edge import EdgeMiddleware

    seen = []

    async def app(scope, receive, send):
        seen.append(busy.quiet_for())  # while the request is being answered
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    monkeypatch.setattr(busy, "_last", time.monotonic() - 100.0)
    scope = {"type": "http", "method": "GET", "path": "/dicomweb/studies", "headers": [], "query_string": b""}
    await EdgeMiddleware(app)(scope, receive, send)
    assert seen and seen[0] < 100.0
