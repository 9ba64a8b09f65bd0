"""Which archives hold which study: learned from searches and stores, probed on a miss, expiring.

UIDs are global (design invariants): a study is looked for by its StudyInstanceUID, whatever archive
it came from. Entries expire so a moved or deleted study is looked for again; the table is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable


class Locator:
    """StudyInstanceUID → archive names, in memory, with a TTL and an LRU bound."""

    def __init__(self, ttl: float = 3600.0, max_entries: int = 200_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._table: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()
        self._probes: dict[str, asyncio.Future[tuple[str, ...]]] = {}
        self.probes = 0  # how many times a miss had to ask the archives

    def learn(self, study: str, archives: Iterable[str], replace: bool = False) -> None:
        """Remember that `archives` hold `study` (added to what is known unless `replace`)."""
        names = tuple(archives)
        if not replace and study in self._table and self._table[study][0] > time.monotonic():
            names = tuple(dict.fromkeys((*self._table[study][1], *names)))
        self._table[study] = (time.monotonic() + self.ttl, names)
        self._table.move_to_end(study)
        while len(self._table) > self.max_entries:
            self._table.popitem(last=False)

    def forget(self, study: str) -> None:
        """Drop what is known about `study` (its archives answered 404)."""
        self._table.pop(study, None)

    def known(self, study: str) -> tuple[str, ...] | None:
        """The archives believed to hold `study`, or None when unknown or expired."""
        entry = self._table.get(study)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    async def locate(self, study: str, probe: Callable[[str], Awaitable[tuple[str, ...]]]) -> tuple[str, ...]:
        """Known archives, or ask them all (one probe per study at a time, shared by waiters)."""
        found = self.known(study)
        if found is not None:
            return found
        pending = self._probes.get(study)
        if pending is None:
            pending = asyncio.ensure_future(probe(study))
            self._probes[study] = pending
            self.probes += 1
            pending.add_done_callback(lambda _: self._probes.pop(study, None))
        names = await asyncio.shield(pending)
        if names:
            self.learn(study, names, replace=True)
        return names
