"""How an entry of the shared disk tier lies on disk: a header (magic, length, xxh3-64 checksum) in front
of the payload, one level of 256 directories for values in files of their own, large values written
piece by piece (never joined).

Every read checks the length and checksum before anything is served (cache.py): a truncated, corrupt
or foreign entry is deleted and treated as a miss. A read copies the value into the worker's own memory
and checks that copy: bytes flipped in the file, or the file cut, afterwards change nothing already
checked. (Mapping the file instead saved 0.3 ms of CPU per 512 KB frame on a worker's first read of it,
but a mapping shows whatever the file holds later, and a file cut under it kills the process with
SIGBUS.)
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import diskcache
import xxhash
from diskcache.core import MODE_PICKLE, UNKNOWN

HEADER = struct.Struct("<4sQQ")  # magic, payload length, checksum
MAGIC = b"DWE2"  # DWE1 entries (CRC-32) fail the magic test: evicted and fetched again, once


class UnsafeEntry(ValueError):
    """A row of the cache database the proxy did not write as it stands (pickled): never read."""


class FlatDisk(diskcache.Disk):
    """diskcache's file layout with one level of 256 directories, made once, instead of two levels of
    random directories made as files arrive: on a fresh cache nearly every 512 KB frame paid a mkdir
    (0.25-0.5 ms each on this ext4). Existing entries keep their paths (the database holds them).

    It also knows which value files a block of writes named (`undone_on_failure`), so that a failed write
    leaves none behind: diskcache keeps the file of a value it could not finish writing (ENOSPC halfway),
    and of one whose transaction was rolled back; nothing refers to those files, no eviction removes them,
    and on a full disk they held the space a purge was meant to free.

    And it never unpickles: diskcache pickles what is not bytes, text or a number, and unpickles a row
    whose mode says so, which runs whatever code the pickle names. The proxy stores bytes and numbers
    only, so a pickled key or value in the database is a tampered row: refused (`UnsafeEntry`, a miss for
    the reader), and nothing that would be pickled is stored."""

    def __init__(self, directory: str, **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self._named = threading.local()

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == MODE_PICKLE:
            raise UnsafeEntry("a pickled value in the cache database (refused: unpickling runs code)")
        return super().fetch(mode, filename, value, read)

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise UnsafeEntry("a pickled key in the cache database (refused: unpickling runs code)")
        return super().get(key, raw)

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> Any:
        if not read and not isinstance(value, bytes | str | int | float):
            raise TypeError(f"the cache stores bytes, text and numbers only, not {type(value).__name__}")
        return super().store(value, read, key)

    def filename(self, key: object = UNKNOWN, value: object = UNKNOWN) -> tuple[str, str]:
        name = os.urandom(16).hex()
        filename = os.path.join(name[:2], name[2:] + ".val")
        full_path = os.path.join(self._directory, filename)
        named = getattr(self._named, "files", None)
        if named is not None:
            named.append(full_path)
        return filename, full_path

    @contextlib.contextmanager
    def undone_on_failure(self) -> Iterator[None]:
        """Value files named in this block (by this thread) are removed if the block raises; blocks nest
        (a failed transaction removes the files of the writes inside it that had succeeded)."""
        outer = getattr(self._named, "files", None)
        files: list[str] = []
        self._named.files = files
        try:
            yield
        except BaseException:
            for path in files:
                with contextlib.suppress(OSError):
                    os.remove(path)
            files.clear()
            raise
        finally:
            if outer is not None:
                outer.extend(files)
            self._named.files = outer


def checksum_of(data: bytes | memoryview) -> int:
    """What every entry is checked against (and ETags are made of): xxh3-64, ~12x zlib's CRC-32 here
    (13 vs 156 µs per 512 KB frame), computed once per frame stored and once per disk-tier read."""
    return xxhash.xxh3_64_intdigest(data)



def head(payload: bytes, checksum: int | None = None) -> bytes:
    """The header every disk entry starts with: magic, payload length, checksum."""
    return HEADER.pack(MAGIC, len(payload), checksum_of(payload) if checksum is None else checksum)


class Pieces:
    """A file-like reader over a few buffers, for `disk.set(..., read=True)`: each read returns the next
    buffer as it is, so the value is written without being joined (copied) first."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    def read(self, size: int = -1) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def unpack(blob: bytes, view: bool = False) -> bytes | None:
    """The payload of a disk entry whose length and checksum check, else None (`view`: a memoryview of
    `blob` instead of a copy)."""
    if len(blob) < HEADER.size:
        return None
    magic, length, checksum = HEADER.unpack_from(blob)
    payload = memoryview(blob)[HEADER.size :] if view else blob[HEADER.size :]
    if magic != MAGIC or len(payload) != length or checksum_of(payload) != checksum:
        return None
    return payload  # a memoryview sends, joins and measures as bytes do


def check_live(directory: str, young: float = 60.0) -> list[str]:
    """What is wrong in a disk tier that workers may be writing to, found without SQLite's write lock:
    the database's own check (read-only, `PRAGMA quick_check`), rows whose value file is gone or has
    another size, and value files no row names (what a worker killed in the middle of a write leaves).
    diskcache's check() holds the write lock through its whole scan (17.5 s for a million entries, no
    worker writing meanwhile), so it is kept for `cache check --fix`, which runs with no worker.

    A live tier moves while it is read: a row whose file is missing is reported only if the row is
    still there when looked at again (an eviction removes both), and a file is "unknown" only when it
    is older than `young` seconds (a write creates its file before its row is committed)."""
    db = os.path.join(directory, diskcache.core.DBNAME)
    problems: list[str] = []
    started = time.time()
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
        verdict = [m for (m,) in con.execute("PRAGMA quick_check")]
        if verdict != ["ok"]:
            problems += [f"database: {m}" for m in verdict]
        named = {os.path.join(directory, name): (rowid, size) for rowid, size, name in
                 con.execute("SELECT rowid, size, filename FROM Cache WHERE filename IS NOT NULL")}
        gone: dict[int, str] = {}
        for path, (rowid, size) in named.items():
            try:
                real = os.path.getsize(path)
            except FileNotFoundError:
                gone[rowid] = path
                continue
            if real != size:
                problems.append(f"wrong file size: {path}, {real} != {size}")
        rowids = list(gone)
        for at in range(0, len(rowids), 500):
            batch = rowids[at : at + 500]
            still = con.execute(f"SELECT rowid FROM Cache WHERE rowid IN ({','.join('?' * len(batch))})", batch)
            problems += [f"file not found: {gone[rowid]}" for (rowid,) in still]
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            if name.startswith(diskcache.core.DBNAME) or path in named:
                continue
            with contextlib.suppress(FileNotFoundError):
                if os.path.getmtime(path) < started - young:
                    problems.append(f"unknown file: {path}")
    return problems
