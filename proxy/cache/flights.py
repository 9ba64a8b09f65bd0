"""What is on its way into the frame cache: single-flight across granularities and worker processes.

A frame request that misses waits, instead of asking the archive, when the frame is already coming:
fetched by another request (frames.py keeps those), carried by a study, series or instance retrieve
or a prefetch in flight here (`Fetching`), or announced by a sibling worker (siblings.py). Instances
that pass through are split into frame entries (`learn_instance`) off the event loop, and whoever
waits for them is woken once they are in this worker's memory tier, or on disk for the siblings.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from proxy.cache.placement import Placement
from proxy.cache.store import FrameCache, checksum_of, frame_key
from proxy.coordination import siblings
from proxy.formats.multipart import whole
from proxy.formats.part10 import frames_and_place

_learning: set[asyncio.Task[None]] = set()
# Instances are split in a thread of their own: a prefetch queues a split per instance, and in the
# default executor those queued ahead of the request path's own blocking calls (a metadata request
# waited ~1 s behind a series' 200 splits).
_SPLITTER = ThreadPoolExecutor(1, thread_name_prefix="cache-split")
_learned: dict[str, asyncio.Future[None]] = {}  # SOP UID → set once its frames are in the cache
# "study/series/instance" being retrieved → done, one future per retrieve in flight (a client's series
# retrieve may overlap the prefetch of the same series, for a moment: the prefetch then stops)
_scopes: dict[str, list[asyncio.Future[None]]] = {}
_queued: set[str] = set()  # frame keys learned here and queued for the disk tier, not written yet


def learned(sop: str) -> asyncio.Future[None]:
    """Done when an instance retrieve in flight has put this instance's frames in the cache."""
    fut = _learned.get(sop)
    if fut is None or fut.done():
        fut = _learned[sop] = asyncio.get_running_loop().create_future()
    return fut


def _scope(study: str, series: str | None, instance: str | None) -> str:
    return f"{study}/{series or '*'}/{instance or '*'}"


def scope_keys(study: str, series: str | None, instance: str) -> list[str]:
    """The siblings' keys of the retrieves whose answer contains this instance (its study, its series,
    itself)."""
    return ["scope/" + _scope(study, s, i) for s, i in ((None, None), (series, None), (series, instance))]


def here(study: str, series: str | None, instance: str) -> list[asyncio.Future[None]]:
    """Retrieves in flight in this worker whose answer contains this instance."""
    keys = (_scope(study, None, None), _scope(study, series, None), _scope(study, series, instance))
    return [f for k in keys for f in _scopes.get(k, ()) if not f.done()]


def covering(study: str, series: str | None, instance: str, want: bool = True) -> list[asyncio.Future[None]]:
    """Retrieves in flight, here or in a sibling worker, whose answer contains this instance."""
    return here(study, series, instance) + [f for k in scope_keys(study, series, instance)
                                            if (f := siblings.flying(k, want)) is not None]


def arrivals(study: str, series: str | None, instance: str, want: bool = True) -> list[asyncio.Future[None]]:
    """What to wait for when a frame of `instance` misses: empty when nothing in flight carries it;
    otherwise done when its instance is learned (here, or on disk by a sibling) or the retrieve ends."""
    scopes = covering(study, series, instance, want)
    if not scopes:
        return []
    remote = siblings.landing("learned/" + instance, want)
    return [learned(instance), *scopes] + ([remote] if remote is not None else [])


class Fetching:
    """Marks a study, series or instance retrieve as in flight, so that frame requests for what it
    carries wait for it instead of asking the archive (single-flight across granularities)."""

    def __init__(self, study: str, series: str | None, instance: str | None, cache: FrameCache | None = None) -> None:
        self.key = _scope(study, series, instance)
        self.cache = cache
        self.tasks: list[asyncio.Task[None]] = []  # instances being split into this worker's memory tier
        self.writes: list[asyncio.Task[None]] = []  # their frames on the way to the disk tier
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        _scopes.setdefault(self.key, []).append(self.future)
        siblings.claim(["scope/" + self.key])  # seen by the siblings at once, the announcement a moment later
        siblings.announce("scope/" + self.key)
        if cache is not None:  # a sibling waiting for what this brings asks for all of its study
            cache.writer.alias(siblings.digest("scope/" + self.key), study)

    async def done(self) -> None:
        """The retrieve ended: once its frames are learned (in this worker's memory tier), wake whoever
        waits here; the siblings are told once they are on disk too (in the background)."""
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        live = _scopes.get(self.key, [])
        if self.future in live:
            live.remove(self.future)
        if not live:
            _scopes.pop(self.key, None)
        if not self.future.done():
            self.future.set_result(None)
        task = asyncio.ensure_future(self._settle_when_written())
        _learning.add(task)
        task.add_done_callback(_learning.discard)

    async def _settle_when_written(self) -> None:
        if self.writes:
            await asyncio.gather(*self.writes, return_exceptions=True)
        if self.cache is not None:
            self.cache.writer.alias(siblings.digest("scope/" + self.key), None)
        siblings.settle("scope/" + self.key)  # its learned frames are on disk for the siblings too


Split = tuple[list[tuple[str, int, str, str, bytes, int]], list[bool], str | None]


def _frames_with_checksums(cache: FrameCache, pieces: list[bytes | memoryview], audience: str) -> Split:
    """The frames of the instance in `pieces`, each keyed by its placed instance (placement.py: the study
    and series the instance itself names, and `audience`) and with its checksum; for each, whether the disk
    tier holds it already (or this worker is writing it); and its study, to tag them with (blocking: in a
    thread). An instance received whole into one buffer is not copied (parts.whole). An instance that
    does not name its study and series teaches nothing: it could not be placed truthfully."""
    frames, study, series = frames_and_place(whole(pieces))
    if not study or not series:
        return [], [], None
    place = Placement(study, series, audience)
    placed = [(place.key(sop), n, mtype, ts, data, checksum_of(data)) for sop, n, mtype, ts, data in frames]
    # Queued here, or on disk: a key leaves _queued only once its write is committed, so looking at
    # _queued first never misses a frame whose write completes meanwhile (a set read under the GIL).
    return placed, [frame_key(*f[:4]) in _queued or cache.on_disk(*f[:4]) for f in placed], study


async def _to_disk(cache: FrameCache, sop: str, new: list[tuple[tuple[str, int, str, str, bytes, int], str]],
                   tag: str | None) -> None:
    """An instance's learned frames to the shared disk tier, once this worker is quiet or a sibling waits
    for them (diskwriter.py); then the siblings waiting for the instance read it there."""
    try:
        if cache.writable and new:
            await cache.write_soon([f for f, _ in new], tag, siblings.digest("learned/" + sop), defer=True)
    finally:
        _queued.difference_update(k for _, k in new)  # (claimed by the split: learn_instance)
    siblings.settle("learned/" + sop)


def learn_instance(cache: FrameCache, content_type: str, pieces: list[bytes | memoryview], audience: str,
                   fetching: Fetching | None = None) -> None:
    """Tee for instance retrieves: split a Part 10 instance that passed through, answered for `audience`
    (placement.py), into frame entries."""
    if not content_type.startswith("application/dicom"):
        return

    async def split() -> None:
        try:
            loop = asyncio.get_running_loop()
            frames, stored, tag = await loop.run_in_executor(_SPLITTER, _frames_with_checksums, cache, pieces,
                                                             audience)
        except Exception:  # a part we cannot parse teaches us nothing; the client already has it
            return
        if not frames:
            return
        for item, n, mtype, ts, data, checksum in frames:
            cache.put(item, n, mtype, ts, data, checksum)
        sop = frames[0][0].rpartition("/")[2]
        fut = _learned.pop(sop, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
        # A SOP Instance's frames never change: what the disk tier holds already (a series retrieved
        # again), or what this worker has queued for it, is not written again.
        keys = [frame_key(*f[:4]) for f in frames]
        new = [(f, k) for f, k, there in zip(frames, keys, stored, strict=True) if not there and k not in _queued]
        # Claimed at once: the split of the same instance retrieved again may end in this very turn of the
        # loop, before the write below has started.
        _queued.update(k for _, k in new)
        writing = asyncio.ensure_future(_to_disk(cache, sop, new, tag))
        _learning.add(writing)
        writing.add_done_callback(_learning.discard)
        if fetching is not None:
            fetching.writes.append(writing)

    task = asyncio.ensure_future(split())
    _learning.add(task)
    task.add_done_callback(_learning.discard)
    if fetching is not None:
        fetching.tasks.append(task)
