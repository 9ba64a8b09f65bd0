"""Dropping cached entries from every tier of every worker: a store's invalidation of one study, and the
operator's purge (the admin endpoint, `dicomweb-edge cache purge`).

A worker's memory tier and the frames its disk writer holds back belong to its event loop: they are
dropped there. The disk tier's deletions run in the writer thread (`write_first`: ahead of the queued
frames, and no contention for SQLite's lock), or inline in the CLI, which has no loop. The other workers
see the purge generation go up and clear their memory tiers within a second (cache.py).

On a full disk SQLite cannot journal the deletions: the entries' value files are unlinked first (a
read-only look at diskcache's table), which frees the space, and the eviction runs again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3

import diskcache

from proxy.cache.store import DISK_ERRORS, LOCK_TIMEOUT, FrameCache

log = logging.getLogger("dicomweb_edge.cache")


async def forget_study(cache: FrameCache, study: str) -> None:
    """A store changed the study: drop its cached metadata, and its rendered images, thumbnails, bulk data
    and instances (frames stay: a SOP's pixels do not change)."""
    if await cache.write_first(_forget, cache, study):
        cache.memory.clear()


def purge(cache: FrameCache, study: str | None = None) -> int:
    """Drop one study's entries (or everything); how many went. Blocking, for a process without an event
    loop (the CLI); the app uses `purge_soon`."""
    removed = cache.writer.drop(study) + _purge_disk(cache, study)
    cache.memory.clear()
    return removed


async def purge_soon(cache: FrameCache, study: str | None = None) -> int:
    """`purge` from the event loop."""
    removed = cache.writer.drop(study)  # frames of it not written yet count as entries dropped
    removed += await cache.write_first(_purge_disk, cache, study)
    cache.memory.clear()  # (after the disk: what landed meanwhile goes too)
    return removed


def _forget(cache: FrameCache, study: str) -> int:
    try:
        cache.disk.evict(f"json:{study}")
    except Exception:
        log.warning("could not drop cached metadata", exc_info=True)
    try:
        removed = int(cache.disk.evict(f"obj:{study}"))
        if removed:
            cache.note_purge()
    except Exception:
        log.warning("could not drop cached objects", exc_info=True)
        return 0
    return removed


def _purge_disk(cache: FrameCache, study: str | None) -> int:
    try:
        removed = _evict(cache.disk, study)
    except DISK_ERRORS:  # a full disk: free the files, then again
        log.warning("cache purge on a full disk: the entries' files go first", exc_info=True)
        _unlink_files(cache.disk, study)
        removed = _evict(cache.disk, study)
    cache.note_purge()
    return removed


def _evict(disk: diskcache.Cache, study: str | None) -> int:
    if study is None:
        return _clear(disk.directory)
    return int(disk.evict(study) + disk.evict(f"json:{study}") + disk.evict(f"obj:{study}"))


def _unlink_files(disk: diskcache.Cache, study: str | None) -> None:
    """Delete the value files of a study's entries (every entry's, for None) without writing to the
    database. Their rows go with the eviction that follows; a row whose file is gone reads as a miss."""
    db = os.path.join(disk.directory, diskcache.core.DBNAME)
    query = "SELECT filename FROM Cache WHERE filename IS NOT NULL"
    args: tuple[str, ...] = ()
    if study is not None:
        query += " AND tag IN (?, ?, ?)"
        args = (study, f"json:{study}", f"obj:{study}")
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        names = [name for (name,) in con.execute(query, args)]
    for name in names:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(disk.directory, name))


PURGE_BATCH = 5_000  # rows a transaction of a full purge: SQLite's write lock is let go between batches


def _clear(directory: str) -> int:
    """Every entry, PURGE_BATCH rows a transaction, each batch's value files unlinked once its rows are
    gone. diskcache's own clear() deletes 100 rows a transaction through a select-then-delete loop:
    192 s for a million entries, the worker's writer busy all along (issue 22). diskcache's triggers keep
    its entry count and volume right whatever deletes the rows."""
    db = os.path.join(directory, diskcache.core.DBNAME)
    removed = 0
    with contextlib.closing(sqlite3.connect(db, timeout=LOCK_TIMEOUT, isolation_level=None)) as con:
        while True:
            con.execute("BEGIN IMMEDIATE")
            try:
                names = con.execute("DELETE FROM Cache WHERE rowid IN (SELECT rowid FROM Cache LIMIT ?) "
                                    "RETURNING filename", (PURGE_BATCH,)).fetchall()
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            for (name,) in names:
                if name is not None:
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(directory, name))
            removed += len(names)
            if len(names) < PURGE_BATCH:
                return removed
