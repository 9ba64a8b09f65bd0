"""What every handler needs: the settings, the archives, the cache, and which archives to ask for a study.

Built and kept up to date by the composition root (runtime.py); handlers only read it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from proxy.auth.access import AccessMemo
from proxy.cache.learning import Learner
from proxy.cache.store import FrameCache
from proxy.config import Settings
from proxy.coordination.flights import Flights
from proxy.coordination.redis_tier import SharedStore
from proxy.dicomweb.target import DICOMWEB_ROOT
from proxy.federation.locator import Locator
from proxy.federation.searchcache import SearchCache
from proxy.observability.metrics import Activity
from proxy.upstream.archive import Archive, UpstreamError


class Prefetches(Protocol):
    """The worker's prefetches (dicomweb/prefetch.py), as the handlers that start and stop them see them."""

    def schedule(self, ctx: Context, study: str, series: str) -> None: ...

    def yield_to(self, study: str, series: str | None) -> None: ...

    def sibling_yield(self, d: bytes) -> None: ...

    async def close(self) -> None: ...


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
    activity: Activity = field(default_factory=Activity)  # when the worker last served a client (edge.py marks it)
    access_memo: AccessMemo = field(default_factory=AccessMemo)  # pass-through confirmations (access.py), one a worker
    # The worker's, shared by the /upstreams/{name} contexts:
    flights: Flights = field(kw_only=True)  # the fetches in flight (the one way to collapse them)
    learner: Learner = field(kw_only=True)  # what retrieves teach the frame cache
    prefetch: Prefetches = field(kw_only=True)

    def stored_elsewhere(self, studies: dict[str, str]) -> None:
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
