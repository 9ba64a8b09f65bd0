"""What retrieves teach the frame cache: instances that pass through, split into frame entries.

A study, series or instance retrieve (a client's, or a prefetch) leads a flight under its *scope*
(`scope/{study}/{series}/{instance}`, `*` for what it does not narrow; coordination/flights.py): a frame
request that misses a frame of an instance the retrieve carries follows it instead of asking the archive,
and wakes as soon as that instance is split into this worker's memory tier (its `learned/{sop}` key
lands), or, in a sibling worker, once the frames are on the shared disk tier (the key settles).

Instances are split off the event loop, in a thread of their own: a prefetch queues a split per instance,
and in the default executor those queued ahead of the request path's own blocking calls (a metadata
request waited ~1 s behind a series' 200 splits). Their frames go to the disk tier once this worker is
quiet or a sibling wants them (cache/writer.py).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from proxy.cache.placement import Placement
from proxy.cache.store import FrameCache, checksum_of, frame_key
from proxy.coordination.flights import Flight, Flights
from proxy.formats.multipart import whole
from proxy.formats.part10 import frames_and_place


def scope_key(study: str, series: str | None, instance: str | None) -> str:
    """The flight key of a retrieve of this study, series or instance."""
    return f"scope/{study}/{series or '*'}/{instance or '*'}"


def scope_keys(study: str, series: str | None, instance: str) -> list[str]:
    """The flight keys of the retrieves whose answer contains this instance (its study, its series, it)."""
    return [scope_key(study, s, i) for s, i in ((None, None), (series, None), (series, instance))]


def learned_key(sop: str) -> str:
    """The key that lands once this instance's frames are in the cache."""
    return "learned/" + sop


# The placed instance (Placement.key), frame, media type, transfer syntax, payload, checksum.
Split = tuple[list[tuple[str, int, str, str, bytes, int, bool]], list[bool], str | None]


class Retrieving:
    """A study, series or instance retrieve in flight that teaches the cache what it carries."""

    def __init__(self, learner: Learner, cache: FrameCache, study: str, series: str | None,
                 instance: str | None) -> None:
        self.learner = learner
        self.cache = cache
        self.key = scope_key(study, series, instance)
        self.tasks: list[asyncio.Task[None]] = []  # instances being split into this worker's memory tier
        self.writes: list[asyncio.Future[None]] = []  # their frames on the way to the disk tier
        flight = learner.flights.lead([self.key], exclusive=False)  # (two retrieves of a series may overlap)
        assert flight is not None
        self.flight: Flight = flight
        cache.writer.alias(learner.flights.token(self.key), study)  # a sibling waiting wants all of the study

    async def done(self) -> None:
        """The retrieve ended: once its frames are in this worker's memory tier, wake whoever follows it
        here; the siblings once they are on disk too."""
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        written = asyncio.ensure_future(self._written())
        self.learner.keep(written)
        self.flight.land(self.key, written)

    async def _written(self) -> None:
        if self.writes:
            await asyncio.gather(*self.writes, return_exceptions=True)
        self.cache.writer.alias(self.learner.flights.token(self.key), None)


class Learner:
    """Splits the instances retrieves carry into frame entries, for one worker."""

    def __init__(self, flights: Flights) -> None:
        self.flights = flights
        self.splitter = ThreadPoolExecutor(1, thread_name_prefix="cache-split")
        self.queued: set[str] = set()  # frame keys learned here and queued for the disk tier, not written yet
        self.running: set[asyncio.Future[None]] = set()  # splits and writes under way (kept from collection)

    def retrieving(self, cache: FrameCache, study: str, series: str | None, instance: str | None) -> Retrieving:
        """Mark a retrieve as in flight (end it with `Retrieving.done`)."""
        return Retrieving(self, cache, study, series, instance)

    def covering(self, study: str, series: str | None, instance: str,
                 want: bool = True) -> list[asyncio.Future[Any]]:
        """Retrieves in flight, here or in a sibling worker, whose answer contains this instance."""
        return self.flights.carriers(scope_keys(study, series, instance), want)

    def arrivals(self, study: str, series: str | None, instance: str,
                 want: bool = True) -> list[asyncio.Future[Any]]:
        """What to wait for when a frame of `instance` misses: nothing when no retrieve in flight carries
        it; otherwise done when the instance is learned (here, or on disk by a sibling) or a retrieve ends."""
        scopes = self.covering(study, series, instance, want)
        if not scopes:
            return []
        return [*self.flights.landing(learned_key(instance), want), *scopes]

    def keep(self, task: asyncio.Future[None]) -> None:
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    def learn_instance(self, cache: FrameCache, content_type: str, pieces: list[bytes | memoryview], audience: str,
                       retrieving: Retrieving | None = None, native: bool = False) -> None:
        """Tee for instance retrieves: split a Part 10 instance that passed through, answered for `audience`
        (placement.py), into frame entries (`native`: the archive sent it as stored, asked `transfer-syntax=*`)."""
        if not content_type.startswith("application/dicom"):
            return
        task = asyncio.ensure_future(self._split(cache, pieces, audience, retrieving, native))
        self.keep(task)
        if retrieving is not None:
            retrieving.tasks.append(task)

    async def _split(self, cache: FrameCache, pieces: list[bytes | memoryview], audience: str,
                     retrieving: Retrieving | None, native: bool) -> None:
        try:
            loop = asyncio.get_running_loop()
            frames, stored, tag = await loop.run_in_executor(self.splitter, self._frames, cache, pieces, audience,
                                                             native)
        except Exception:  # a part we cannot parse teaches us nothing; the client already has it
            return
        if not frames:
            return
        for item, n, mtype, ts, data, checksum, _ in frames:
            cache.put(item, n, mtype, ts, data, checksum, native)
        sop = frames[0][0].rpartition("/")[2]
        # A SOP Instance's frames never change: what the disk tier holds already (a series retrieved
        # again), or what this worker has queued for it, is not written again.
        keys = [frame_key(*f[:4]) for f in frames]
        new = [(f, k) for f, k, there in zip(frames, keys, stored, strict=True) if not there and k not in self.queued]
        # Claimed at once: the split of the same instance retrieved again may end in this very turn of the
        # loop, before the write below has started.
        self.queued.update(k for _, k in new)
        writing = asyncio.ensure_future(self._to_disk(cache, sop, new, tag))
        self.keep(writing)
        if retrieving is not None:
            retrieving.writes.append(writing)
        self.flights.land(learned_key(sop), writing)  # here now; the siblings once on disk

    def _frames(self, cache: FrameCache, pieces: list[bytes | memoryview], audience: str, native: bool) -> Split:
        """The frames of the instance in `pieces`, each keyed by its placed instance (placement.py: the study
        and series the instance itself names, and `audience`) and with its checksum; for each, whether the
        disk tier holds it already (or this worker is writing it); and its study, to tag them with (blocking:
        in a thread). An instance received whole into one buffer is not copied (parts.whole). An instance
        that does not name its study and series teaches nothing: it could not be placed truthfully."""
        frames, study, series = frames_and_place(whole(pieces))
        if not study or not series:
            return [], [], None
        place = Placement(study, series, audience)
        placed = [(place.key(sop), n, mtype, ts, data, checksum_of(data), native) for sop, n, mtype, ts, data in frames]
        # Queued here, or on disk: a key leaves `queued` only once its write is committed, so looking at
        # `queued` first never misses a frame whose write completes meanwhile (a set read under the GIL).
        return placed, [frame_key(*f[:4]) in self.queued or cache.on_disk(*f[:4]) for f in placed], study

    async def _to_disk(self, cache: FrameCache, sop: str,
                       new: list[tuple[tuple[str, int, str, str, bytes, int, bool], str]],
                       tag: str | None) -> None:
        """An instance's learned frames to the shared disk tier, once this worker is quiet or a sibling
        waits for them (cache/writer.py)."""
        try:
            if cache.writable and new:
                await cache.write_soon([f for f, _ in new], tag, self.flights.token(learned_key(sop)), defer=True)
        finally:
            self.queued.difference_update(k for _, k in new)  # (claimed by the split)

    def close(self) -> None:
        """Stop the splitting thread (the worker stops)."""
        self.splitter.shutdown(wait=False, cancel_futures=True)
