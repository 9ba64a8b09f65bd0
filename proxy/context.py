"""What every handler needs: the settings, the archives, and which of them to ask for a study."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .cache import FrameCache
from .config import Settings
from .locator import Locator
from .searchcache import SearchCache
from .upstream import Archive, UpstreamError
from .urls import DICOMWEB_ROOT


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

    @classmethod
    def from_settings(cls, settings: Settings) -> Context:
        """Archives in priority order (highest first, then configuration order)."""
        ordered = sorted(settings.archives, key=lambda a: -a.priority)
        cache = None
        if settings.cache_dir:
            cache = FrameCache(settings.cache_dir, settings.cache_size_bytes, settings.memory_cache_bytes)
        ctx = cls(settings, [Archive(a) for a in ordered], locator=Locator(settings.locator_ttl),
                  searches=SearchCache(settings.search_cache_ttl), cache=cache)
        for a in ctx.archives:
            # /upstreams/{name}/dicomweb: the same machinery, one archive, its own URL space.
            ctx.single[a.name] = cls(settings, [a], root=f"/upstreams/{a.name}{DICOMWEB_ROOT}",
                                     locator=ctx.locator, searches=SearchCache(settings.search_cache_ttl),
                                     cache=cache)
        return ctx

    def archive(self, name: str) -> Archive | None:
        """The archive with this configured name."""
        return next((a for a in self.archives if a.name == name), None)

    async def archives_for(self, study_uid: str) -> list[Archive]:
        """Archives that hold `study_uid`, in priority order (learned, or probed on a miss)."""
        if len(self.archives) == 1:
            return list(self.archives)
        names = await self.locator.locate(study_uid, self._probe)
        return [a for a in self.archives if a.name in names]

    async def _probe(self, study_uid: str) -> tuple[str, ...]:
        async def holds(archive: Archive) -> bool:
            if not archive.breaker.allow():
                return False
            try:
                async with asyncio.timeout(archive.config.search_deadline):
                    async with archive.open("GET", "/studies", f"StudyInstanceUID={study_uid}&limit=1",
                                            {"Accept": "application/dicom+json"}, service="locate") as resp:
                        body = await resp.read(1 << 20)
                        return resp.status in (200, 206) and body.strip() not in (b"", b"[]")
            except (TimeoutError, UpstreamError):
                return False

        found = await asyncio.gather(*(holds(a) for a in self.archives))
        return tuple(a.name for a, ok in zip(self.archives, found, strict=True) if ok)

    def store_target(self) -> Archive | None:
        """The archive that takes stores: the highest-priority one configured to."""
        return next((a for a in self.archives if a.config.stores), None)

    async def close(self) -> None:
        """Release every archive's connections."""
        for a in self.archives:
            await a.close()
        if self.cache is not None and self.root == DICOMWEB_ROOT:
            self.cache.close()
