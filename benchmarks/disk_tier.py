"""The disk tier in-process: what a frame costs to write, and to read back in another worker.

    python benchmarks/disk_tier.py [--frames 200] [--size 524288] [--rounds 3]

Writes `frames` frames through FrameCache.write in transactions of 1, 8 and 32 frames (the writer
thread's batches), then reads every frame back with a fresh FrameCache (another worker: nothing in its
memory tier) two ways, interleaved: as the cache does (the file read into the worker's memory, checked
there) and as it did before issue 22 (the file mapped, checked on the mapping: withdrawn, since a mapping
shows whatever the file holds later). CPU ms per frame, medians over the rounds. Appends nothing to
RESULTS.md by itself: the table is printed.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.cache.entries import unpack  # noqa: E402
from proxy.cache.store import FrameCache, checksum_of, frame_key  # noqa: E402
from proxy.formats.part10 import EXPLICIT_LE  # noqa: E402

MEDIA = "application/octet-stream"


def write(directory: str, payloads: list[bytes], batch: int) -> float:
    """CPU seconds per frame to write them all, `batch` frames a transaction."""
    cache = FrameCache(directory)
    started = time.process_time()
    for at in range(0, len(payloads), batch):
        with cache.disk.transact():
            for n in range(at, min(at + batch, len(payloads))):
                p = payloads[n]
                cache.write(f"1.2.{n}", 1, MEDIA, EXPLICIT_LE, p, "1.2", checksum_of(p), cull=False)
    cache.cull()
    cpu = time.process_time() - started
    cache.close()
    return cpu / len(payloads)


def read_by_cache(directory: str, count: int) -> float:
    """CPU seconds per frame for disk-tier hits as the cache makes them (read into memory, checked)."""
    cache = FrameCache(directory)
    started = time.process_time()
    for n in range(count):  # (the memory tier keeps each payload, as it does serving hits)
        if cache.get(f"1.2.{n}", 1, MEDIA, "*") is None:
            raise RuntimeError("a frame is missing")
    cpu = time.process_time() - started
    cache.close()
    return cpu / count


def read_mapped(directory: str, count: int) -> float:
    """CPU seconds per frame mapping each file and checking the mapping (the way withdrawn in issue 22)."""
    cache = FrameCache(directory)
    kept = []  # what the memory tier did with each: keep it
    started = time.process_time()
    for n in range(count):
        index = cache.reader.get(f"frame-any/1.2.{n}/1")
        with cache.reader.get(frame_key(f"1.2.{n}", 1, MEDIA, EXPLICIT_LE), read=True) as handle:
            view = memoryview(mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                        prot=mmap.PROT_READ))
        payload = None if index is None else unpack(view, view=True)  # type: ignore[arg-type]
        if payload is None:
            raise RuntimeError("a frame is missing or corrupt")
        kept.append(payload)
    cpu = time.process_time() - started
    cache.close()
    return cpu / count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--size", type=int, default=512 * 1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    payloads = [os.urandom(args.size) for _ in range(args.frames)]
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for batch in (1, 8, 32):
            work = tempfile.mkdtemp(prefix="dicomweb-edge-disk-")
            try:
                results.setdefault(f"write, {batch} a transaction", []).append(write(work, payloads, batch))
                if batch == 8:
                    results.setdefault("hit from disk, read and checked (the cache)", []).append(
                        read_by_cache(work, args.frames))
                    results.setdefault("hit from disk, mapped (withdrawn)", []).append(read_mapped(work, args.frames))
            finally:
                shutil.rmtree(work, ignore_errors=True)
    print(f"{args.frames} frames of {args.size:,} B, {args.rounds} rounds, CPU ms per frame (median; per round)\n")
    print("| operation | ms per frame | per round |\n|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values) * 1000:.3f} | "
              + ", ".join(f"{v * 1000:.3f}" for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
