"""A short-lived cache of merged search results, so paging through a federated result is consistent
and cheap (each page is sliced from one merged list). Bypassed by `Cache-Control: no-cache`; cleared
by every store through the proxy.

With a shared tier (Redis, `shared.py`) answers are shared between processes: the local table is asked
first, Redis on a local miss. A store through any process stales every shared answer (a generation
number) and clears every process's local table (an event).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.coordination.redis_tier import SharedStore, digest


@dataclass(frozen=True)
class Codec:
    """How one kind of cached answer becomes bytes for the shared tier, and back."""

    kind: str
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


@dataclass(frozen=True)
class Mark:
    """When a lookup missed: an answer computed after it is stored only if no store came in between."""

    local: int
    shared: int | None
    tier: str = "memory"  # where the value of the lookup was found (or would have been): memory or shared


class SearchCache:
    """Key → value for `ttl` seconds, at most `max_entries` entries (least recently used go first)."""

    def __init__(self, ttl: float = 30.0, max_entries: int = 256, shared: SharedStore | None = None) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.shared = shared
        self.generation = 0  # bumped by clear(): answers computed before a clear are not kept
        self._items: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def _local(self, key: Any) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    def _store(self, key: Any, value: Any, ttl: float) -> None:
        self._items[key] = (time.monotonic() + ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    async def get(self, key: Any, codec: Codec, fresh: bool = False) -> tuple[Any | None, Mark]:
        """(the value or None when absent or expired, the mark to `put` an answer computed now with).

        `fresh` (Cache-Control: no-cache): never a cached value, only the mark.
        """
        found = None if fresh else self._local(key)
        if found is not None or self.shared is None or self.ttl <= 0:
            return found, Mark(self.generation, None)
        mark = self.generation
        blob, shared_gen, left = await self.shared.search_get(self._shared_key(key, codec))
        if blob is not None and not fresh:
            try:
                found = codec.decode(blob)
            except ValueError:
                found = None
            if found is not None and mark == self.generation:
                self._store(key, found, min(left, self.ttl))
        return found, Mark(mark, shared_gen, "shared" if found is not None else "memory")

    async def put(self, key: Any, value: Any, mark: Mark, codec: Codec) -> None:
        """Remember `value` under `key` unless a store came after `mark` (a TTL of 0 disables the cache)."""
        if self.ttl <= 0 or mark.local != self.generation:
            return
        self._store(key, value, self.ttl)
        if self.shared is not None and mark.shared is not None:
            await self.shared.search_put(self._shared_key(key, codec), codec.encode(value), mark.shared, self.ttl)

    @staticmethod
    def _shared_key(key: Any, codec: Codec) -> str:
        return digest(codec.kind + "\0" + "\0".join(map(str, key if isinstance(key, tuple) else (key,))))

    def clear(self) -> None:
        """Forget everything (a store may have changed any result)."""
        self.generation += 1
        self._items.clear()
