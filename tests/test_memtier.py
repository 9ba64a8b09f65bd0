"""The memory tier (memtier.py): an LRU bounded in bytes, whose hits the cache phase trusts only while
each entry still holds the bytes it was prepared with."""

from proxy.cache.entries import checksum_of
from proxy.cache.memory import MemoryTier
from proxy.observability import metrics


def evictions() -> float:
    return metrics.child(metrics.CACHE_EVICTIONS, "memory")._value.get()


def test_the_bound_holds_and_the_least_recently_used_go_first():
    tier = MemoryTier(400)
    before = evictions()
    for key in "abcd":
        tier.remember(key, key.encode() * 100)
    assert tier.bytes == 400 and len(tier) == 4
    assert tier.get("a") is not None  # a is now the most recent: b is the oldest
    tier.remember("e", b"e" * 100)
    assert tier.get("b") is None and all(tier.get(k) is not None for k in "acde")
    assert tier.bytes == 400 and evictions() == before + 1
    assert metrics.CACHE_MEMORY_BYTES._value.get() == 400


def test_an_entry_over_a_quarter_of_the_bound_is_not_kept():
    tier = MemoryTier(400)
    tier.remember("small", b"x" * 100)
    tier.remember("large", b"x" * 101)
    assert tier.get("small") is not None and tier.get("large") is None and tier.bytes == 100


def test_a_replaced_key_counts_once():
    tier = MemoryTier(1000)
    tier.remember("k", b"x" * 200)
    tier.remember("k", b"y" * 100)
    assert tier.bytes == 100 and tier.get("k") == (b"y" * 100, checksum_of(b"y" * 100))
    tier.drop("k")
    assert tier.bytes == 0 and len(tier) == 0


def test_prepared_hits_only_while_the_entries_hold_the_same_bytes():
    tier = MemoryTier(1000)
    tier.remember("a", b"a" * 100)
    tier.remember("b", b"b" * 100)
    prepared = [("a", checksum_of(b"a" * 100)), ("b", checksum_of(b"b" * 100))]
    assert tier.hits(prepared) == [b"a" * 100, b"b" * 100]
    tier.remember("b", b"B" * 100)  # replaced: another encoding, another bytes
    assert tier.hits(prepared) is None
    tier.remember("b", b"b" * 100)
    assert tier.hits(prepared) == [b"a" * 100, b"b" * 100]
    tier.drop("a")
    assert tier.hits(prepared) is None


async def test_on_the_event_loop_the_gauges_are_written_once_per_flush_with_the_latest_figures():
    """Remembering a series frame by frame sets the two gauges each time: on the loop those writes (locked
    mmap writes with several workers) are added up by metrics.TALLY, and a scrape flushes them first."""
    gauge = metrics.CACHE_MEMORY_ENTRIES._value
    metrics.TALLY.flush()
    tier = MemoryTier(10_000)
    writes = []
    original = type(gauge).set

    def counted(self, value):
        writes.append(value)
        return original(self, value)

    type(gauge).set = counted
    try:
        for n in range(50):
            tier.remember(f"frame/{n}", b"x" * 100)
        assert writes == []  # not yet
        metrics.TALLY.flush()  # (what /metrics does first, and the loop every FLUSH_INTERVAL)
        assert gauge.get() == 50 and metrics.CACHE_MEMORY_BYTES._value.get() == 5_000
        assert len(writes) <= 2  # once for each gauge (both share the value class here)
    finally:
        type(gauge).set = original
