"""Which archives hold which study: learned from searches and stores, probed on a miss, expiring.

UIDs are global (design invariants): a study is looked for by its StudyInstanceUID, whatever archive
it came from. Entries expire so a moved or deleted study is looked for again; the table is bounded.
With a shared tier (Redis, `shared.py`), what is learned is shared too, and a local miss asks it
before probing the archives; the local table stays in front.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping

from proxy.coordination.redis_tier import SharedStore, digest

# What asking the archives about a study found: (the archives that hold it, those that could not say:
# unreachable, too slow, failing or open-circuited).
Probe = Callable[[str], Awaitable[tuple[tuple[str, ...], tuple[str, ...]]]]


class Locator:
    """StudyInstanceUID → archive names, in memory, with a TTL and an LRU bound."""

    def __init__(self, ttl: float = 3600.0, max_entries: int = 200_000, shared: SharedStore | None = None) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.shared = shared
        # With a shared tier, keys are digests: the other processes' events name studies that way.
        self._key: Callable[[str], str] = str
        if shared is not None:  # (a statement: mypy < 1.13 types `digest if ... else str` as object)
            self._key = digest
        self._table: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()
        self._probes: dict[str, asyncio.Future[tuple[str, ...]]] = {}
        self.probes = 0  # how many times a miss had to ask the archives

    def learn(self, study: str, archives: Iterable[str], replace: bool = False) -> None:
        """Remember, in this process, that `archives` hold `study` (added to what is known unless `replace`)."""
        self._set(self._key(study), tuple(archives), self.ttl, replace)

    def _set(self, key: str, names: tuple[str, ...], ttl: float, replace: bool) -> None:
        now = time.monotonic()
        entry = self._table.get(key)
        if not replace and entry is not None and entry[0] > now:
            names = tuple(dict.fromkeys((*entry[1], *names)))
        self._table[key] = (now + ttl, names)
        self._table.move_to_end(key)
        while len(self._table) > self.max_entries:
            self._table.popitem(last=False)

    async def share(self, found: Mapping[str, Iterable[str]], replace: bool = False) -> None:
        """Learn several studies' archives here and in the shared tier (one round trip)."""
        names = {study: tuple(archives) for study, archives in found.items()}
        for study, archives in names.items():
            self.learn(study, archives, replace)
        if self.shared is not None:
            await self.shared.remember(names, self.ttl, replace)

    def stored_elsewhere(self, found: Mapping[str, str]) -> None:
        """Another process stored studies (digest → archive): extend what this one knows about them."""
        now = time.monotonic()
        for key, archive in found.items():
            entry = self._table.get(key)
            if entry is not None and entry[0] > now and archive not in entry[1]:
                self._table[key] = (entry[0], (*entry[1], archive))

    async def forget(self, study: str) -> None:
        """Drop what is known about `study` (its archives answered 404), here and in the shared tier."""
        self._table.pop(self._key(study), None)
        if self.shared is not None:
            await self.shared.forget(study)

    def known(self, study: str) -> tuple[str, ...] | None:
        """The archives believed to hold `study`, or None when unknown or expired."""
        entry = self._table.get(self._key(study))
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    async def locate(self, study: str, probe: Probe) -> tuple[str, ...]:
        """Known archives, or ask the shared tier, or ask the archives (one lookup per study at a time).
        When no archive that answered holds the study, the ones that could not answer are all there is to
        try (not remembered): empty only when every archive said it does not hold the study."""
        found = self.known(study)
        if found is not None:
            return found
        pending = self._probes.get(study)
        if pending is None:
            pending = asyncio.ensure_future(self._find(study, probe))
            self._probes[study] = pending
            pending.add_done_callback(lambda _: self._probes.pop(study, None))
        return await asyncio.shield(pending)

    async def _find(self, study: str, probe: Probe) -> tuple[str, ...]:
        if self.shared is not None:
            shared = await self.shared.locations(study)
            if shared is not None:
                names, left = shared
                self._set(self._key(study), names, min(left, self.ttl), replace=True)
                return names
        self.probes += 1
        holders, unanswered = await probe(study)
        if not holders:
            return unanswered
        await self.share({study: holders}, replace=True)
        return holders
