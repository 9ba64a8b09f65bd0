"""The disk tier: values round-trip whatever their size (large ones written without copies), batched
writes reach other workers, and reads keep the LRU order without taking the write lock."""

import os
import sqlite3
import time

import pytest

from proxy.cache import documents, purges
from proxy.cache.store import FrameCache
from proxy.formats.part10 import EXPLICIT_LE


def test_frames_metadata_and_objects_of_every_size_come_back_from_disk_as_written(tmp_path):
    cache = FrameCache(str(tmp_path))
    sizes = [0, 10, 32 * 1024 - 17, 32 * 1024, 512 * 1024, 3 * 1024 * 1024 + 5]
    frames = {n: os.urandom(size) for n, size in enumerate(sizes, start=1)}
    for n, payload in frames.items():
        cache.write("1.2.3", n, "application/octet-stream", EXPLICIT_LE, payload, "1.2")
    body = b"[" + b",".join(b'{"00080018":{"vr":"UI","Value":["1.2.%d"]}}' % i for i in range(20000)) + b"]"
    documents.put_json(cache, "meta", "", body, "1.2", ttl=60)
    cache.write_entries([("obj/a", frames[5]), ("obj/b", b"tiny")], "instance", "1.2")
    fresh = FrameCache(str(tmp_path))  # another worker: nothing in memory, everything from disk
    for n, payload in frames.items():
        hit = fresh.get("1.2.3", n, "application/octet-stream", "*")
        assert hit is not None and hit.payload == payload and hit.transfer_syntax == EXPLICIT_LE, n
    assert documents.get_json(fresh, "meta", ("",)) == (body, "")
    assert fresh.get_entry("obj/a", "instance")[0] == frames[5]
    assert fresh.get_entry("obj/b", "instance")[0] == b"tiny"


async def test_batched_writes_reach_another_worker_and_reads_keep_the_lru_order(tmp_path):
    """write_soon batches frames into the writer thread; another worker reads them. Reads take no write
    lock, yet what was read is written back to the LRU order: the bound drops unread frames first."""
    import asyncio

    from proxy.cache.store import checksum_of

    payloads = {n: os.urandom(64 * 1024) for n in range(1, 61)}
    cache = FrameCache(str(tmp_path))
    await asyncio.gather(*(cache.write_soon(
        [("1.2.3", n, "application/octet-stream", EXPLICIT_LE, p, checksum_of(p), True)], "1.2")
        for n, p in payloads.items()))
    other = FrameCache(str(tmp_path))  # another worker: nothing in memory
    for n in range(1, 21):  # the oldest third, read again
        hit = other.get("1.2.3", n, "application/octet-stream", "*")
        assert hit is not None and bytes(hit.payload) == payloads[n]
    other._touch(set(other._touched))  # what its writer thread does every TOUCH_EVERY seconds
    bounded = FrameCache(str(tmp_path), size_limit=int(cache.disk.volume() * 0.6))
    assert bounded.cull() > 0
    kept = {n for n in payloads if bounded.get("1.2.3", n, "application/octet-stream", "*") is not None}
    assert set(range(1, 21)) <= kept and len(kept) < 60, sorted(kept)


def test_cached_objects_come_back_from_another_workers_disk_tier(tmp_path):
    """An instance cached with `transfer-syntax=*` is found through its index entry by a worker that has
    nothing in memory (the soak test caught the index read from disk failing)."""
    from proxy.cache.placement import Placement
    from proxy.dicomweb import objects

    key = objects.Key("instance", "1.2.3.4", "application/dicom", "*", Placement("1.2.3", "1.2.3.1"))
    payload = os.urandom(40 * 1024)
    value = objects._encode(f"application/dicom; transfer-syntax={EXPLICIT_LE}", payload)
    entries = [(key.entry(EXPLICIT_LE), value), (key.index(), EXPLICIT_LE.encode("latin-1"))]
    FrameCache(str(tmp_path)).write_entries(entries, "instance", "1.2.3")
    hit = objects.lookup(FrameCache(str(tmp_path)), key)
    assert hit is not None and bytes(hit.payload) == payload
    assert hit.content_type == f"application/dicom; transfer-syntax={EXPLICIT_LE}"


async def test_a_metadata_document_is_written_ahead_of_the_queued_frames(tmp_path):
    """write_first: a write a client waits for goes before the frames a prefetch queued in the writer
    thread (in another thread it lost SQLite's write lock to batch after batch of them), and an error in
    it reaches the caller."""
    import asyncio
    import threading

    from proxy.cache.store import checksum_of

    cache = FrameCache(str(tmp_path))
    busy, release = threading.Event(), threading.Event()

    def occupy() -> None:  # the writer thread, busy with a batch when the requests arrive
        busy.set()
        release.wait(10)

    held = cache.submit(occupy)
    await asyncio.to_thread(busy.wait, 10)
    order: list[str] = []
    payloads = [os.urandom(64 * 1024) for _ in range(64)]
    frames = [cache.write_soon([("1.2.3", n, "application/octet-stream", EXPLICIT_LE, p, checksum_of(p), True)], "1.2")
              for n, p in enumerate(payloads, start=1)]
    frames[-1].add_done_callback(lambda _: order.append("frames"))
    meta = cache.write_first(documents.put_json, cache, "meta", "", b'[{"x": 1}]', "1.2", 60.0)
    meta.add_done_callback(lambda _: order.append("metadata"))

    def fails() -> None:
        raise OSError("disk gone")

    failing = cache.write_first(fails)
    release.set()
    await asyncio.gather(held, meta, *frames)
    assert order == ["metadata", "frames"]
    assert documents.get_json(FrameCache(str(tmp_path)), "meta", ("",)) == (b'[{"x": 1}]', "")
    try:
        await failing
    except OSError as exc:
        assert "disk gone" in str(exc)
    else:
        raise AssertionError("the error of a write_first job must reach its caller")


async def test_a_metadata_document_waits_for_one_instance_not_the_whole_batch(tmp_path):
    """A write_first queued while the writer is inside a batch of frames goes next: the batch is committed
    as far as it got and the rest is written after it (a cold viewer's metadata waited 13-32 ms behind
    a prefetch's batch of 32 frames). Nothing of the batch is lost or written twice."""
    import asyncio
    import threading

    from proxy.cache.store import checksum_of

    cache = FrameCache(str(tmp_path))
    in_batch, go_on = threading.Event(), threading.Event()
    order: list[str] = []
    write = cache.write

    def slow_write(sop, n, *rest, **kw):  # the writer thread, inside the batch's transaction
        order.append(f"frame {n}")
        if n == 1:
            in_batch.set()
            go_on.wait(10)
        return write(sop, n, *rest, **kw)

    cache.write = slow_write  # type: ignore[method-assign]
    busy, release = threading.Event(), threading.Event()

    def occupy() -> None:  # the writer thread is busy while the 8 instances queue up: one batch of them
        busy.set()
        release.wait(10)

    held = cache.submit(occupy)
    await asyncio.to_thread(busy.wait, 10)
    payloads = {n: os.urandom(64 * 1024) for n in range(1, 9)}
    frames = [cache.write_soon([("1.2.3", n, "application/octet-stream", EXPLICIT_LE, p, checksum_of(p), True)], "1.2")
              for n, p in payloads.items()]
    release.set()
    await held
    await asyncio.to_thread(in_batch.wait, 10)

    def put_metadata() -> None:  # (recorded in the writer thread: a done callback would run later)
        order.append("metadata")
        documents.put_json(cache, "meta", "", b'[{"x": 1}]', "1.2", 60.0)

    meta = cache.write_first(put_metadata)
    go_on.set()
    paths = await asyncio.gather(meta, *frames)
    assert order == ["frame 1", "metadata"] + [f"frame {n}" for n in range(2, 9)], order
    assert [len(p) for p in paths[1:]] == [1] * 8
    other = FrameCache(str(tmp_path))  # everything is on disk, once
    assert documents.get_json(other, "meta", ("",)) == (b'[{"x": 1}]', "")
    for n, p in payloads.items():
        hit = other.get("1.2.3", n, "application/octet-stream", "*")
        assert hit is not None and bytes(hit.payload) == p


def test_disk_tier_hits_are_private_copies_checked_once(tmp_path):
    """A frame another worker wrote is read into this worker's memory and checked there, for length and
    checksum: a truncated or altered file is refused and evicted; bytes flipped in the file, or the file
    cut, after the check change nothing this worker serves; and a payload handed out keeps its bytes when
    the file is evicted (unlinked) under it."""
    from proxy.cache.store import checksum_of, frame_key

    payloads = {n: os.urandom(200 * 1024 + n) for n in range(1, 5)}
    writer = FrameCache(str(tmp_path))
    for n, p in payloads.items():
        writer.write("1.2.3", n, "application/octet-stream", EXPLICIT_LE, p, "1.2", checksum_of(p))
    reader = FrameCache(str(tmp_path))
    hit = reader.get("1.2.3", 1, "application/octet-stream", "*")
    assert hit is not None and bytes(hit.payload) == payloads[1] and hit.checksum == checksum_of(payloads[1])
    with writer.disk.get(frame_key("1.2.3", 1, "application/octet-stream", EXPLICIT_LE), read=True) as f:
        first = f.name
    with open(first, "r+b") as f:  # damaged after the check: this worker's copy is what was checked
        f.seek(-10, os.SEEK_END)
        f.write(b"\xff" * 10)
    again = reader.get("1.2.3", 1, "application/octet-stream", "*")
    assert again is not None and bytes(again.payload) == payloads[1]
    os.truncate(first, 100)
    assert bytes(reader.get("1.2.3", 1, "application/octet-stream", "*").payload) == payloads[1]

    files = {}
    for n in (2, 3):
        with writer.disk.get(frame_key("1.2.3", n, "application/octet-stream", EXPLICIT_LE), read=True) as f:
            files[n] = f.name
    with open(files[2], "r+b") as f:  # truncated: shorter than its header says
        f.truncate(os.path.getsize(files[2]) - 100)
    with open(files[3], "r+b") as f:  # altered: same length, one byte changed
        f.seek(-10, os.SEEK_END)
        byte = f.read(1)
        f.seek(-10, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    fresh = FrameCache(str(tmp_path))
    assert fresh.get("1.2.3", 2, "application/octet-stream", "*") is None
    assert fresh.get("1.2.3", 3, "application/octet-stream", "*") is None
    assert not os.path.exists(files[2]) and not os.path.exists(files[3])  # evicted

    kept = fresh.get("1.2.3", 4, "application/octet-stream", "*")
    assert kept is not None
    assert purges.purge(writer, "1.2") > 0  # the files are unlinked; the payload handed out stays whole
    assert bytes(kept.payload) == payloads[4]


async def test_a_purge_and_a_store_change_this_workers_state_on_its_event_loop_only(tmp_path, monkeypatch):
    """The admin purge and a store's invalidation drop entries from every tier; the memory tier and the
    frames waiting to be written belong to the event loop's thread, so only the disk work leaves it (to
    the writer thread, which holds SQLite's lock anyway)."""
    import asyncio
    import threading

    from proxy.cache.store import checksum_of

    cache = FrameCache(str(tmp_path))
    touched: list[threading.Thread] = []

    def on_the_loop(owner, name):
        original = getattr(owner, name)

        def wrapped(*args):
            touched.append(threading.current_thread())
            return original(*args)
        monkeypatch.setattr(owner, name, wrapped)

    on_the_loop(cache.memory, "clear")
    on_the_loop(cache.writer, "drop")
    payload = os.urandom(64 * 1024)
    cache.write_entries([("obj/r", b"rendered")], "rendered", "1.2")
    cache.put_entry("obj/r", b"rendered")
    documents.put_json(cache, "meta", "", b"[]", "1.2", ttl=60)

    await purges.forget_study(cache, "1.2")  # a store to the study: its objects and metadata go, frames stay
    assert cache.get_entry("obj/r", "rendered") is None and documents.get_json(cache, "meta", ("",)) is None
    assert FrameCache(str(tmp_path)).get_entry("obj/r", "rendered") is None

    cache.write("1.2.3", 1, "application/octet-stream", EXPLICIT_LE, payload, "1.2")
    cache.put("1.2.3", 1, "application/octet-stream", EXPLICIT_LE, payload)
    held = cache.write_soon([("1.2.3", 2, "application/octet-stream", EXPLICIT_LE, payload, checksum_of(payload),
                              True)],
                            "1.2", defer=True)
    assert await purges.purge_soon(cache, "1.2") >= 2  # the frame on disk and the one waiting to be written
    assert await asyncio.wait_for(held, 5) == [None]  # never written
    assert cache.get("1.2.3", 1, "application/octet-stream", "*") is None
    assert FrameCache(str(tmp_path)).get("1.2.3", 2, "application/octet-stream", "*") is None
    assert len(touched) == 3 and all(t is threading.main_thread() for t in touched)
    cache.close()


def test_cache_check_finds_what_a_crash_left_and_fixes_it_only_with_the_proxy_stopped(tmp_path, capsys):
    """A worker killed in the middle of a write leaves a value file no row names (diskcache never removes
    it). `dicomweb-edge cache check` reports it (exit 1); `--fix` removes it, and is refused while a worker
    serves the directory (it would take the files of writes in progress for leftovers)."""
    import json
    import sys

    from proxy import cli
    from proxy.coordination.siblings import Siblings

    payload = os.urandom(200 * 1024)
    cache = FrameCache(str(tmp_path))
    cache.write("1.2.3", 1, "application/octet-stream", EXPLICIT_LE, payload, "1.2")
    cache.close()
    leftover = tmp_path / "ab" / "0123456789abcdef0123456789abcd.val"
    leftover.write_bytes(b"half a frame")
    young = tmp_path / "cd" / "0123456789abcdef0123456789abcd.val"  # a write in progress: not a leftover
    young.write_bytes(b"a frame being written")
    an_hour_ago = time.time() - 3600
    os.utime(leftover, (an_hour_ago, an_hour_ago))
    args = ["cache", "check", "--cache-dir", str(tmp_path)]
    holder = sqlite3.connect(tmp_path / "cache.db", timeout=1)
    holder.execute("BEGIN IMMEDIATE")  # a worker writing: the check needs no write lock (it would wait 60 s)
    try:
        assert cli.main(args) == 1
    finally:
        holder.rollback()
        holder.close()
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == 1 and "unknown file" in report["details"][0]
    young.unlink()
    if sys.platform == "linux":  # (the workers' channels are abstract Unix sockets)
        import asyncio

        worker = Siblings(str(tmp_path), ident="worker")  # a running worker's end of the channel

        async def refused() -> int:
            assert worker.start()
            try:
                return cli.main([*args, "--fix"])
            finally:
                worker.close()
        assert asyncio.run(refused()) == 2
        assert "stop them before check --fix" in capsys.readouterr().err
        assert leftover.exists()
    assert cli.main([*args, "--fix"]) == 0
    assert not leftover.exists()
    capsys.readouterr()
    assert cli.main(args) == 0 and json.loads(capsys.readouterr().out)["problems"] == 0
    hit = FrameCache(str(tmp_path)).get("1.2.3", 1, "application/octet-stream", "*")
    assert hit is not None and bytes(hit.payload) == payload


def test_a_full_purge_removes_every_entry_and_file_a_batch_at_a_time(tmp_path, monkeypatch):
    """`purge` of everything deletes PURGE_BATCH rows a transaction (the lock let go between them) and
    unlinks each batch's files; diskcache's count and volume follow."""
    monkeypatch.setattr(purges, "PURGE_BATCH", 7)
    cache = FrameCache(str(tmp_path))
    big = [os.urandom(40 * 1024 + n) for n in range(5)]  # files of their own
    for n, p in enumerate(big):
        cache.write("1.2.3", n + 1, "application/octet-stream", EXPLICIT_LE, p, "1.2")
    for n in range(20):
        documents.put_json(cache, f"meta{n}", "", b"[]", "1.2", ttl=60)
    files = list(tmp_path.glob("*/*.val"))
    assert len(files) == 5 and len(cache.disk) == 30
    assert purges.purge(cache) == 30
    assert not list(tmp_path.glob("*/*.val")) and cache.disk.volume() < 100_000
    assert list(FrameCache(str(tmp_path)).disk) == ["purge-generation"]  # (which tells the other workers)


class _RunsCode:
    """What a tampered row would hold: a pickle that runs code when it is loaded (it writes a file)."""

    def __init__(self, mark: str) -> None:
        self.mark = mark

    def __reduce__(self):
        return exec, (f"open({self.mark!r}, 'w').write('ran')",)


def test_a_pickled_row_is_never_unpickled(tmp_path):
    """diskcache unpickles a row whose mode says it is pickled, and unpickling runs the code the pickle
    names: a row tampered with in the shared cache directory would run in every worker that reads it. The
    proxy never stores anything pickled, so such a row (a value or a key) is refused: a miss, and its
    code never runs. Nothing the proxy would have to pickle is stored either."""
    import pickle

    from proxy.cache.entries import UnsafeEntry
    from proxy.cache.store import frame_key

    mark = tmp_path / "ran"
    directory = tmp_path / "c"
    cache = FrameCache(str(directory))
    for n in (1, 2):
        cache.write("1.2.3", n, "application/octet-stream", EXPLICIT_LE, os.urandom(64), "1.2")
    assert cache.get("1.2.3", 1, "application/octet-stream", EXPLICIT_LE) is not None
    db = sqlite3.connect(directory / "cache.db")
    db.execute("UPDATE Cache SET mode = 4, filename = NULL, value = ? WHERE key = ?",
               (pickle.dumps(_RunsCode(str(mark))), frame_key("1.2.3", 1, "application/octet-stream", EXPLICIT_LE)))
    db.execute("UPDATE Cache SET raw = 0, key = ? WHERE key = ?",
               (pickle.dumps(_RunsCode(str(mark))), frame_key("1.2.3", 2, "application/octet-stream", EXPLICIT_LE)))
    db.commit()
    db.close()
    other = FrameCache(str(directory))  # another worker: nothing in memory
    assert other.get("1.2.3", 1, "application/octet-stream", EXPLICIT_LE) is None
    with pytest.raises(UnsafeEntry):
        list(other.disk.iterkeys())
    assert not mark.exists()
    with pytest.raises(TypeError):
        other.disk.set("not/bytes", {"would": "be pickled"})
