"""The composition root: builds and owns every long-lived object of a worker process (archives and their
relay pipes, cache, locator, search cache, shared tier, the sibling channel, when a client was last served,
the pass-through confirmations), starts and stops them with the application, and builds the application.
Only cli.py (and uvicorn, through `app_from_env`) import this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from urllib.parse import urlsplit

from starlette.applications import Starlette

from proxy.auth import access
from proxy.auth.inbound import parse as parse_auth
from proxy.cache import heap
from proxy.cache.entries import checksum_of
from proxy.cache.learning import Learner
from proxy.cache.store import DISK_ERRORS, FrameCache
from proxy.config import SETTINGS_ENV, ArchiveConfig, ConfigError, Settings
from proxy.coordination.flights import Flights
from proxy.coordination.redis_tier import SharedStore
from proxy.coordination.siblings import Siblings
from proxy.dicomweb.context import Context
from proxy.dicomweb.frames import give
from proxy.dicomweb.prefetch import Prefetcher
from proxy.dicomweb.target import DICOMWEB_ROOT
from proxy.federation.locator import Locator
from proxy.federation.searchcache import SearchCache
from proxy.http.app import build_app
from proxy.observability import metrics
from proxy.upstream import healthimaging
from proxy.upstream.archive import Archive
from proxy.upstream.cloud_auth import check_auth
from proxy.upstream.credentials import check_tls
from proxy.upstream.egress import Egress
from proxy.upstream.probes import RUN_DIR_ENV, Probes
from proxy.upstream.splice import Pipes

log = logging.getLogger("dicomweb_edge.cache")
REOPEN_EVERY = 5.0  # seconds between tries to open a cache directory that could not be opened


def check_settings(s: Settings) -> None:
    """What config.validate cannot judge without the code that uses it: the [auth] table (auth.inbound) and
    each archive's own credential and TLS tables (upstream.credentials). ConfigError for the first problem."""
    _validate_auth(s)
    for a in s.archives:
        _validate_outbound(a, urlsplit(a.url).scheme)


def _validate_outbound(a: ArchiveConfig, scheme: str) -> None:
    try:
        if "@" in urlsplit(a.url).netloc:
            raise ValueError(f"archive {a.name!r}: no credentials in the url; use auth = {{ ... }} (they would "
                             "show in logs and rewritten URLs)")
        if a.auth is not None:
            if not isinstance(a.auth, Mapping):
                raise ValueError(f"archive {a.name!r}: auth must be a table")
            check_auth(a.auth, f"archive {a.name!r}")
            if a.auth.get("type") == "aws":
                healthimaging.check(a.auth, urlsplit(a.url).hostname or "", f"archive {a.name!r}")
        if a.tls is not None:
            if not isinstance(a.tls, Mapping):
                raise ValueError(f"archive {a.name!r}: tls must be a table")
            if scheme != "https":
                raise ValueError(f"archive {a.name!r}: tls settings need an https:// url")
            check_tls(a.tls, f"archive {a.name!r}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _validate_auth(s: Settings) -> None:
    for a in s.archives:
        if a.forward_authorization and getattr(a, "auth", None):
            raise ConfigError(f"archive {a.name!r}: forward_authorization and auth exclude each other (the caller's "
                              "token or the proxy's own credential, not both)")
    try:
        parse_auth(s.auth, s.host, forwarding=any(a.forward_authorization for a in s.archives))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_context(settings: Settings) -> Context:
    """Archives in priority order (highest first, then configuration order), the cache (or why it is off),
    the shared tier, and one Context per archive for `/upstreams/{name}/dicomweb`."""
    ordered = sorted(settings.archives, key=lambda a: -a.priority)
    activity, memo, pipes = metrics.Activity(), access.AccessMemo(), Pipes()  # one each a worker
    cache, off = _open_cache(settings, activity) if settings.cache_dir else (None, None)
    shared = None
    if settings.redis_url:
        shared = SharedStore(settings.redis_url, settings.redis_key_prefix, settings.redis_timeout)
    if not settings.bulk_token_key:  # (an app built in-process: the CLI's `serve` made one for its workers)
        settings.bulk_token_key = secrets.token_hex(32)
    token_key = settings.bulk_token_key.encode()
    egress = Egress.from_settings(settings)
    archives = [Archive(a, settings.queue_timeout, pipes, token_key, egress) for a in ordered]
    flights = Flights()
    learner = Learner(flights)
    prefetch = Prefetcher(flights, learner, settings.prefetch_concurrency)
    ctx = Context(settings, archives, locator=Locator(settings.locator_ttl, shared=shared),
                  searches=SearchCache(settings.search_cache_ttl, shared=shared), cache=cache, shared=shared,
                  cache_off=off, flights=flights, learner=learner, prefetch=prefetch,
                  activity=activity, access_memo=memo)
    for a in ctx.archives:
        # /upstreams/{name}/dicomweb: the same machinery, one archive, its own URL space.
        ctx.single[a.name] = Context(settings, [a], root=f"/upstreams/{a.name}{DICOMWEB_ROOT}",
                                     locator=ctx.locator, searches=SearchCache(settings.search_cache_ttl,
                                                                               shared=shared),
                                     cache=cache, shared=shared, flights=flights, learner=learner,
                                     prefetch=prefetch, activity=activity, access_memo=memo)
    return ctx


class Runtime:
    """What runs beside the requests of one worker: the archive health loop, the cache's reopening, the
    sibling channel and hand-over, the shared tier's listener. `start` and `close` bracket the app's life."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        # With several workers the CLI gives them one run directory: one of them probes for all.
        self.probes = Probes(ctx.archives, ctx.settings.health_interval, os.environ.get(RUN_DIR_ENV))
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Probe the archives periodically, warm the heap for the memory tier, open the channel to the
        sibling workers on the same cache directory (or keep trying to open a cache directory that could
        not be), and follow the other processes' stores through the shared tier."""
        ctx = self.ctx
        if self.probes.enabled:
            self._tasks.append(asyncio.ensure_future(self.probes.run()))
        if ctx.cache_off is not None:
            self._tasks.append(asyncio.ensure_future(self._open_when_possible()))
        self._start_cache()
        if ctx.shared is not None:
            self._tasks.append(asyncio.ensure_future(ctx.shared.listen(ctx.stored_elsewhere, ctx.clear_searches)))

    async def _open_when_possible(self) -> None:
        """The cache is off until its directory can be opened (room on a full disk, a writable directory,
        an index that reads): tried every REOPEN_EVERY seconds, without a restart."""
        ctx = self.ctx
        while ctx.cache is None:
            await asyncio.sleep(REOPEN_EVERY)
            cache, off = await asyncio.to_thread(_open_cache, ctx.settings, ctx.activity, False)
            if cache is None:
                ctx.cache_off = off
                continue
            log.warning("cache directory opened: the cache is on again")
            ctx.cache, ctx.cache_off = cache, None
            for single in ctx.single.values():
                single.cache = cache
            self._start_cache()

    def _start_cache(self) -> None:
        ctx, settings = self.ctx, self.ctx.settings
        if ctx.cache is None or not settings.cache_dir:
            return
        heap.warm(min(settings.memory_warm_bytes, settings.memory_cache_bytes))
        if ctx.flights.channel is not None:
            return
        channel = Siblings(settings.cache_dir)
        if "claims" in settings.disable:
            channel.max_claims = 0  # fetches announced, never claimed
        if not channel.start():
            return
        channel.on_want = ctx.cache.writer.want  # a sibling waits for frames this worker holds back
        channel.on_yield = ctx.prefetch.sibling_yield  # a sibling's client retrieves what is prefetched here
        find = None if "handover" in settings.disable else partial(give, ctx)  # frames straight from memory
        ctx.flights.connect(channel, find, checksum_of)

    async def close(self) -> None:
        """Stop what `start` started; release every archive's connections, the shared tier and the cache."""
        ctx = self.ctx
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if ctx.shared is not None:
            await ctx.shared.close()
        for a in ctx.archives:
            await a.close()
        await ctx.prefetch.close()
        await ctx.flights.close()
        ctx.learner.close()
        if ctx.cache is not None:
            ctx.cache.close()
        metrics.TALLY.flush()  # this worker's last requests


def create_app(settings: Settings) -> Starlette:
    """Build the ASGI application for `settings`, with its runtime started and stopped by the lifespan."""
    ctx = build_context(settings)
    runtime = Runtime(ctx)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runtime.start()
        try:
            yield
        finally:
            await runtime.close()

    return build_app(ctx, lifespan)


def app_from_env() -> Starlette:
    """Factory for uvicorn workers: settings arrive serialised in the environment."""
    return create_app(Settings.from_json(os.environ[SETTINGS_ENV]))


def _open_cache(settings: Settings, activity: metrics.Activity,
                loud: bool = True) -> tuple[FrameCache | None, str | None]:
    """The configured cache, its disk writer waiting for the worker's `activity` to quieten, or (None, why)
    when its directory cannot be opened now: a cache is never the reason the edge is down (Context keeps
    trying)."""
    assert settings.cache_dir is not None
    try:
        return FrameCache(settings.cache_dir, settings.cache_size_bytes, settings.memory_cache_bytes,
                          activity=activity), None
    except (*DISK_ERRORS, ValueError) as exc:  # (ValueError: diskcache reading a damaged settings table)
        why = f"the cache directory cannot be opened ({type(exc).__name__}: {exc})"
        if loud:
            log.error("%s: the cache is off until it can be, tried every %g s", why, REOPEN_EVERY)
        return None, why
