"""Short-lived documents every worker shares through the frame cache's disk tier: WADO-RS metadata
answers (fresh for a TTL, then kept for stale-if-error), and the record of which series were prefetched
recently (by any worker: not again within the TTL). Both are tagged `json:{study}`, so a store to the
study or a purge drops them (purges.py).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence

from proxy.cache.entries import head, unpack
from proxy.cache.store import DISK_ERRORS, FrameCache
from proxy.observability import metrics

_FRESH = struct.Struct("<d")  # a metadata entry starts with the wall-clock time it stays fresh until


def _json_key(url: str, audience: str) -> str:
    return f"json/{audience}|{url}"  # the URL names study and series: the document's placement (placement.py)


def get_json(cache: FrameCache, url: str, heard_by: Sequence[str], stale: bool = False) -> tuple[bytes, str] | None:
    """The cached metadata document of `url` answered for one of the audiences `heard_by` (the first found),
    with that audience. With `stale`, also one past its TTL but within the stale-if-error window (for when
    the archive fails). Serve it only once `access.admit` let the caller have it. Blocking."""
    found = None
    for audience in heard_by:
        try:
            blob = cache.reader.get(_json_key(url, audience))
        except Exception:
            return None
        if blob is not None and len(blob) >= _FRESH.size:
            fresh_until = _FRESH.unpack_from(blob)[0]
            if stale or time.time() < fresh_until:
                body = unpack(blob[_FRESH.size :])
                found = None if body is None else (body, audience)
        if found is not None:
            break
    result = "miss" if found is None else "stale" if stale else "hit"
    metrics.child(metrics.CACHE_RESULTS, "disk", "metadata", result).inc()
    if found is not None:
        metrics.child(metrics.CACHE_SERVED_BYTES, "disk", "metadata").inc(len(found[0]))
    return found


def put_json(cache: FrameCache, url: str, audience: str, body: bytes, study: str, ttl: float,
             stale_if_error: float = 0.0) -> None:
    """Keep the metadata document of `url`, answered for `audience`, fresh for `ttl` seconds and, past that,
    `stale_if_error` seconds more for `get_json(stale=True)`; until a store to its study drops it.
    Blocking (the writer thread's `write_first`)."""
    if ttl <= 0 or not cache.writable:
        return
    cache.reconnect_after_failure()
    try:
        cache.set_value(_json_key(url, audience), _FRESH.pack(time.time() + ttl), head(body), body,
                        expire=ttl + stale_if_error, tag=f"json:{study}")
    except DISK_ERRORS:
        cache.disk_failed("metadata")
        return
    cache.wrote(len(body))


def mark_prefetched(cache: FrameCache, study: str, series: str, ttl: float) -> bool:
    """Record that this worker prefetches a series now: False when some worker prefetched it within `ttl`
    (an atomic insert; who prefetches it *now* is the flight's business, coordination/flights.py).
    Blocking."""
    try:
        return bool(cache.disk.add("prefetched/" + series, 1, expire=ttl, tag=f"json:{study}"))
    except DISK_ERRORS:
        return True  # no shared record: prefetch, as a single worker would


def forget_prefetched(cache: FrameCache, series: str) -> None:
    """The prefetch failed: let the next series metadata request try again. Blocking."""
    try:
        cache.disk.delete("prefetched/" + series)
    except DISK_ERRORS:
        pass
