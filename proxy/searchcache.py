"""A short-lived cache of merged search results, so paging through a federated result is consistent
and cheap (F-03). Bypassed by `Cache-Control: no-cache`; cleared by every store through the proxy."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any


class SearchCache:
    """Key → value for `ttl` seconds, at most `max_entries` entries (least recently used go first)."""

    def __init__(self, ttl: float = 30.0, max_entries: int = 256) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._items: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def get(self, key: Any) -> Any | None:
        """The value, or None when absent or expired."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: Any, value: Any) -> None:
        """Remember `value` under `key` (a TTL of 0 disables the cache)."""
        if self.ttl <= 0:
            return
        self._items[key] = (time.monotonic() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (a store may have changed any result)."""
        self._items.clear()
