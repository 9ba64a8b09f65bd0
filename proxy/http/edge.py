"""The edge layer: every request gets an id, an access record without patient data, and its metrics.

`EdgeMiddleware` does it for requests that go through the ASGI application; the cache phase in the
server protocol (protocol.py), which answers some hits before there is an ASGI request at all, does
the same with `request_id` and `account`, so that both kinds of answer are logged and counted alike.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.dicomweb.target import DICOMWEB_ROOT
from proxy.http.limits import BODILESS
from proxy.observability import logs, metrics
from proxy.observability.metrics import Activity
from proxy.upstream.splice import body_size

log = logs.access
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CODE_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def service_of(method: str, path: str) -> str:
    """The DICOMweb service a request belongs to (a closed set: safe as a metric label)."""
    if path.startswith("/upstreams/"):
        path = "/" + path.split("/", 3)[-1]
    if not path.startswith(DICOMWEB_ROOT + "/"):
        return "other"
    if method == "POST":
        return "stow"
    tail = path.rstrip("/").rsplit("/", 2)
    last = tail[-1]
    if last in ("studies", "series", "instances"):
        return "qido"
    if last in ("metadata", "rendered", "thumbnail"):
        return last
    if last == "pixeldata" or "/bulk/" in path or "/bulkdata" in path:
        return "bulkdata"
    if len(tail) > 1 and tail[-2] == "frames":
        return "frames"
    return "instance"


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id when it is a sane token, else a new random one."""
    for k, v in headers:
        if k == b"x-request-id":
            rid = v.decode("latin-1")
            if _REQUEST_ID.match(rid):
                return rid
            break
    return secrets.token_hex(8)


def account(service: str, method: str, status: int, elapsed: float, ttfb: float | None, sent: int, received: int,
            fields: dict[str, Any], path: str | None = None, *, activity: Activity) -> None:
    """Count a finished request in the metrics and write its access record (`path`, with the query,
    only when `log_patient_data` asks for it); a DICOMweb request marks the worker's `activity`."""
    if service != "other":
        activity.client()
    tally = metrics.TALLY
    tally.inc(metrics.child(metrics.REQUESTS, service, str(status)))
    tally.observe(metrics.child(metrics.REQUEST_DURATION, service, _CODE_CLASS.get(status // 100, "5xx")), elapsed)
    if ttfb is not None:
        tally.observe(metrics.child(metrics.REQUEST_TTFB, service), ttfb)
    tally.inc(metrics.child(metrics.RESPONSE_BYTES, service), sent)
    if received:
        tally.inc(metrics.child(metrics.REQUEST_BYTES, service), received)
    if log.isEnabledFor(logging.INFO):
        # No path, no query (they hold UIDs and patient names) unless debugging asks for them.
        fields.update(service=service, method=method, status=status, bytes_in=received, bytes_out=sent,
                      duration_ms=round(elapsed * 1000, 2), ttfb_ms=None if ttfb is None else round(ttfb * 1000, 2))
        if path is not None:
            fields["path"] = path
        if not logs.write_access(fields):
            log.info("request", extra={"fields": fields})


class EdgeMiddleware:
    """Request id, access log without patient data, and request metrics, as plain ASGI. `activity`: when
    the worker last served a client, marked as each DICOMweb request starts and ends."""

    def __init__(self, app: ASGIApp, activity: Activity, log_patient_data: bool = False) -> None:
        self.app = app
        self.activity = activity
        self.log_patient_data = log_patient_data

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope["headers"])
        scope.setdefault("state", {})["request_id"] = rid
        service = service_of(scope["method"], scope["path"])
        if service != "other":
            self.activity.client()
        fields: dict[str, Any] = {"request_id": rid}
        token = logs.REQUEST.set(fields)
        status = 500
        sent = received = 0
        ttfb = None

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def tracked(message: Message) -> None:
            nonlocal status, sent, ttfb
            if message["type"] == "http.response.start":
                status = message["status"]
                ttfb = time.perf_counter() - started
                for k, v in message.get("headers", ()):
                    if k == b"x-cache":
                        fields["cache"] = v.decode("latin-1").lower()
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                await send(message)
            else:
                await send(message)
                sent += body_size(message)  # after: a relay message counts what it moved

        in_flight = metrics.REQUESTS_IN_FLIGHT
        metrics.TALLY.inc(in_flight)
        try:
            await self.app(scope, receive if scope["method"] in BODILESS else counted, tracked)
        finally:
            metrics.TALLY.inc(in_flight, -1)
            path = None
            if self.log_patient_data:
                qs = scope.get("query_string", b"").decode("latin-1")
                path = scope["path"] + ("?" + qs if qs else "")
            account(service, scope["method"], status, time.perf_counter() - started, ttfb, sent, received, fields,
                    path, activity=self.activity)
            logs.REQUEST.reset(token)
