"""The memory tier: this worker's least-recently-used entries of the frame cache, bounded in bytes.

An entry is a key of cache.py (a frame in one encoding, the index of which encoding is cached, a small
object) mapped to its payload and checksum. The payload is the bytes themselves (or a read-only view
of the buffer they were received into). An entry larger than a quarter of the bound is not kept. The
worker's memory starts warm (heap.py), so the bytes of a first series do not wait on page faults.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from proxy.cache.entries import checksum_of
from proxy.observability import metrics

Entry = tuple[bytes, int]  # (payload, checksum)


def _cost(payload: bytes) -> int:
    """What an entry counts for in the bound."""
    return len(payload)


class MemoryTier:
    """An LRU of cache entries holding at most `limit` bytes; exported as gauges of all workers."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        metrics.child(metrics.CACHE_EVICTIONS, "memory")  # exported from the start: rate() sees the first

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry | None:
        """The entry, now the most recently used; None if not held."""
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def remember(self, key: str, payload: bytes, checksum: int | None = None) -> None:
        """Hold an entry (replacing the key's old one), evicting the least recently used beyond the bound."""
        cost = _cost(payload)
        if cost > self.limit // 4:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= _cost(old[0])
        if checksum is None:
            assert isinstance(payload, bytes)
            checksum = checksum_of(payload)
        self._entries[key] = (payload, checksum)
        self.bytes += cost
        evicted = 0
        while self.bytes > self.limit:
            _, (dropped, _) = self._entries.popitem(last=False)
            self.bytes -= _cost(dropped)
            evicted += 1
        if evicted:
            metrics.child(metrics.CACHE_EVICTIONS, "memory").inc(evicted)
        self._gauge()

    def hits(self, entries: Sequence[tuple[str, int]]) -> list[bytes | memoryview] | None:
        """The payloads of these entries (key, checksum) if every one still holds the bytes it held when
        its checksum was taken; then they count as hits and become the most recent. None if any is gone,
        or replaced."""
        held = self._entries
        payloads = []
        for key, checksum in entries:
            found = held.get(key)
            if found is None or found[1] != checksum:
                return None
            payloads.append(found[0])
        for (key, _), payload in zip(entries, payloads, strict=True):
            held.move_to_end(key)
            metrics.count_hit("memory", "frame", len(payload))
        return payloads

    def drop(self, key: str) -> None:
        """Forget one entry."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= _cost(old[0])
            self._gauge()

    def clear(self) -> None:
        """Forget everything (a purge)."""
        self._entries.clear()
        self.bytes = 0
        self._gauge()

    def _gauge(self) -> None:
        metrics.TALLY.set(metrics.CACHE_MEMORY_BYTES, self.bytes)
        metrics.TALLY.set(metrics.CACHE_MEMORY_ENTRIES, len(self._entries))
