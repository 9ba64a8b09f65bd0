"""When the worker last served a client (`Activity` in proxy/observability/metrics.py): every DICOMweb request
marks it, at its start in the edge layer and at its end, also a hit the protocol answers; operations requests
do not. One Activity a worker: the one the edge layer marks is the one the cache's disk writer asks."""

import asyncio
import time

from proxy import runtime
from proxy.config import load
from proxy.http.edge import EdgeMiddleware, account
from proxy.observability.metrics import Activity


def test_dicomweb_requests_mark_the_worker_busy_and_operations_requests_do_not():
    activity = Activity()
    activity.last = time.monotonic() - 100.0
    account("other", "GET", 200, 0.001, 0.001, 15, 0, {}, activity=activity)  # /healthz, /metrics
    assert activity.quiet_for() >= 100.0
    account("frames", "GET", 200, 0.001, 0.001, 524_686, 0, {}, activity=activity)  # the protocol's cache phase
    assert activity.quiet_for() < 100.0


async def test_a_routed_request_marks_the_worker_busy_when_it_starts():
    activity = Activity()
    seen = []

    async def app(scope, receive, send):
        seen.append(activity.quiet_for())  # while the request is being answered
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    activity.last = time.monotonic() - 100.0
    scope = {"type": "http", "method": "GET", "path": "/dicomweb/studies", "headers": [], "query_string": b""}
    await EdgeMiddleware(app, activity)(scope, receive, send)
    assert seen and seen[0] < 100.0


def settings_with_cache(directory):
    return load(None, {"archives": [{"name": "a", "url": "http://127.0.0.1:9/dicom-web"}],
                       "cache_dir": str(directory), "health_interval": 0}, environ={})


def test_the_worker_has_one_activity_its_contexts_hold_and_its_cache_asks(tmp_path):
    ctx = runtime.build_context(settings_with_cache(tmp_path / "cache"))
    try:
        assert ctx.cache is not None and ctx.cache.writer.activity is ctx.activity
        assert ctx.single and all(single.activity is ctx.activity for single in ctx.single.values())
    finally:
        ctx.cache.close()


async def test_a_cache_opened_later_asks_the_same_activity(tmp_path, monkeypatch):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory should be")
    ctx = runtime.build_context(settings_with_cache(blocked))
    assert ctx.cache is None and ctx.cache_off is not None
    blocked.unlink()  # the directory can be made now
    monkeypatch.setattr(runtime, "REOPEN_EVERY", 0.01)
    monkeypatch.setattr(runtime.Runtime, "_start_cache", lambda self: None)  # (no sibling channel here)
    async with asyncio.timeout(10):
        await runtime.Runtime(ctx)._open_when_possible()
    try:
        assert ctx.cache is not None and ctx.cache.writer.activity is ctx.activity
    finally:
        ctx.cache.close()
