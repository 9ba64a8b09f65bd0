"""Frames handed from one worker's memory tier to a sibling's (proxy/coordination/handover.py), over real
sockets."""

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator

import pytest

from proxy.cache.entries import checksum_of
from proxy.coordination import handover
from proxy.coordination.flights import Flights
from proxy.coordination.handover import Giver, Taker
from proxy.dicomweb import frames

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="abstract Unix sockets are Linux-only")
TS = "1.2.840.10008.1.2.1"


class Holder:
    """What a giver's memory tier holds: sop → payload; `later` sops arrive when their event is set."""

    def __init__(self) -> None:
        self.frames: dict[str, bytes] = {}
        self.later: dict[str, asyncio.Event] = {}
        self.lie = False
        self.asked: list[tuple] = []

    async def find(self, fields, wait):
        study, series, sop, frame, mtype, ts = fields
        self.asked.append((study, series, sop, int(frame), mtype, ts))
        if sop in self.later:
            try:
                await asyncio.wait_for(self.later[sop].wait(), wait)
            except TimeoutError:
                return None
        payload = self.frames.get(sop)
        if payload is None:
            return None
        return payload, checksum_of(payload) + (1 if self.lie else 0), "application/octet-stream", TS


@contextlib.asynccontextmanager
async def handing(holder: Holder) -> AsyncIterator[tuple[Giver, Taker]]:
    """A giver answering from `holder`, and a taker to ask it; both closed afterwards."""
    g, taker = Giver(f"dicomweb-edge-give/test-{os.getpid()}-{id(holder)}/1", holder.find), Taker(checksum_of)
    assert await g.start()
    try:
        yield g, taker
    finally:
        taker.close()
        await g.close()


def ask(taker: Taker, g: Giver, sop: str, wait: float = 1.0, name: str | None = None):
    return taker.ask(name or g.name, ("9", "8", sop, "1", "application/octet-stream", "*"), wait)


async def asked(holder: Holder) -> None:
    """Until the giver has the ask (bounded)."""
    async with asyncio.timeout(5):
        while not holder.asked:
            await asyncio.sleep(0.01)


async def test_a_frame_crosses_whole_and_the_connection_is_kept(tmp_path):
    holder = Holder()
    big = os.urandom(4 * 1024 * 1024 + 7)  # larger than any socket buffer: many reads into one buffer
    holder.frames = {"1.2.3": big, "1.2.4": b"x" * 100}
    async with handing(holder) as (g, taker):
        got = await taker.ask(g.name, ("9", "8", "1.2.3", "2", "application/octet-stream", "*"), 1.0)
        assert got is not None and bytes(got.payload) == big and got.checksum == checksum_of(big)
        assert isinstance(got.payload, memoryview) and got.payload.readonly  # what the cache phase sends as is
        assert (got.media_type, got.transfer_syntax) == ("application/octet-stream", TS)
        assert holder.asked == [("9", "8", "1.2.3", 2, "application/octet-stream", "*")]
        assert len(taker.idle[g.name]) == 1
        small = await ask(taker, g, "1.2.4")
        assert small is not None and bytes(small.payload) == b"x" * 100
        assert len(taker.idle[g.name]) == 1  # the same connection again


async def test_what_the_sibling_does_not_hold_is_none(tmp_path):
    holder = Holder()
    async with handing(holder) as (g, taker):
        assert await ask(taker, g, "1.2.3", 0.2) is None
        holder.frames["1.2.3"] = b"late"
        assert await ask(taker, g, "1.2.3", 0.2) is not None
        holder.lie = True  # bytes that do not match their checksum are never kept
        assert await ask(taker, g, "1.2.3", 0.2) is None
        assert await ask(taker, g, "1.2.3", 0.2, "dicomweb-edge-give/nobody/0") is None


async def test_a_frame_still_on_its_way_is_handed_over_when_it_arrives(tmp_path):
    holder = Holder()
    holder.later["1.2.3"] = asyncio.Event()
    async with handing(holder) as (g, taker):
        pending = asyncio.ensure_future(ask(taker, g, "1.2.3", 5))
        await asked(holder)
        assert not pending.done()
        holder.frames["1.2.3"] = b"arrived"
        holder.later["1.2.3"].set()
        got = await pending
        assert got is not None and bytes(got.payload) == b"arrived"


async def test_a_cancelled_ask_does_not_spoil_the_next(tmp_path):
    holder = Holder()
    holder.later["1.2.3"] = asyncio.Event()
    holder.frames = {"1.2.3": b"slow", "1.2.4": b"next"}
    async with handing(holder) as (g, taker):
        pending = asyncio.ensure_future(ask(taker, g, "1.2.3", 5))
        await asked(holder)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        holder.later["1.2.3"].set()  # its answer must not be read as the next ask's
        got = await ask(taker, g, "1.2.4")
        assert got is not None and bytes(got.payload) == b"next"


async def test_a_frame_none_hands_over_is_wanted_on_disk(monkeypatch):
    """The fallback: no sibling hands the frame over, so the siblings are asked to write it to disk next
    (the waiter then reads it there), under every key it may be held back by."""

    class Ctx:
        flights = Flights()

    asked: list[list[str]] = []
    wanted: list[list[str]] = []

    async def nobody(keys, fields, wait):
        asked.append(keys)
        return None

    monkeypatch.setattr(Ctx.flights, "take", nobody)
    monkeypatch.setattr(Ctx.flights, "want", wanted.append)
    target = frames.Target("1.1", "1.2", "1.3", (4,))
    sel = frames.Selection(True, "application/octet-stream", None)
    await frames._take(Ctx(), None, target, sel, 4, 1.0)  # type: ignore[arg-type]
    assert asked == wanted
    assert wanted == [["frame/1.3/4", "learned/1.3", "scope/1.1/*/*", "scope/1.1/1.2/*", "scope/1.1/1.2/1.3"]]
    assert handover.giver_of("dicomweb-edge/abc/12") == "dicomweb-edge-give/abc/12"


async def test_a_process_of_another_user_is_not_answered(tmp_path, monkeypatch):
    """Abstract sockets have no file permissions: the giver checks who connects (SO_PEERCRED)."""
    holder = Holder()
    holder.frames = {"1.2.3": b"pixels"}
    async with handing(holder) as (g, taker):
        monkeypatch.setattr(handover.os, "getuid", lambda: os.getuid() + 1)  # the giver's user, seen as other
        assert await ask(taker, g, "1.2.3", 0.5) is None
        assert holder.asked == []
        monkeypatch.undo()
        assert await ask(taker, g, "1.2.3", 0.5) is not None


async def test_a_giver_that_stops_ends_the_asks_it_was_answering(tmp_path):
    holder = Holder()
    holder.later["1.2.3"] = asyncio.Event()  # never set: the giver waits for a frame that does not come
    async with handing(holder) as (g, taker):
        pending = asyncio.ensure_future(ask(taker, g, "1.2.3", 30))
        await asked(holder)
        await g.close()  # the worker stops
        assert await pending is None and not g.serving
