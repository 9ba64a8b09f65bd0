"""The disk tier at 10k, 100k and 1M entries: hit, miss, write and eviction cost, `cache check`, a full purge.

    python benchmarks/disk_scale.py [--sizes 10000,100000,1000000] [--samples 2000]

Fills one FrameCache directory step by step to each size with small entries (2 KB, kept inside SQLite as
metadata documents and index entries are; what a million entries weigh on SQLite is their rows, not
their bytes), then measures at that size, in this process:

- hit: a fresh FrameCache (another worker, nothing in memory) reads `samples` random existing entries;
- miss: the same for keys that are not there;
- write: `samples` new entries, one per transaction (the writer thread's worst case);
- eviction: the size bound set 1 % below the volume, then `cull()`: time per entry evicted;
- check: `dicomweb-edge cache check` (entries.check_live: no write lock), its wall time, and the longest
  wait of a writer trying to commit one entry every 10 ms meanwhile; the same for diskcache's own
  check(), which the command ran before issue 22 (it holds the write lock through its scan);
- after the last size, a full purge: its wall time and the longest wait of that writer.

Wall-clock microseconds or seconds; prints a Markdown table (RESULTS.md takes it with the command).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import diskcache

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.cache import purges  # noqa: E402
from proxy.cache.entries import check_live, head  # noqa: E402
from proxy.cache.store import FrameCache  # noqa: E402

VALUE = os.urandom(2048)
FILL_BATCH = 2000


def key(n: int) -> str:
    return f"json/@bench/{n:09d}"


def fill(cache: FrameCache, start: int, stop: int) -> None:
    for at in range(start, stop, FILL_BATCH):
        with cache.disk.transact():
            for n in range(at, min(stop, at + FILL_BATCH)):
                cache.disk.set(key(n), head(VALUE) + VALUE, tag="json:1.2")


def per_call(fn: Callable[[int], object], args: list[int]) -> float:
    started = time.perf_counter()
    for n in args:
        fn(n)
    return (time.perf_counter() - started) / len(args) * 1e6


def longest_write_wait(directory: str, during: Callable[[], object]) -> tuple[float, float]:
    """(seconds `during` took, the longest a writer committing one entry every 10 ms waited meanwhile)."""
    writer = FrameCache(directory)
    stop = threading.Event()
    waits: list[float] = []

    def write() -> None:
        n = 0
        while not stop.is_set():
            started = time.perf_counter()
            try:
                writer.disk.set(f"json/@probe/{n}", head(VALUE) + VALUE)
            except diskcache.Timeout:  # gave up after LOCK_TIMEOUT: the wait was at least that
                pass
            waits.append(time.perf_counter() - started)
            n += 1
            time.sleep(0.01)

    thread = threading.Thread(target=write)
    thread.start()
    started = time.perf_counter()
    try:
        during()
    finally:
        took = time.perf_counter() - started
        stop.set()
        thread.join()
        writer.close()
    return took, max(waits, default=0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--samples", type=int, default=2000)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    work = tempfile.mkdtemp(prefix="dicomweb-edge-scale-")
    rows = []
    try:
        cache = FrameCache(work, size_limit=1 << 40)
        filled = 0
        for size in sizes:
            fill(cache, filled, size)
            filled = size
            reader = FrameCache(work, size_limit=1 << 40)
            picks = random.sample(range(size), min(args.samples, size))
            hit = per_call(lambda n, r=reader: r.get_entry(key(n), "metadata"), picks)
            miss = per_call(lambda n, r=reader: r.get_entry(key(n + 10**9), "metadata"), picks)
            reader.close()
            extra = list(range(filled, filled + args.samples))
            write = per_call(lambda n: cache.disk.set(key(n), head(VALUE) + VALUE, tag="json:1.2"), extra)
            filled += args.samples
            volume = cache.disk.volume()
            cache.disk.reset("size_limit", int(volume * 0.99))
            before = len(cache.disk)
            started = time.perf_counter()
            evicted = cache.cull()
            cull_us = (time.perf_counter() - started) / max(evicted, 1) * 1e6
            cache.disk.reset("size_limit", 1 << 40)
            assert len(cache.disk) == before - evicted
            check_s, check_wait = longest_write_wait(work, lambda: check_live(work))
            old_s, old_wait = longest_write_wait(work, lambda: cache.disk.check(fix=False))
            rows.append((f"{size:,}", f"{hit:.0f}", f"{miss:.0f}", f"{write:.0f}", f"{cull_us:.0f} ({evicted:,})",
                         f"{check_s:.1f} / {check_wait * 1000:.0f}", f"{old_s:.1f} / {old_wait * 1000:.0f}"))
            print(rows[-1], file=sys.stderr, flush=True)
        purge_s, purge_wait = longest_write_wait(work, lambda: purges.purge(cache))
        cache.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| entries | hit µs | miss µs | write µs | eviction µs per entry (entries) | `cache check`: s / longest "
          "write wait ms | diskcache's check (before issue 22): s / longest write wait ms |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nFull purge of {filled:,} entries: {purge_s:.1f} s; the longest wait of a writer meanwhile: "
          f"{purge_wait * 1000:.0f} ms.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
