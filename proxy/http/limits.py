"""Limits that keep one client from taking the proxy from the others (issue 7).

`LimitsMiddleware`: per-client request and byte rates (token buckets; over them 429 with
`Retry-After`), a timeout on a request body that stops arriving (408, so it does not hold an archive
connection), `Retry-After` on every 503, and a 500 for an unexpected error that CORS still wraps.
The limits the server protocol itself enforces (header size and count, header and send timeouts) are
in protocol.py.
Limits are per worker process; a client is its address, or, behind a trusted proxy, the address that
proxy reports.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Container

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.config import Settings
from proxy.errors import error_response
from proxy.upstream import splice

log = logging.getLogger("dicomweb_edge")
MAX_CLIENTS = 50_000  # buckets kept; beyond it, full (idle) buckets are forgotten
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes are never rate limited
BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})  # their receive() is not wrapped in a body timeout


class ClientStalled(Exception):
    """The client sent nothing of its request body, or read nothing of its response, for `send_timeout` s."""


STALLED = "dicomweb_edge.send_stalled"  # scope key the protocol sets when it cut a client that stopped reading


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


def client_key(scope: Scope, trusted: Container[str]) -> str:
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
        self.trusted = settings.trusted
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
        body_done = scope["method"] in BODILESS
        started = False

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
            # Cheap on purpose (it sees every body write): the send timeout is the protocol's (pause_writing).
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] in (429, 503) and not any(k == b"retry-after" for k, _ in message["headers"]):
                    message["headers"] = [*message["headers"], (b"retry-after", retry_after.encode())]
                await send(message)
                return
            await send(message)
            if byte_bucket is not None:
                byte_bucket.tokens -= splice.body_size(message)  # after: a relay message counts what it moved
            if STALLED in scope:  # the protocol cut the client: stop producing (and release the archive)
                raise ClientStalled()

        try:
            await self.app(scope, receive if body_done else timed_receive, limited)
        except ClientStalled:
            # Everything the request held (the archive connection) was released on the way out. A client
            # that stopped reading was logged by the protocol; mid-response nothing more can be sent.
            if STALLED not in scope:
                log.warning("client sent nothing of its request body for %gs", timeout)
            if not started:
                await error_response(408, f"no request body data for {timeout:g} s",
                                     {"Connection": "close"})(scope, receive, send)
        except Exception:
            if not started:  # answered here, inside CORS, so that a browser can read even this error
                await error_response(500, "internal error")(scope, receive, send)
            raise  # the server logs the traceback

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, seconds: int, what: str) -> None:
        response = error_response(429, f"too many {what} from this client; retry in {seconds} s",
                                  {"Retry-After": str(seconds)})
        await response(scope, receive, send)
