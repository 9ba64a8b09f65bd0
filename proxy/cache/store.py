"""The DICOM-aware frame cache: keys that name the bytes, a memory tier and a shared disk tier.

A key is (placed instance, frame number, media type, actual transfer syntax), never a URL, so
`/frames/1,2,3` and `/frames/2` share entries and Accept variants never collide. The placed instance
(placement.py) is the SOP Instance UID with the study and series the archive placed it in and whose
answer it was: the same instance named under another study is another key.
`transfer-syntax=*` is answered from whatever encoding is cached (an index entry remembers which),
an explicit transfer syntax only from an exact match.

Tiers: a bounded in-process LRU (memtier.py), and `diskcache` in the configured directory, size-bounded with
eviction, persistent across restarts and shared by every worker process. Every entry carries its
length and checksum; an entry that does not verify is deleted and treated as a miss. A full or failing
disk turns the disk tier off for writes for WRITE_RETRY seconds at a time (a purge turns them on at
once), never the proxy off; a directory that cannot be opened at all leaves the cache off until it can
be (context.py). What a store invalidates and what an operator purges: purges.py; the metadata documents
and prefetch claims kept in the same disk tier: documents.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import diskcache

from proxy.cache.entries import HEADER, FlatDisk, Pieces, checksum_of, head, unpack
from proxy.cache.memory import MemoryTier
from proxy.cache.placement import SHARED
from proxy.cache.writer import DiskWriter, FrameToWrite, Item, Written
from proxy.observability import metrics

log = logging.getLogger("dicomweb_edge.cache")
GENERATION = "purge-generation"
TOUCH_EVERY = 5.0  # seconds: disk-tier reads are written back to the LRU order at most this often
T = TypeVar("T")
# ENOSPC arrives as OSError or sqlite3.Error, depending on where it hits; diskcache.Timeout is SQLite's
# lock held by another process (a `cache check`, a purge, a stuck worker) for more than LOCK_TIMEOUT.
DISK_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)
LOCK_TIMEOUT = 5.0  # seconds a disk-tier write waits for SQLite's lock before it is dropped (counted)
WRITE_RETRY = 10.0  # seconds without disk-tier writes after a disk failure (a purge ends them sooner)
# What the metrics show for a configured cache whose directory cannot be opened now (context.py)
OFF_STATS: dict[str, int | bool] = {"disk_entries": 0, "disk_bytes": 0, "disk_limit_bytes": 0, "writable": False}


@dataclass(frozen=True)
class Frame:
    """A cached frame: its bytes and what they are."""

    payload: bytes | memoryview
    media_type: str
    transfer_syntax: str
    checksum: int = -1  # checksum of the payload when known (every cache hit knows it)
    audience: str = SHARED  # whose answer it was (placement.py): '' the proxy's own, else a pass-through archive
    fallback: bool = False  # found for `*` in another encoding than the archive's own (which may come later)

    @property
    def content_type(self) -> str:
        """The part Content-Type, labelled with the actual transfer syntax."""
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"

    @property
    def etag(self) -> str:
        """A strong validator: the bytes' checksum and length."""
        checksum = self.checksum if self.checksum >= 0 else checksum_of(self.payload)
        return f'"{checksum:016x}-{len(self.payload):x}"'


def frame_key(item: str, frame: int, media_type: str, transfer_syntax: str) -> str:
    """The key of one encoding of one frame of the placed instance `item` (`Placement.key`)."""
    return f"frame/{item}/{frame}/{media_type}/{transfer_syntax}"


def index_key(item: str, frame: int, native: bool = True) -> str:
    """Which encoding of the frame is cached, for `transfer-syntax=*`: `native`, the archive's own (what it
    answered to `*`), else another one (a transcoded or decoded copy). A `*` request is answered from the
    archive's own encoding when that is cached, from another only when it is not: the same request gets
    the same bytes, whatever was asked since."""
    return f"frame-{'any' if native else 'other'}/{item}/{frame}"


class FrameCache:
    """Memory LRU in front of a diskcache directory."""

    def __init__(self, directory: str, size_limit: int = 10 * 1024**3, memory_limit: int = 256 * 1024**2,
                 max_entry: int = 64 * 1024**2, activity: metrics.Activity | None = None) -> None:
        # cull_limit=0: no culling inside set(); write() culls itself, so that evictions can be counted.
        settings: dict[str, Any] = {"size_limit": size_limit, "eviction_policy": "least-recently-used",
                                    "tag_index": True, "cull_limit": 0, "disk": FlatDisk, "timeout": LOCK_TIMEOUT}
        for n in range(256):
            os.makedirs(os.path.join(directory, f"{n:02x}"), exist_ok=True)
        self.disk = diskcache.Cache(directory, **settings)
        # Reads go through a second handle that does not write: with the LRU policy diskcache updates an
        # entry's access time inside a write transaction on every get, so readers in one worker queued
        # behind the other worker's writes (SQLite's busy handler sleeps). What was read is written back
        # to the LRU order in batches instead (_touch), by the one writer thread.
        self.reader = diskcache.Cache(directory, **settings)
        self.reader.reset("eviction_policy", "none", update=False)
        # Disk writes, one at a time, in a thread; frames already served from memory wait for a quiet
        # moment (`activity`: the worker's), holding at most half the memory tier's bound more (writer.py).
        self.writer = DiskWriter(self._commit, memory_limit // 2, metrics.Activity() if activity is None else activity)
        self._touched: set[str] = set()
        self._touch_at = time.monotonic()
        self._generation = self._read_generation()
        self._checked = time.monotonic()
        self.memory = MemoryTier(memory_limit)  # (memtier.py)
        self.max_entry = max_entry
        self._writes_off_until = 0.0  # monotonic: a disk failure stops writes until then
        self._reconnect = False  # a disk failure happened: the next write opens its connection anew
        self.failing = False  # the last disk-tier write failed, none succeeded since (the writable gauge)
        metrics.child(metrics.CACHE_EVICTIONS, "disk")  # exported from the start, so that rate() sees the first

    def _read_generation(self) -> int:
        try:
            return int(self.reader.get(GENERATION, 0))
        except Exception:
            return 0

    def _sync_purges(self) -> None:
        """At most once a second: a purge made through another worker clears this memory tier too."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        generation = self._read_generation()
        if generation != self._generation:
            self._generation = generation
            self.writer.drop(None)  # a purge elsewhere: what was deferred here may be what it dropped
            self.memory.clear()
            self._writes_off_until = 0.0  # and it freed space: writes are tried again

    def _get(self, key: str, kind: str = "frame", counted: bool = True,
             memory_only: bool = False, miss_counted: bool = True) -> tuple[bytes, int] | None:
        self._sync_purges()
        found = self.memory.get(key)
        if found is not None:
            if counted:
                metrics.count_hit("memory", kind, len(found[0]))
            return found
        if memory_only:
            return None
        try:
            blob = self.reader.get(key, read=True)
            if blob is not None and not isinstance(blob, bytes):
                with blob as handle:  # a value in a file of its own comes back open: read it into this
                    blob = handle.read()  # worker's memory, where nothing can change it once checked
        except Exception:  # an unreadable cache must not take the proxy down
            log.warning("cache read failed", exc_info=True)
            return None
        if not blob:
            if miss_counted:
                metrics.child(metrics.CACHE_RESULTS, "disk", kind, "miss").inc()
            return None
        payload = unpack(blob, view=True)
        if payload is None:
            log.warning("cache entry failed its length/checksum test and was evicted")
            metrics.child(metrics.CACHE_RESULTS, "disk", kind, "corrupt").inc()
            self.disk.delete(key)
            return None
        if counted:
            metrics.count_hit("disk", kind, len(payload))
        checksum = HEADER.unpack_from(blob)[2]
        self._read_back(key)
        # Checked once: later hits in this worker are its private copy.
        self.memory.remember(key, payload, checksum)
        return payload, checksum

    def _read_back(self, key: str) -> None:
        """Note a disk-tier read for the LRU order; hand the batch to the writer every TOUCH_EVERY s."""
        self._touched.add(key)
        now = time.monotonic()
        if now - self._touch_at >= TOUCH_EVERY:
            self._touch_at = now
            batch, self._touched = self._touched, set()
            self.writer.run(self._touch, batch)

    def _touch(self, keys: set[str]) -> None:
        """Move entries read lately to the young end of the LRU order, in one transaction (writer thread)."""
        try:
            with self.disk.transact():
                for key in keys:  # an LRU get updates the access time; read=True opens a file, reads nothing
                    found = self.disk.get(key, read=True)
                    if found is not None and not isinstance(found, bytes | int | float | str):
                        found.close()
        except Exception:  # the order is a hint; losing a batch costs nothing but precision
            log.debug("cache access times not written back", exc_info=True)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run a blocking disk-tier write in the writer thread (writes never contend with each other)."""
        return self.writer.submit(fn, *args)

    def get(self, item: str, frame: int, media_type: str, transfer_syntax: str,
            count: bool = True, memory_only: bool = False) -> Frame | None:
        """A cached frame in exactly this encoding, or (for `*`) in the archive's own encoding when that is
        cached, else in another cached one (`fallback`: index_key). With `memory_only`, nothing is looked up
        (or counted) beyond this worker's memory tier."""
        if transfer_syntax == "*":
            # Which encoding is cached; not counted: one lookup per frame, the frame's own (or its miss).
            idx = self._get(index_key(item, frame), counted=False, memory_only=memory_only, miss_counted=False)
            fallback = idx is None
            if fallback:
                idx = self._get(index_key(item, frame, False), counted=False, memory_only=memory_only)
            if idx is None:
                return None
            media_type, _, transfer_syntax = bytes(idx[0]).decode().partition(";")
        else:
            fallback = False
        found = self._get(frame_key(item, frame, media_type, transfer_syntax), counted=count, memory_only=memory_only)
        if found is None:
            return None
        return Frame(found[0], media_type, transfer_syntax, found[1], fallback=fallback)

    def on_disk(self, item: str, frame: int, media_type: str, transfer_syntax: str) -> bool:
        """Whether the disk tier holds this frame in this encoding (an index lookup, no file read; blocking).
        False when the disk tier cannot be asked."""
        try:
            return frame_key(item, frame, media_type, transfer_syntax) in self.reader
        except DISK_ERRORS:
            return False

    def memory_hits(self, entries: Sequence[tuple[str, int]]) -> list[bytes | memoryview] | None:
        """The payloads of these memory-tier entries (key, checksum) if every one still holds the bytes
        it held when the cache phase prepared its answer; then they count as hits and become the most
        recent. None if any is gone or replaced."""
        self._sync_purges()
        return self.memory.hits(entries)

    def put(self, item: str, frame: int, media_type: str, transfer_syntax: str, payload: bytes,
            checksum: int | None = None, native: bool = True) -> bool:
        """Make a frame visible in this process at once (`native`: in the archive's own encoding, what it
        answered to `*`); True if it should also go to disk."""
        if len(payload) > self.max_entry:
            return False
        self.memory.remember(frame_key(item, frame, media_type, transfer_syntax), payload, checksum)
        self.memory.remember(index_key(item, frame, native), f"{media_type};{transfer_syntax}".encode())
        return self.writable

    def write(self, item: str, frame: int, media_type: str, transfer_syntax: str, payload: bytes,
              study: str | None = None, checksum: int | None = None, cull: bool = True, native: bool = True) -> bool:
        """Store a frame in the shared disk tier, tagged with its study (blocking: call it off the loop).
        Whether it is there now."""
        if not self.writable:  # (frames queued before a disk failure)
            return False
        key = frame_key(item, frame, media_type, transfer_syntax)
        try:
            self.set_value(key, head(payload, checksum), payload, tag=study)
            index = f"{media_type};{transfer_syntax}".encode()
            self.set_value(index_key(item, frame, native), head(index), index, tag=study)
        except DISK_ERRORS:
            self.disk_failed("frame")
            return False
        self.wrote(len(payload), cull)
        return True

    @property
    def writable(self) -> bool:
        """Whether the disk tier takes writes: not for WRITE_RETRY seconds after a disk failure (a full
        disk), then it tries again; a purge, which frees space, makes it try at once."""
        return time.monotonic() >= self._writes_off_until

    def disk_failed(self, kind: str | None = None) -> None:
        """Disk full or gone: keep serving, stop writing for a while (counted as a failed write of `kind`).
        Called in the `except` of the failure; a lock another process held too long loses this write only."""
        if kind is not None:
            metrics.child(metrics.CACHE_RESULTS, "disk", kind, "write-failed").inc()
        if isinstance(sys.exc_info()[1], diskcache.Timeout):
            log.warning("cache disk locked by another process for %g s: a write was dropped", LOCK_TIMEOUT)
            return
        self._writes_off_until = time.monotonic() + WRITE_RETRY
        self.failing = True
        self._reconnect = True
        log.error("cache disk failed; no cache writes for %g s", WRITE_RETRY, exc_info=True)

    def wrote(self, nbytes: int, cull: bool = True) -> None:
        """A disk-tier write succeeded: counted, the writable gauge back to 1, and (`cull`) the bound kept."""
        metrics.child(metrics.CACHE_BYTES_WRITTEN, "disk").inc(nbytes)
        self.failing = False
        if cull:
            self.cull()

    def write_soon(self, frames: list[FrameToWrite], study: str | None, token: bytes | None = None,
                   defer: bool = False) -> asyncio.Future[Written]:
        """Queue frames for the disk tier; done, with `write`'s paths, once they are on disk. `defer`: this
        worker serves them from memory already, so they wait for a quiet moment unless a sibling worker
        wants `token` (diskwriter.py).

        The writer thread takes whatever is queued when it gets to it, up to a batch of 8 frames, and
        writes it in one transaction: a frame and its index entry were two commits each, and a series
        arriving at 1 GB/s queues faster than one commit per frame goes (measured: 2-3.5 ms -> 0.8-1.4
        ms per 512 KB frame with the flat layout, on this machine's ext4). A sibling worker waiting
        for a prefetched frame sees it when its batch commits: 8 frames a batch instead of 32 cost no
        measurable write throughput and brought a cold viewer's frames in 60-120 ms sooner."""
        return self.writer.write_soon(frames, study, token, defer)

    def write_first(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run a blocking disk-tier write in the writer thread ahead of the frames queued there: a write
        a client's answer waits for (a metadata document) waits for the instance being written at most:
        the batch in progress is committed as far as it got and the rest queued again behind it."""
        return self.writer.write_first(fn, *args)

    def reconnect_after_failure(self) -> None:
        """Before a write (outside a transaction): after a disk failure, this thread's SQLite connection is
        closed and the write opens a new one. SQLite opens a database it cannot write (a filesystem
        remounted read-only) read-only and keeps it so: without this, writes kept failing once the disk
        was writable again, until a restart."""
        if self._reconnect:
            self._reconnect = False
            with contextlib.suppress(*DISK_ERRORS):
                self.disk.close()

    def _commit(self, items: list[Item], interrupted: Callable[[], bool]) -> list[Written]:
        """Writer thread: write items of frames in one transaction, stopping after any item once
        `interrupted()` (a write a client waits for came in); which frames of each item were written."""
        self.reconnect_after_failure()
        results: list[Written] = []
        try:  # a commit that fails leaves no file of the batch behind (entries.py)
            with self.disk.disk.undone_on_failure(), self.disk.transact():
                for i, (frames, study) in enumerate(items):
                    if i and interrupted():
                        break
                    results.append([self.write(item, n, mtype, ts, data, study, checksum, cull=False, native=native)
                                    for item, n, mtype, ts, data, checksum, native in frames])
        except DISK_ERRORS:  # the commit itself failed: nothing of the batch is known to be there
            self.disk_failed("frame")
            results = [[False] * len(frames) for frames, _ in items]
        self.cull()
        return results

    def set_value(self, key: str, *pieces: bytes, expire: float | None = None, tag: str | None = None) -> None:
        """`disk.set` of the value made of `pieces`, without joining (copying) them when it is large.

        diskcache writes a bytes value by iterating a BytesIO over it, which yields *lines*: a 512 KB
        frame of binary pixel data became ~2,000 write() calls (11.5 ms of CPU per frame, measured).
        Handed over as a reader (read=True), a large value is written piece by piece: one write() each.
        """
        with self.disk.disk.undone_on_failure():  # (a file written halfway is not left behind: entries.py)
            if sum(len(p) for p in pieces) >= self.disk.disk_min_file_size:
                self.disk.set(key, Pieces(*pieces), expire=expire, read=True, tag=tag)
            else:
                self.disk.set(key, b"".join(pieces), expire=expire, tag=tag)

    def get_entry(self, key: str, kind: str) -> tuple[bytes, int] | None:
        """Any other cached entry (objects.py builds the keys): (payload, checksum), or None."""
        return self._get(key, kind)

    def put_entry(self, key: str, payload: bytes) -> bool:
        """Make an entry visible in this process at once; True if it should also go to disk."""
        if len(payload) > self.max_entry:
            return False
        self.memory.remember(key, payload)
        return self.writable

    def write_entries(self, entries: list[tuple[str, bytes]], kind: str, study: str) -> None:
        """Store entries in the shared disk tier, tagged `obj:{study}` (blocking: call it off the loop)."""
        self.reconnect_after_failure()
        try:
            for key, payload in entries:
                self.set_value(key, head(payload), payload, tag=f"obj:{study}")
        except DISK_ERRORS:
            self.disk_failed(kind)
            return
        self.wrote(sum(len(p) for _, p in entries))

    def cull(self) -> int:
        """Evict least-recently-used entries until the disk tier is within its size bound (counted)."""
        try:
            if self.disk.volume() <= self.disk.size_limit:
                return 0
            removed = self.disk.cull()
        except DISK_ERRORS:
            return 0
        metrics.child(metrics.CACHE_EVICTIONS, "disk").inc(removed)
        return removed

    def note_purge(self) -> None:
        """Entries went from the disk tier (purges.py; blocking): every worker clears its memory tier within
        a second (the purge generation), and writes are tried again (space was freed)."""
        self.disk.incr(GENERATION, default=0)
        self._generation = self._read_generation()
        self._writes_off_until = 0.0

    def stats(self) -> dict[str, int | bool]:
        """Sizes and counts, for `dicomweb-edge cache stats`, the admin endpoint and the metrics (an index
        that cannot be read counts as empty and not writable: a scrape never fails for it)."""
        try:
            entries = len(self.disk) - (1 if GENERATION in self.disk else 0)
            volume, readable = int(self.disk.volume()), True
        except DISK_ERRORS:
            log.warning("the cache index cannot be read", exc_info=True)
            entries = volume = 0
            readable = False
        try:
            fs = os.statvfs(self.disk.directory)
            free, size = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
        except OSError:
            free = size = 0
        return {"disk_entries": entries, "disk_bytes": volume,
                "disk_limit_bytes": int(self.disk.size_limit), "memory_entries": len(self.memory),
                "memory_bytes": self.memory.bytes, "held_back_bytes": self.writer.held_back_bytes,
                "writable": readable and not self.failing, "filesystem_free_bytes": free,
                "filesystem_size_bytes": size}

    def close(self) -> None:
        """Finish the writes under way and close the disk tier."""
        self.writer.close()
        self.disk.close()
        self.reader.close()

