"""Limits that keep one client from taking the proxy from the others (issue 7).

`LimitsMiddleware`: per-client request and byte rates (token buckets; over them 429 with
`Retry-After`), a send timeout that cuts a client that stopped reading its response or sending its body
(so it does not hold an archive connection), `Retry-After` on every 503, and a 500 for an unexpected
error that CORS still wraps. `EdgeHttpProtocol`:
uvicorn's httptools protocol with a bound on request header size and count (431) and on the time the
headers may take to arrive (408).
Limits are per worker process; a client is its address, or, behind a trusted proxy, the address that
proxy reports.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .config import Settings
from .responses import error_response

log = logging.getLogger("dicomweb_edge")
MAX_CLIENTS = 50_000  # buckets kept; beyond it, full (idle) buckets are forgotten
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes are never rate limited


class ClientStalled(Exception):
    """The client read nothing of its response, or sent nothing of its body, for `send_timeout` seconds."""


class _SendWatch:
    """nginx's send_timeout: a response is cut when one write to the client has waited `timeout` s.

    One timer per response, armed at the first body write and re-armed only when it fires, instead of a
    timeout around every write (four per cached frame: ~20 µs each on the hot path). A write that has
    waited `timeout` s when the timer fires cancels the request's task; `limited` turns that into
    ClientStalled.
    """

    __slots__ = ("timeout", "since", "fired", "task", "handle")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.since: float | None = None  # loop time the current write started; None between writes
        self.fired = False
        self.task: asyncio.Task[Any] | None = None
        self.handle: asyncio.TimerHandle | None = None

    def sending(self) -> None:
        loop = asyncio.get_running_loop()
        self.since = loop.time()
        if self.handle is None:
            self.task = asyncio.current_task()
            self.handle = loop.call_at(self.since + self.timeout, self._check)

    def sent(self) -> None:
        self.since = None

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        since = self.since
        if since is not None and loop.time() - since >= self.timeout and self.task is not None:
            self.fired = True
            self.handle = None
            self.task.cancel()
            return
        self.handle = loop.call_at((since if since is not None else loop.time()) + self.timeout, self._check)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if self.fired and self.task is not None:
            self.task.uncancel()


class Bucket:
    """A token bucket that may run into debt (bytes are counted after they are sent)."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now

    def refill(self, rate: float, burst: float, now: float) -> float:
        """Tokens after refilling at `rate` up to `burst`."""
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        return self.tokens


class Buckets:
    """One bucket per client key."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, Bucket] = {}

    def get(self, key: str, now: float) -> Bucket:
        """The client's bucket, refilled to now."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_CLIENTS:
                self._prune(now)
            bucket = self._buckets[key] = Bucket(self.burst, now)
        bucket.refill(self.rate, self.burst, now)
        return bucket

    def _prune(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.refill(self.rate, self.burst, now) >= self.burst]:
            del self._buckets[key]

    def wait(self, bucket: Bucket, need: float) -> int:
        """Whole seconds until `bucket` holds `need` tokens."""
        return max(1, math.ceil((need - bucket.tokens) / self.rate))


def client_key(scope: Scope, trusted: frozenset[str]) -> str:
    """The client's address: behind a trusted hop, the nearest untrusted address it forwarded."""
    client = scope.get("client")
    host = client[0] if client else "unknown"
    if host not in trusted:
        return host
    hops: list[str] = []
    for k, v in scope.get("headers", ()):
        if k == b"x-forwarded-for":
            hops += [h.strip() for h in v.decode("latin-1").split(",")]
        elif k == b"forwarded":
            for element in v.decode("latin-1").split(","):
                for pair in element.split(";"):
                    name, _, value = pair.strip().partition("=")
                    if name.lower() == "for":
                        hops.append(value.strip('"').strip("[]"))
    for hop in reversed(hops):
        if hop and hop not in trusted:
            return hop
    return host


class LimitsMiddleware:
    """Rate limits, the send timeout and Retry-After, as plain ASGI."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.trusted = frozenset(settings.trusted_proxies)
        self.requests = Buckets(settings.client_request_rate, settings.client_request_burst) \
            if settings.client_request_rate > 0 else None
        self.bytes = Buckets(settings.client_byte_rate, settings.client_byte_burst) \
            if settings.client_byte_rate > 0 else None
        self.retry_after = str(max(1, math.ceil(settings.queue_timeout)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        byte_bucket = None
        if (self.requests is not None or self.bytes is not None) and scope["path"] not in OPS_PATHS:
            key = client_key(scope, self.trusted)
            now = time.monotonic()
            if self.requests is not None:
                bucket = self.requests.get(key, now)
                if bucket.tokens < 1:
                    await self._refuse(scope, receive, send, self.requests.wait(bucket, 1), "requests")
                    return
                bucket.tokens -= 1
            if self.bytes is not None:
                byte_bucket = self.bytes.get(key, now)
                if byte_bucket.tokens <= 0:
                    await self._refuse(scope, receive, send, self.bytes.wait(byte_bucket, 1), "bytes")
                    return
        timeout = self.settings.send_timeout
        retry_after = self.retry_after
        body_done = started = False
        watch = _SendWatch(timeout)

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # later calls wait for the disconnect, as long as the response lasts
                return await receive()
            try:
                async with asyncio.timeout(timeout):
                    message = await receive()
            except TimeoutError:
                raise ClientStalled() from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def limited(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] in (429, 503) and not any(k == b"retry-after" for k, _ in message["headers"]):
                    message["headers"] = [*message["headers"], (b"retry-after", retry_after.encode())]
                await send(message)
                return
            if byte_bucket is not None:
                byte_bucket.tokens -= len(message.get("body", b""))
            watch.sending()
            try:
                await send(message)
            except asyncio.CancelledError:
                if watch.fired:
                    raise ClientStalled() from None
                raise
            finally:
                watch.sent()

        try:
            await self.app(scope, timed_receive, limited)
        except ClientStalled:
            # Everything the request held (the archive connection, cache handles) was released on the way
            # out. Mid-response, returning without the end of the body makes the server close the connection.
            if started:
                log.warning("client read nothing for %gs: response cut", timeout)
            else:
                log.warning("client sent nothing of its request body for %gs", timeout)
                await error_response(408, f"no request body data for {timeout:g} s",
                                     {"Connection": "close"})(scope, receive, send)
        except Exception:
            if not started:  # answered here, inside CORS, so that a browser can read even this error
                await error_response(500, "internal error")(scope, receive, send)
            raise  # the server logs the traceback
        finally:
            watch.close()

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, seconds: int, what: str) -> None:
        response = error_response(429, f"too many {what} from this client; retry in {seconds} s",
                                  {"Retry-After": str(seconds)})
        await response(scope, receive, send)


@functools.cache
def _protocol_limits() -> tuple[int, int, float]:
    """(max header bytes, max header count, header timeout) of the settings the server runs with."""
    from .app import SETTINGS_ENV

    raw: dict[str, Any] = json.loads(os.environ.get(SETTINGS_ENV, "{}"))
    d = Settings()
    return (int(raw.get("max_header_bytes", d.max_header_bytes)), int(raw.get("max_header_count", d.max_header_count)),
            float(raw.get("header_timeout", d.header_timeout)))


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing oversized header blocks (431) and slow ones (408).

    Without this, httptools accepts headers of any size and a client may take forever to send them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_bytes, self._max_count, self._header_timeout = _protocol_limits()
        self._head_bytes = 0
        self._refused: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._send_status(408, "the request headers took too long")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if len(self.headers) >= self._max_count:
            self._refused = (431, "too many request headers")
            raise ValueError("too many request headers")
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self._max_bytes:
            self._refused = (431, "request headers too large")
            raise ValueError("request headers too large")

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refused is not None:
            self._send_status(*self._refused)
        else:
            super().send_400_response(msg)

    def _send_status(self, status: int, msg: str) -> None:
        body = json.dumps({"status": status, "reason": msg}).encode()
        head = [STATUS_LINE[status], b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
