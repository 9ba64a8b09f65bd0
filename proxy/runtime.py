"""What every handler needs: the settings, the archives, and which of them to ask for a study."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from proxy.cache import heap
from proxy.cache.store import DISK_ERRORS, FrameCache
from proxy.config import Settings
from proxy.coordination import handover, siblings
from proxy.coordination.redis_tier import SharedStore
from proxy.dicomweb.urls import DICOMWEB_ROOT
from proxy.federation.locator import Locator
from proxy.federation.searchcache import SearchCache
from proxy.upstream.archive import Archive, UpstreamError

log = logging.getLogger("dicomweb_edge.cache")
REOPEN_EVERY = 5.0  # seconds between tries to open a cache directory that could not be opened


@dataclass
class Context:
    """Per-process state shared by all requests (or, for /upstreams/{name}, by one archive's)."""

    settings: Settings
    archives: list[Archive] = field(default_factory=list)
    root: str = DICOMWEB_ROOT
    locator: Locator = field(default_factory=Locator)
    searches: SearchCache = field(default_factory=SearchCache)
    single: dict[str, Context] = field(default_factory=dict)
    cache: FrameCache | None = None
    shared: SharedStore | None = None  # the Redis tier, when configured
    cache_off: str | None = None  # why a configured cache is off for now (its directory cannot be opened)
    _listener: asyncio.Task[None] | None = None
    _reopen: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Context:
        """Archives in priority order (highest first, then configuration order)."""
        ordered = sorted(settings.archives, key=lambda a: -a.priority)
        cache, off = _open_cache(settings) if settings.cache_dir else (None, None)
        shared = None
        if settings.redis_url:
            shared = SharedStore(settings.redis_url, settings.redis_key_prefix, settings.redis_timeout)
        archives = [Archive(a, settings.queue_timeout) for a in ordered]
        ctx = cls(settings, archives, locator=Locator(settings.locator_ttl, shared=shared),
                  searches=SearchCache(settings.search_cache_ttl, shared=shared), cache=cache, shared=shared,
                  cache_off=off)
        for a in ctx.archives:
            # /upstreams/{name}/dicomweb: the same machinery, one archive, its own URL space.
            ctx.single[a.name] = cls(settings, [a], root=f"/upstreams/{a.name}{DICOMWEB_ROOT}",
                                     locator=ctx.locator, searches=SearchCache(settings.search_cache_ttl,
                                                                               shared=shared),
                                     cache=cache, shared=shared)
        return ctx

    def start(self) -> None:
        """Warm the heap for the memory tier, open the channel to the sibling workers on the same cache
        directory (or keep trying to open a cache directory that could not be), and follow the other
        processes' stores through the shared tier (from the app's lifespan)."""
        if self.cache_off is not None and self._reopen is None:
            self._reopen = asyncio.ensure_future(self._open_when_possible())
        self._start_cache()
        if self.shared is not None and self._listener is None:
            self._listener = asyncio.ensure_future(self.shared.listen(self._stored_elsewhere, self.clear_searches))

    async def _open_when_possible(self) -> None:
        """The cache is off until its directory can be opened (room on a full disk, a writable directory,
        an index that reads): tried every REOPEN_EVERY seconds, without a restart."""
        while self.cache is None:
            await asyncio.sleep(REOPEN_EVERY)
            cache, off = await asyncio.to_thread(_open_cache, self.settings, False)
            if cache is None:
                self.cache_off = off
                continue
            log.warning("cache directory opened: the cache is on again")
            self.cache, self.cache_off = cache, None
            for single in self.single.values():
                single.cache = cache
            self._start_cache()

    def _start_cache(self) -> None:
        if self.cache is not None and self.settings.cache_dir and self.root == DICOMWEB_ROOT:
            heap.warm(min(self.settings.memory_warm_bytes, self.settings.memory_cache_bytes))
            bus = siblings.start(self.settings.cache_dir, claims="claims" not in self.settings.disable)
            if bus is not None:
                bus.on_want = self.cache.writer.want  # a sibling waits for frames this worker holds back
                from proxy.dicomweb.prefetch import sibling_yield

                bus.on_yield = sibling_yield  # a sibling's client retrieves what is prefetched here
                from proxy.dicomweb.frames import give

                cache = self.cache
                if "handover" not in self.settings.disable:
                    handover.start(bus.name, lambda *ask: give(*ask, cache=cache))  # frames straight from memory

    def _stored_elsewhere(self, studies: dict[str, str]) -> None:
        self.locator.stored_elsewhere(studies)
        self.clear_searches()

    def clear_searches(self) -> None:
        """Drop every cached search answer of this process (a store may have changed any of them)."""
        self.searches.clear()
        for single in self.single.values():
            single.searches.clear()

    def patience(self) -> float:
        """How long a request waits for what another request is fetching: the archives' idle_read (past
        it, the fetch it waits for would have failed)."""
        return max((a.config.timeouts.idle_read for a in self.archives), default=30.0)

    def archive(self, name: str) -> Archive | None:
        """The archive with this configured name."""
        return next((a for a in self.archives if a.name == name), None)

    async def archives_for(self, study_uid: str) -> list[Archive]:
        """Archives that hold `study_uid`, in priority order (learned, or probed on a miss)."""
        if len(self.archives) == 1:
            return list(self.archives)
        names = await self.locator.locate(study_uid, self._probe)
        return [a for a in self.archives if a.name in names]

    async def _probe(self, study_uid: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(archives that hold the study, archives that could not say): a down, slow, failing or
        open-circuited archive may hold it, so its study is not answered 404 (locator.Probe)."""
        async def holds(archive: Archive) -> bool | None:
            if not archive.breaker.allow():
                return None
            try:
                async with asyncio.timeout(archive.config.search_deadline):
                    async with archive.open("GET", "/studies", f"StudyInstanceUID={study_uid}&limit=1",
                                            {"Accept": "application/dicom+json"}, service="locate") as resp:
                        body = await resp.read(1 << 20)
                        if resp.status >= 500:
                            return None
                        return resp.status in (200, 206) and body.strip() not in (b"", b"[]")
            except (TimeoutError, UpstreamError):
                return None

        found = await asyncio.gather(*(holds(a) for a in self.archives))
        pairs = list(zip(self.archives, found, strict=True))
        return tuple(a.name for a, ok in pairs if ok), tuple(a.name for a, ok in pairs if ok is None)

    def store_target(self) -> Archive | None:
        """The archive that takes stores: the highest-priority one configured to."""
        return next((a for a in self.archives if a.config.stores), None)

    async def close(self) -> None:
        """Release every archive's connections (and the shared tier's)."""
        for task in (self._listener, self._reopen):
            if task is not None:
                task.cancel()
        self._listener = self._reopen = None
        if self.shared is not None and self.root == DICOMWEB_ROOT:
            await self.shared.close()
        for a in self.archives:
            await a.close()
        if self.cache is not None and self.root == DICOMWEB_ROOT:
            await handover.stop()
            siblings.stop()
            self.cache.close()


def _open_cache(settings: Settings, loud: bool = True) -> tuple[FrameCache | None, str | None]:
    """The configured cache, or (None, why) when its directory cannot be opened now: a cache is never the
    reason the edge is down (Context keeps trying)."""
    assert settings.cache_dir is not None
    try:
        return FrameCache(settings.cache_dir, settings.cache_size_bytes, settings.memory_cache_bytes,
                          sendfile=settings.cache_sendfile), None
    except (*DISK_ERRORS, ValueError) as exc:  # (ValueError: diskcache reading a damaged settings table)
        why = f"the cache directory cannot be opened ({type(exc).__name__}: {exc})"
        if loud:
            log.error("%s: the cache is off until it can be, tried every %g s", why, REOPEN_EVERY)
        return None, why
