"""An archive behind the proxy: its HTTP client, timeouts, quirks profile and URL rewriter.

The transport is aiohttp rather than httpx's default httpcore transport: on this machine httpx reads
512 KB bodies at under half the rate Orthanc serves them (performance-notes.md; our own figures are
in benchmarks/RESULTS.md). Everything above this module sees only `Archive.open()` and
`UpstreamResponse`, so the transport stays one replaceable layer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from . import metrics
from .config import ArchiveConfig
from .dicomjson import UrlRewriter
from .health import STATE_VALUE, Breaker
from .profiles import PROFILES, Profile

READ_BUFSIZE = 1 << 20


async def _connected(session: aiohttp.ClientSession, ctx: Any, params: Any) -> None:
    """Start the first-byte clock once a connection is there (connecting has its own timeout)."""
    if callable(ctx.trace_request_ctx):
        ctx.trace_request_ctx()


def _trace() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(_connected)
    trace.on_connection_reuseconn.append(_connected)
    return trace


class UpstreamError(Exception):
    """The archive could not be used: `status` is what the proxy answers (502 or 504)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class UpstreamResponse:
    """Status, headers and a body read with an idle timeout between chunks."""

    def __init__(self, archive: Archive, resp: aiohttp.ClientResponse) -> None:
        self.archive = archive
        self.status = resp.status
        self.headers = resp.headers
        self._resp = resp
        self.bytes_read = 0

    @property
    def content_type(self) -> str:
        """The raw Content-Type header ('' when absent)."""
        return self.headers.get("Content-Type", "")

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; UpstreamError(504) if the archive goes quiet for idle_read s."""
        content = self._resp.content
        idle = self.archive.config.timeouts.idle_read
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await content.readany()
            except TimeoutError:
                raise UpstreamError(504, f"archive '{self.archive.name}' stalled for {idle:g}s mid-body") from None
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise UpstreamError(502, f"archive '{self.archive.name}' broke off the response "
                                         f"({type(exc).__name__})") from None
            if not chunk:
                return
            self.bytes_read += len(chunk)
            yield chunk

    async def read(self, limit: int) -> bytes:
        """The whole body, refusing (502) one larger than `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > limit:
                raise UpstreamError(502, f"archive '{self.archive.name}' sent more than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)


class Archive:
    """One configured archive."""

    def __init__(self, config: ArchiveConfig) -> None:
        self.config = config
        self.name = config.name
        self.base_url = config.url
        self.profile: Profile = PROFILES[config.profile]
        self.rewriter = UrlRewriter(config.name, config.url, config.url_aliases)
        self.breaker = Breaker(config.breaker_threshold, config.breaker_cooldown)
        self._session: aiohttp.ClientSession | None = None

    def _health(self, ok: bool) -> None:
        self.breaker.success() if ok else self.breaker.failure()
        metrics.ARCHIVE_BREAKER.labels(self.name).set(STATE_VALUE[self.breaker.state])

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            t = self.config.timeouts
            connector = aiohttp.TCPConnector(limit=self.config.max_connections, keepalive_timeout=0.75,
                                             ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, read_bufsize=READ_BUFSIZE,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=t.connect, connect=t.connect),
                skip_auto_headers=("User-Agent", "Accept-Encoding"), raise_for_status=False,
                trace_configs=[_trace()])
        return self._session

    async def probe(self, timeout: float = 2.0) -> bool:
        """A cheap search (one study at most): True when the archive answers it."""
        try:
            async with asyncio.timeout(timeout):
                async with self.open("GET", "/studies", "limit=1", {"Accept": "application/dicom+json"},
                                     service="probe") as resp:
                    await resp.read(1 << 20)
                    return resp.status in (200, 204)
        except TimeoutError:
            self._health(False)
            return False
        except UpstreamError:
            return False

    async def close(self) -> None:
        """Release pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def open(self, method: str, path: str, query: str = "", headers: Mapping[str, str] | None = None,
                   body: Any = None, service: str = "other") -> AsyncIterator[UpstreamResponse]:
        """Send one request to `base_url + path` and hold its response open for streaming.

        Raises UpstreamError(502) when the archive is unreachable or resets, and (504) when it does
        not connect or answer within its timeouts.
        """
        url = self.base_url + path + ("?" + query if query else "")
        hdrs = {"Accept-Encoding": "identity", **(headers or {})}
        t = self.config.timeouts
        started = time.perf_counter()
        status = "error"
        metrics.UPSTREAM_IN_FLIGHT.labels(self.name).inc()
        try:
            try:
                try:
                    async with asyncio.timeout(t.connect + t.first_byte) as deadline:
                        loop = asyncio.get_running_loop()
                        resp = await self._client().request(
                            method, url, headers=hdrs, data=body, allow_redirects=False,
                            trace_request_ctx=lambda: deadline.reschedule(loop.time() + t.first_byte))
                except TimeoutError:
                    raise UpstreamError(504, f"archive '{self.name}' did not answer within "
                                             f"{t.first_byte:g}s") from None
                except aiohttp.ServerTimeoutError:
                    raise UpstreamError(504, f"archive '{self.name}' did not connect within {t.connect:g}s") from None
                except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                        ConnectionError) as exc:
                    raise UpstreamError(502, f"archive '{self.name}' is unreachable ({type(exc).__name__})") from None
                except aiohttp.ClientError as exc:
                    raise UpstreamError(502, f"archive '{self.name}' sent an invalid response "
                                             f"({type(exc).__name__})") from None
            except UpstreamError:
                self._health(False)
                raise
            status = str(resp.status)
            self._health(resp.status not in (502, 503, 504))
            metrics.UPSTREAM_TTFB.labels(self.name, service).observe(time.perf_counter() - started)
            try:
                yield UpstreamResponse(self, resp)
            finally:
                resp.release() if resp.status < 400 else resp.close()
        finally:
            metrics.UPSTREAM_IN_FLIGHT.labels(self.name).dec()
            metrics.UPSTREAM_REQUESTS.labels(self.name, service, status).inc()
            metrics.UPSTREAM_DURATION.labels(self.name, service).observe(time.perf_counter() - started)
