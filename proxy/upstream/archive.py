"""An archive behind the proxy: its connection pool, timeouts, quirks profile, URL rewriter and breaker.

Health: a consecutive-failure circuit breaker per archive, fed by real traffic and a periodic cheap probe
(upstream/probes.py): closed → (N consecutive failures) → open → (cool-down) → half-open → success: closed /
failure: open. While open, the archive costs a federated search nothing: it is skipped and named in a
Warning.

Everything above this module sees only `Archive.open()` and `UpstreamResponse`; the HTTP client is
`transport.py` (why our own: see there, and the figures in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import unquote, urlsplit

from proxy.config import ArchiveConfig
from proxy.formats.dicomjson import UrlRewriter
from proxy.observability import logs, metrics
from proxy.upstream import cloud_auth, healthimaging, splice
from proxy.upstream import credentials as outbound
from proxy.upstream.egress import Egress
from proxy.upstream.pool import Pool
from proxy.upstream.profiles import PROFILES, Profile
from proxy.upstream.transport import (
    RELAY_WINDOW,
    ConnectTimeout,
    FirstByteTimeout,
    Headers,
    PoolBusy,
    Response,
    TransportError,
)
from proxy.upstream.tunnel import EgressError

_TARGET = re.compile(r"^/[!-~]*$")  # printable ASCII only: no space, CR, LF or anything that splits the request
_HEADER_VALUE = re.compile(r"^[\t -~]*$")


# The inbound Authorization header of the request being served (set by auth.AuthMiddleware). Only an
# archive configured with forward_authorization ever receives it (token pass-through).
CALLER_AUTHORIZATION: ContextVar[str | None] = ContextVar("dicomweb_edge_caller_authorization", default=None)


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


class UpstreamError(Exception):
    """The archive could not be used: `status` is what the proxy answers (502 or 504)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class UnsafeTarget(UpstreamError):
    """A URL or header the proxy refuses to send: it would leave the archive's base URL or split the request."""

    def __init__(self, reason: str) -> None:
        super().__init__(400, reason)


class ArchiveBusy(UpstreamError):
    """Every connection to the archive stayed busy for the queue timeout (503; the archive is not at fault)."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, reason)


class UpstreamResponse:
    """Status, headers and a body read with an idle timeout between pieces."""

    def __init__(self, archive: Archive, resp: Response) -> None:
        self.archive = archive
        self.status = resp.status
        self.headers: Headers = resp.headers
        self._resp = resp
        self.bytes_read = 0

    @property
    def content_type(self) -> str:
        """The raw Content-Type header ('' when absent)."""
        return self.headers.get("Content-Type") or ""

    async def iter_chunks(self) -> AsyncIterator[memoryview]:
        """The body as it arrives; UpstreamError(504) if the archive goes quiet for idle_read s."""
        idle = self.archive.config.timeouts.idle_read
        body = self._resp.iter_body()
        received = metrics.child(metrics.UPSTREAM_BYTES, self.archive.name)
        tally = metrics.TALLY
        resp = self._resp
        while True:
            try:
                if resp.ready():  # the next piece is at hand: no timer to arm and cancel
                    piece = await anext(body, None)
                else:
                    async with asyncio.timeout(idle):
                        piece = await anext(body, None)
            except (TransportError, OSError) as exc:  # (TimeoutError among them)
                raise self._broken(exc, idle) from None
            if piece is None:
                return
            self.bytes_read += len(piece)
            tally.inc(received, len(piece))
            yield piece

    def _broken(self, exc: BaseException, idle: float) -> UpstreamError:
        """What a body read that failed stands for (504 when nothing came for `idle` s, else 502), counted
        against the archive."""
        if isinstance(exc, TimeoutError):
            self.archive.count_error("idle_timeout")
            return UpstreamError(504, f"archive '{self.archive.name}' stalled for {idle:g}s mid-body")
        self.archive.count_error("reset")
        return UpstreamError(502, f"archive '{self.archive.name}' broke off the response ({exc})")

    def relay(self, count: int, pipe: splice.Pipe | None = None) -> splice.Relay | None:
        """The next `count` body bytes as a Relay (splice.py), or None when this connection cannot be read
        past its protocol (TLS, a chunked body) or no pipe is free. The protocol stops reading until the
        relay is done. `pipe`: the one of the relay this one follows (chained in the same message). When
        there is no relay, the connection reads on as usual (no read window, Pool.request)."""
        fd = self._resp.raw_fd()
        owns = pipe is None
        if fd is None or (pipe is None and (pipe := self.archive.pipes.take()) is None):
            self._resp.unwindow()
            return None
        head = self._resp.hold(count)
        self._received(head)
        received = metrics.child(metrics.UPSTREAM_BYTES, self.archive.name)
        relayed = metrics.child(metrics.RELAYED_BYTES, self.archive.name)
        tally = metrics.TALLY
        resp = self._resp

        def account(n: int) -> None:
            self.bytes_read += n
            resp.consumed(n)
            tally.inc(received, n)
            tally.inc(relayed, n)

        relay = splice.Relay(count, head, fd, pipe, self.archive.config.timeouts.idle_read, account, resp.unhold)
        relay.owns = owns
        return relay

    def unwindow(self) -> None:
        """Read the rest of the body as usual: what comes next cannot be relayed (Pool.request `window`)."""
        self._resp.unwindow()

    def can_read_into(self) -> bool:
        """Whether `read_into` may be used now (not for a chunked body, nor while relaying)."""
        return self._resp.can_read_into()

    async def read_into(self, view: memoryview) -> None:
        """Fill `view` with the next body bytes, received straight into it (transport.Response.read_into);
        UpstreamError(504) if the archive goes quiet for idle_read s, 502 if it breaks off."""
        idle = self.archive.config.timeouts.idle_read
        try:
            await self._resp.read_into(view, idle)
        except (TransportError, OSError) as exc:
            raise self._broken(exc, idle) from None
        self._received([view])

    def take_ready(self) -> list[memoryview]:
        """The body bytes already received, without waiting (while relaying: reading is the relay's)."""
        pieces = self._resp.take_ready()
        self._received(pieces)
        return pieces

    def _received(self, pieces: list[memoryview]) -> None:
        """Count body bytes taken from the connection past `iter_chunks` (as it counts its own)."""
        got = sum(len(p) for p in pieces)
        if got:
            self.bytes_read += got
            metrics.TALLY.inc(metrics.child(metrics.UPSTREAM_BYTES, self.archive.name), got)

    def relay_failed(self, reason: str, stalled: bool) -> UpstreamError:
        """The error a relay that the archive broke off stands for (counted like a broken read)."""
        self.archive.count_error("idle_timeout" if stalled else "reset")
        status = 504 if stalled else 502
        return UpstreamError(status, f"archive '{self.archive.name}' broke off the response ({reason})")

    async def read(self, limit: int) -> bytes:
        """The whole body, refusing (502) one larger than `limit` bytes."""
        parts: list[memoryview] = []
        size = 0
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > limit:
                raise UpstreamError(502, f"archive '{self.archive.name}' sent more than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)


class Archive:
    """One configured archive."""

    def __init__(self, config: ArchiveConfig, queue_timeout: float | None = None,
                 pipes: splice.Pipes | None = None, token_key: bytes = b"", egress: Egress | None = None) -> None:
        self.config = config
        self.pipes = splice.Pipes() if pipes is None else pipes  # for relays (the worker's, shared by its archives)
        self.name = config.name
        # Whose answers this archive gives: '' when it is read with the proxy's own credentials (every caller
        # would get the same answer), else its name (token pass-through: each answer is the caller's own).
        self.audience = config.name if config.forward_authorization else ""
        self.base_url = config.url
        self.profile: Profile = PROFILES[config.profile]
        self.rewriter = UrlRewriter(config.name, config.url, config.url_aliases, token_key)  # (b"": its own)
        self.breaker = Breaker(config.breaker_threshold, config.breaker_cooldown)
        self.up: bool | None = None  # what the last health probe found (None: not probed yet)
        self._gauged = False
        u = urlsplit(config.url)
        self._path = u.path.rstrip("/")
        for kind in metrics.UPSTREAM_ERROR_KINDS:  # exported from the start, so that rate() sees the first
            metrics.child(metrics.UPSTREAM_ERRORS, self.name, kind)
        metrics.child(metrics.RELAYED_BYTES, self.name)
        self.egress = (egress or Egress()).for_archive(config.egress)  # (its proxy, the CAs it trusts)
        self._origin = f"{u.scheme}://{u.netloc}"  # what a signed request's URL starts with
        self.credentials = healthimaging.SigV4(config.auth, config.name, u.hostname or "") \
            if config.auth and config.auth.get("type") == "aws" else cloud_auth.credentials(config.auth, config.name,
                                                                                          config.tls, self.egress)
        self.pool = Pool(u.scheme, u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80),
                         max_connections=config.max_connections, queue_timeout=queue_timeout,
                         keepalive=self.profile.keepalive if config.keepalive is None else config.keepalive,
                         ssl_context=self.egress.ssl_context(config.tls) if u.scheme == "https" else None,
                         route=self.egress.route(config.url))

    def count_error(self, kind: str) -> None:
        """Count one failure of this archive by kind (a closed set; see metrics.UPSTREAM_ERRORS)."""
        metrics.child(metrics.UPSTREAM_ERRORS, self.name, kind).inc()

    def report_health(self, ok: bool) -> None:
        """Feed the circuit breaker: the archive answered (True) or failed (unreachable, timed out, 502-504)."""
        before = self.breaker.state
        self.breaker.success() if ok else self.breaker.failure()
        if self.breaker.state != before or not self._gauged:  # a gauge write only when the state changes
            metrics.child(metrics.ARCHIVE_BREAKER, self.name).set(STATE_VALUE[self.breaker.state])
            self._gauged = True

    async def probe(self, timeout: float = 2.0) -> bool:
        """The cheapest search the archive's profile allows (`Profile.probe`): True when it answers it."""
        try:
            async with asyncio.timeout(timeout):
                async with self.open("GET", "/studies", self.profile.probe, {"Accept": "application/dicom+json"},
                                     service="probe") as resp:
                    await resp.read(1 << 20)
                    return resp.status in (200, 204)
        except TimeoutError:
            self.report_health(False)
            return False
        except UpstreamError:
            return False

    async def close(self) -> None:
        """Release pooled connections."""
        await self.pool.close()
        await self.credentials.close()

    def target(self, path: str, query: str = "") -> str:
        """The request target for `path` (relative to the base URL) and `query`, or UnsafeTarget.

        The one check every upstream URL passes (SSRF, issue 7): it stays under the archive's
        configured base URL (no `..` segment, plain or percent-encoded, no encoded slash), and holds
        nothing that could split the request line.
        """
        target = self._path + path + ("?" + query if query else "")
        if not _TARGET.match(target):
            raise UnsafeTarget("the upstream URL would hold a space, a line break or a non-ASCII character")
        route = target.split("?", 1)[0]
        if "/." in route or "%" in route or "\\" in route:
            decoded = unquote(route)
            if "\\" in decoded or decoded.count("/") != route.count("/") or \
                    any(seg in (".", "..") for seg in decoded.split("/")):
                raise UnsafeTarget("the upstream URL would leave the archive's base URL")
        if not route.startswith(self._path + "/"):
            raise UnsafeTarget("the upstream URL would leave the archive's base URL")
        return target

    async def _send(self, method: str, target: str, headers: dict[str, str], body: Any, window: int = 0) -> Response:
        t = self.config.timeouts
        try:
            return await self.pool.request(method, target, headers, body, t.connect, t.first_byte, window)
        except PoolBusy:
            raise ArchiveBusy(f"archive '{self.name}' has all {self.config.max_connections} connections busy; "
                              "try again shortly") from None
        except EgressError as exc:  # the egress proxy is down or refused: named, counted as unreachable
            self.count_error("unreachable")
            raise UpstreamError(502, f"archive '{self.name}': {exc}") from None
        except ConnectTimeout:
            self.count_error("connect_timeout")
            raise UpstreamError(504, f"archive '{self.name}' did not connect within {t.connect:g}s") from None
        except FirstByteTimeout:
            self.count_error("first_byte_timeout")
            raise UpstreamError(504, f"archive '{self.name}' did not answer within {t.first_byte:g}s "
                                     "(first-byte timeout)") from None
        except OSError as exc:
            self.count_error("unreachable")
            raise UpstreamError(502, f"archive '{self.name}' is unreachable ({type(exc).__name__})") from None
        except TransportError as exc:
            self.count_error("protocol")
            raise UpstreamError(502, f"archive '{self.name}' sent an invalid response ({exc})") from None

    @asynccontextmanager
    async def open(self, method: str, path: str, query: str = "", headers: Mapping[str, str] | None = None,
                   body: Any = None, service: str = "other", relay: bool = False) -> AsyncIterator[UpstreamResponse]:
        """Send one request to `base_url + path` and hold its response open for streaming. `relay`: its
        body is to be relayed (splice.py), so the connection reads only the start of it (Pool.request).

        Raises UpstreamError(502) when the archive is unreachable or resets, and (504) when it does
        not connect or answer within its timeouts.
        """
        target = self.target(path, query)
        hdrs = {"Accept-Encoding": "identity", **(headers or {})}
        if self.config.forward_authorization and (caller := CALLER_AUTHORIZATION.get()) is not None:
            hdrs["Authorization"] = caller  # token pass-through: this archive decides what the caller may see
        try:  # the one place credentials join a request: this archive's own, on requests to this archive only
            hdrs.update(await self.credentials.headers(method, self._origin + target, hdrs, body))
        except outbound.CredentialError as exc:
            raise UpstreamError(502, str(exc)) from None
        for k, v in hdrs.items():
            if not _HEADER_VALUE.match(v) or not _HEADER_VALUE.match(k):
                raise UnsafeTarget("a header value holds a line break or a control character")
        started = time.perf_counter()
        status = "error"
        tally = metrics.TALLY  # per-request updates, added up (metrics.Tally)
        in_flight = metrics.child(metrics.UPSTREAM_IN_FLIGHT, self.name)
        tally.inc(in_flight)
        if service != "probe":
            logs.annotate("archive", self.name)
        try:
            try:
                resp = await self._send(method, target, hdrs, body, RELAY_WINDOW if relay else 0)
            except ArchiveBusy:
                raise
            except UpstreamError:
                self.report_health(False)
                raise
            status = str(resp.status)
            if resp.status in self.credentials.refused:
                self.credentials.rejected()  # a revoked or expired token: the next request fetches another
            if resp.status >= 500:
                self.count_error("http_5xx")
            self.report_health(resp.status not in (502, 503, 504))
            tally.observe(metrics.child(metrics.UPSTREAM_TTFB, self.name, service), time.perf_counter() - started)
            try:
                yield UpstreamResponse(self, resp)
            finally:
                resp.release()
        finally:
            tally.inc(in_flight, -1)
            tally.inc(metrics.child(metrics.UPSTREAM_REQUESTS, self.name, service, status))
            tally.observe(metrics.child(metrics.UPSTREAM_DURATION, self.name, service), time.perf_counter() - started)
