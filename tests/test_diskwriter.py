"""The disk writer (proxy/cache/writer.py): frames a worker already serves from memory wait for a quiet
moment before they are written to the shared disk tier, unless a sibling worker wants them, they waited
their longest, too many bytes wait, or the worker stops; a purge drops what has not been written yet.

Whether the worker is busy is set by the test (the `quiet` Activity the cache is given), not by timing: a
frame deferred while "busy" is never written for quietness, however slow the machine."""

import asyncio
import os
import sys

import pytest

from proxy.cache import purges
from proxy.cache import writer as diskwriter
from proxy.cache.placement import Placement
from proxy.cache.store import FrameCache, checksum_of
from proxy.coordination.flights import Flights
from proxy.coordination.siblings import Siblings
from proxy.dicomweb import frames
from proxy.formats.part10 import EXPLICIT_LE
from proxy.observability import metrics
from proxy.observability.metrics import Activity

MEDIA = "application/octet-stream"


class Quiet(Activity):
    """The worker's activity as the test sets it: `seconds` since the last client request (0: busy)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def quiet_for(self) -> float:
        return self.seconds


@pytest.fixture
def quiet(monkeypatch):
    """Control what the writer sees: give it to the cache (`activity=quiet`), set `quiet.seconds`."""
    monkeypatch.setattr(diskwriter, "QUIET", 0.04)
    return Quiet()


def frame(n: int, size: int = 64 * 1024) -> tuple[str, int, str, str, bytes, int, bool]:
    payload = os.urandom(size)
    return ("1.2.3", n, MEDIA, EXPLICIT_LE, payload, checksum_of(payload), True)


def on_disk(directory, n: int, item: str = "1.2.3") -> bool:
    """What another worker finds (nothing in its memory tier)."""
    return FrameCache(str(directory)).get(item, n, MEDIA, "*", memory_only=False) is not None


def count(why: str) -> float:
    return metrics.child(metrics.CACHE_DEFERRED_WRITES, why)._value.get()


async def looks(writer: diskwriter.DiskWriter, monkeypatch, times: int) -> None:
    """Let the writer look at the queue `times` more times (its own timer)."""
    seen = {"n": 0}
    original = writer._look

    def counted() -> None:
        seen["n"] += 1
        original()

    monkeypatch.setattr(writer, "_look", counted)
    async with asyncio.timeout(10):
        while seen["n"] < times:
            await asyncio.sleep(0.01)


async def test_deferred_frames_wait_while_clients_come_and_are_written_once_quiet(tmp_path, quiet, monkeypatch):
    cache = FrameCache(str(tmp_path), activity=quiet)
    before = count("quiet")
    frames = [frame(n) for n in range(1, 21)]
    done = [cache.write_soon([f], "1.2", defer=True) for f in frames]
    await looks(cache.writer, monkeypatch, 3)  # busy all along: looked three times, wrote nothing
    assert not any(d.done() for d in done)
    assert cache.stats()["held_back_bytes"] == 20 * 64 * 1024  # (the admin endpoint and `cache stats`)
    assert not any(on_disk(tmp_path, n) for n in range(1, 21))
    quiet.seconds = 1.0
    async with asyncio.timeout(10):
        await asyncio.gather(*done)
    assert all(on_disk(tmp_path, n) for n in range(1, 21))
    assert count("quiet") - before == 20
    assert cache.writer._later_bytes == 0
    cache.close()


async def test_a_sibling_that_wants_frames_gets_them_and_their_study_written_at_once_even_while_busy(
        tmp_path, quiet):
    cache = FrameCache(str(tmp_path), activity=quiet)
    before = count("wanted")
    held = cache.write_soon([frame(1)], "9.9", b"token-one", defer=True)  # another study
    same = cache.write_soon([frame(2)], "1.2", b"token-two", defer=True)
    wanted = cache.write_soon([frame(3)], "1.2", b"token-three", defer=True)
    cache.writer.want(b"token-three")
    async with asyncio.timeout(10):
        await asyncio.gather(wanted, same)  # the sibling serves study 1.2: it will want frame 2 next
    assert on_disk(tmp_path, 3) and on_disk(tmp_path, 2)
    assert not on_disk(tmp_path, 1) and not held.done()
    later = cache.write_soon([frame(4)], "1.2", b"token-four", defer=True)  # 1.2 is shared: not held back
    # Wanted before it was queued (the sibling asked first): written as it comes, with its study.
    cache.writer.want(b"token-six")
    other = cache.write_soon([frame(5)], "5.5", b"token-five", defer=True)
    early = cache.write_soon([frame(6)], "5.5", b"token-six", defer=True)
    async with asyncio.timeout(10):
        await asyncio.gather(later, other, early)
    assert all(on_disk(tmp_path, n) for n in (4, 5, 6)) and not held.done()
    assert count("wanted") - before == 5
    cache.close()  # the worker stops: what waited is written
    assert on_disk(tmp_path, 1)


async def test_what_a_sibling_waits_for_goes_ahead_of_a_study_another_want_let_go(tmp_path, quiet):
    cache = FrameCache(str(tmp_path), activity=quiet)
    order: list[int] = []
    done = []
    for n in range(1, 22):
        d = cache.write_soon([frame(n)], "1.2" if n <= 20 else "3.4", b"token-%d" % n, defer=True)
        d.add_done_callback(lambda _, n=n: order.append(n))
        done.append(d)
    cache.writer.want(b"token-1")  # study 1.2 goes to disk: 20 frames queued
    cache.writer.want(b"token-21")  # a sibling waits for a frame of 3.4 meanwhile: it goes next
    async with asyncio.timeout(10):
        await asyncio.gather(*done)
    assert order.index(21) < 16, order  # (the writer may be a batch of 8 into 1.2 by then)
    cache.close()


async def test_a_wanted_frame_queued_behind_its_studys_burst_moves_to_the_front(tmp_path, quiet):
    cache = FrameCache(str(tmp_path), activity=quiet)
    order: list[int] = []
    done = []
    for n in range(1, 21):
        d = cache.write_soon([frame(n)], "1.2", b"token-%d" % n, defer=True)
        d.add_done_callback(lambda _, n=n: order.append(n))
        done.append(d)
    cache.writer.want(b"token-1")  # the whole study is queued, frame 20 last
    cache.writer.want(b"token-20")  # the sibling's next request: frame 20 goes next
    async with asyncio.timeout(10):
        await asyncio.gather(*done)
    assert order.index(20) < 16, order
    cache.close()


async def test_a_sibling_waiting_for_a_retrieve_in_flight_gets_its_whole_study_written(tmp_path, quiet):
    """A sibling waits for a retrieve (its scope), not for an instance the retrieve brought (one too large
    to keep, or that could not be cut into frames, is never learned): the study's frames go to disk, so
    that the retrieve's end reaches the sibling without waiting for a quiet moment."""
    cache = FrameCache(str(tmp_path), activity=quiet)
    held = [cache.write_soon([frame(n)], "1.2", b"token-%d" % n, defer=True) for n in (1, 2)]
    cache.writer.alias(b"scope-token", "1.2")
    cache.writer.want(b"scope-token")
    async with asyncio.timeout(10):
        await asyncio.gather(*held)
    assert on_disk(tmp_path, 1) and on_disk(tmp_path, 2)
    cache.writer.alias(b"scope-token", None)  # the retrieve settled
    other = cache.write_soon([frame(3)], "3.4", b"token-3", defer=True)
    cache.writer.want(b"scope-token")  # no longer anything: remembered as a token of its own
    assert not other.done()
    cache.close()


async def test_the_bound_and_the_longest_wait_write_frames_while_busy(tmp_path, quiet, monkeypatch):
    cache = FrameCache(str(tmp_path), memory_limit=8 * 64 * 1024, activity=quiet)  # defers 4 frames of 64 KB at most
    bound, waited = count("bound"), count("waited")
    done = [cache.write_soon([frame(n)], "1.2", defer=True) for n in range(1, 11)]
    async with asyncio.timeout(10):
        await asyncio.gather(*done[:6])
    assert count("bound") - bound == 6 and not any(d.done() for d in done[6:])
    assert cache.writer._later_bytes == 4 * 64 * 1024
    monkeypatch.setattr(diskwriter, "MAX_WAIT", 0.0)
    for item in cache.writer._later.values():  # as if they had waited MAX_WAIT seconds already
        item.until = 0.0
    late = cache.write_soon([frame(11)], "1.2", defer=True)  # one more: the oldest goes for the bound,
    async with asyncio.timeout(10):                           # the rest at the next look (no wait allowed)
        await asyncio.gather(late, *done[6:])
    assert count("bound") - bound == 7 and count("waited") - waited == 4
    assert all(on_disk(tmp_path, n) for n in range(1, 12))
    cache.close()


async def test_a_purge_drops_frames_not_written_yet(tmp_path, quiet, monkeypatch):
    cache = FrameCache(str(tmp_path), activity=quiet)
    purged = cache.write_soon([frame(1)], "1.2", defer=True)
    kept = cache.write_soon([frame(2)], "9.9", defer=True)
    assert purges.purge(cache, "1.2") == 1  # counted among the entries it dropped
    assert purged.done() and purged.result() == [None]
    quiet.seconds = 1.0
    async with asyncio.timeout(10):
        await kept
    await looks(cache.writer, monkeypatch, 0)
    assert on_disk(tmp_path, 2) and not on_disk(tmp_path, 1)
    cache.close()


async def test_frames_a_stopping_worker_deferred_survive_the_restart(tmp_path, quiet):
    cache = FrameCache(str(tmp_path), activity=quiet)
    before = count("stop")
    done = [cache.write_soon([frame(n)], "1.2", defer=True) for n in (1, 2, 3)]
    cache.close()  # inside the running loop, as the app's lifespan does
    assert count("stop") - before == 3
    assert all(on_disk(tmp_path, n) for n in (1, 2, 3))
    await asyncio.sleep(0)  # the writer's reports reach the loop
    assert all(d.done() for d in done)


@pytest.mark.skipif(sys.platform != "linux", reason="the siblings channel uses abstract Unix sockets")
async def test_a_miss_waits_for_quiet_in_a_worker_alone_and_is_written_at_once_beside_a_sibling(
        tmp_path, quiet, monkeypatch):
    """... unless the sibling can ask for it from this worker's memory (the hand-over): then it waits too."""
    cache = FrameCache(str(tmp_path), activity=quiet)
    flights = Flights()
    bus = Siblings(str(tmp_path))
    assert bus.start()
    bus.on_want = cache.writer.want  # (as runtime.py wires it)
    flights.connect(bus, None, checksum_of)
    other = Siblings(str(tmp_path), ident="sibling")
    ctype = f"{MEDIA}; transfer-syntax={EXPLICIT_LE}"

    PLACED = Placement("1.2", "1.2.9").key("1.2.3")  # the instance as _store keys it (placement.py)

    class Ctx:
        pass

    ctx = Ctx()
    ctx.flights = flights  # type: ignore[attr-defined]

    def store(n: int, study: str = "1.2") -> asyncio.Future:
        """Frame `n` fetched and stored by the flight that leads it; its disk write."""
        flight = flights.lead([frames.frame_key("1.2.3", n)])
        assert flight is not None
        writes: list[asyncio.Future] = []
        land = flight.land
        flight.land = lambda key, written=None, value=None: (writes.append(written), land(key, written, value))
        frames._store(ctx, cache, Placement(study, "1.2.9"), "1.2.3", n, ctype, [os.urandom(64 * 1024)], flight, True)
        return writes[0]

    try:
        alone = store(1)  # no sibling: held back while clients keep coming
        await looks(cache.writer, monkeypatch, 3)
        assert not alone.done() and not on_disk(tmp_path, 1, PLACED)
        assert cache.stats()["held_back_bytes"] == 64 * 1024

        assert other.start()
        async with asyncio.timeout(5):
            while flights.alone():
                await asyncio.sleep(0.01)
        async with asyncio.timeout(10):
            await store(2)  # a sibling may serve the next viewer: written at once, busy or not
        assert on_disk(tmp_path, 2, PLACED) and not on_disk(tmp_path, 1, PLACED)

        landed = other.landing(frames.frame_key("1.2.3", 1))  # the sibling waits for frame 1: says so
        async with asyncio.timeout(10):
            await asyncio.shield(landed)  # ... and it is written and settled, still busy
            await alone
        assert on_disk(tmp_path, 1, PLACED)

        async def nothing(*ask):
            return None

        flights.connect(bus, nothing, checksum_of)  # the sibling can ask for it from memory: held back again
        async with asyncio.timeout(5):
            while not flights.can_take:
                await asyncio.sleep(0.01)
        held = store(3, "1.9")  # (of another study: 1.2 is being written for the sibling that wanted it)
        await looks(cache.writer, monkeypatch, 3)
        assert not held.done() and not on_disk(tmp_path, 3, Placement("1.9", "1.2.9").key("1.2.3"))
    finally:
        await flights.close()
        other.close()
        cache.close()
