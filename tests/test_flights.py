"""One upstream request for concurrent identical misses (proxy/coordination/flights.py), within a worker."""

import asyncio

import pytest

from proxy.coordination.flights import Flights
from proxy.errors import Problem


class Archive:
    """A fetch that counts its calls and ends when the test says so."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def fetch(self) -> str:
        self.calls += 1
        mine = self.calls
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return f"answer {mine}"


FLIGHTS: list[Flights] = []


async def shared(key, fetch, patience):
    """`Flights.share` on one table of flights per test."""
    return await FLIGHTS[-1].share(key, fetch, patience)


@pytest.fixture(autouse=True)
def flights():
    FLIGHTS.append(Flights())
    yield FLIGHTS[-1]
    FLIGHTS.clear()


async def started(archive: Archive, calls: int = 1) -> None:
    async with asyncio.timeout(5):
        while archive.calls < calls:
            await asyncio.sleep(0)


async def test_followers_get_the_leaders_answer():
    archive = Archive()
    leader = asyncio.ensure_future(shared("k", archive.fetch, 5))
    await started(archive)
    followers = [asyncio.ensure_future(shared("k", archive.fetch, 5)) for _ in range(9)]
    other = asyncio.ensure_future(shared("other key", archive.fetch, 5))
    await started(archive, 2)
    archive.release.set()
    got = await asyncio.gather(leader, *followers)
    assert archive.calls == 2 and (await other).led
    assert [g.led for g in got] == [True] + [False] * 9 and {g.value for g in got} == {"answer 1"}


async def test_the_leaders_error_is_every_followers():
    archive = Archive()
    archive.fail = Problem(404, "no such resource in the archive")
    leader = asyncio.ensure_future(shared("k", archive.fetch, 5))
    await started(archive)
    follower = asyncio.ensure_future(shared("k", archive.fetch, 5))
    await asyncio.sleep(0)
    archive.release.set()
    from proxy.observability import metrics

    before = metrics.child(metrics.SHARED_FAILURES, "404")._value.get()
    for task in (leader, follower):
        with pytest.raises(Problem):
            await task
    assert archive.calls == 1
    assert metrics.child(metrics.SHARED_FAILURES, "404")._value.get() == before + 1  # the follower's answer


async def test_a_leader_whose_client_left_hands_the_fetch_to_a_follower():
    archive = Archive()
    leader = asyncio.ensure_future(shared("k", archive.fetch, 5))
    await started(archive)
    followers = [asyncio.ensure_future(shared("k", archive.fetch, 5)) for _ in range(3)]
    await asyncio.sleep(0)
    leader.cancel()
    await started(archive, 2)  # one follower leads now; the other two follow it
    archive.release.set()
    got = await asyncio.gather(*followers)
    assert archive.calls == 2 and sorted(g.led for g in got) == [False, False, True]


async def test_a_follower_past_its_patience_fetches_for_itself():
    archive = Archive()
    leader = asyncio.ensure_future(shared("k", archive.fetch, 5))
    await started(archive)
    impatient = asyncio.ensure_future(shared("k", archive.fetch, 0.05))
    await started(archive, 2)  # it gave up waiting and asked too
    archive.release.set()
    assert (await impatient).led and (await leader).led
    assert (await shared("k", archive.fetch, 5)).led  # nothing left in flight: a new miss leads


async def follow_or_lead(flights, key, patience):
    """What the cache phase does with a key (cache_phase._coalesce, in short): lead it, or follow the flight
    bringing it and get None."""
    flight = flights.lead([key])
    if flight is None:
        await flights.follow(flights.carriers([key]), patience)
    return flight


async def test_a_streamed_miss_leads_and_the_others_look_again_once_it_ends(flights):
    lead = await follow_or_lead(flights, "object/k", 5)
    assert lead is not None
    followers = [asyncio.ensure_future(follow_or_lead(flights, "object/k", 5)) for _ in range(3)]
    impatient = asyncio.ensure_future(follow_or_lead(flights, "object/k", 0.01))
    assert await impatient is None  # gave up: it looks the cache up, and fetches what is not there
    assert not any(f.done() for f in followers)
    lead.end()
    assert await asyncio.gather(*followers) == [None, None, None]
    lead.end()  # (twice is harmless)
    again = await follow_or_lead(flights, "object/k", 5)
    assert again is not None  # nothing in flight: the next miss leads
    again.end()


async def test_a_streamed_leaders_failure_is_its_followers_answer(flights):
    """An archive's refusal (a 404) met by the leader of a streamed miss is what its followers answer too,
    counted; they do not ask the archive again."""
    from proxy.observability import metrics

    lead = await follow_or_lead(flights, "object/k", 5)
    assert lead is not None
    followers = [asyncio.ensure_future(follow_or_lead(flights, "object/k", 5)) for _ in range(2)]
    await asyncio.sleep(0)
    before = metrics.child(metrics.SHARED_FAILURES, "404")._value.get()
    lead.end(Problem(404, "no such resource in the archive"))
    for f in followers:
        with pytest.raises(Problem):
            await f
    assert metrics.child(metrics.SHARED_FAILURES, "404")._value.get() == before + 2


async def test_a_flight_lands_key_by_key(flights):
    """A fetch of several frames wakes the followers of each frame as that frame lands, not at its end."""
    flight = flights.lead(["frame/1/1", "frame/1/2"])
    assert flight is not None and flights.lead(["frame/1/2", "frame/1/3"]) is None  # one of them is in flight
    first, second = flights.carriers(["frame/1/1"]), flights.carriers(["frame/1/2"])
    flight.land("frame/1/1")
    await asyncio.sleep(0)
    assert all(f.done() for f in first) and not any(f.done() for f in second)
    flight.end()
    assert all(f.done() for f in second) and not flights.here(["frame/1/1", "frame/1/2"])


async def test_retrieves_of_one_scope_may_overlap(flights):
    """Two clients streaming the same series both lead it (not exclusive); a follower wakes at the first end."""
    a = flights.lead(["scope/1/2/*"], exclusive=False)
    b = flights.lead(["scope/1/2/*"], exclusive=False)
    assert a is not None and b is not None and len(flights.carriers(["scope/1/2/*"])) == 2
    a.end()
    assert len(flights.carriers(["scope/1/2/*"])) == 1
    b.end()
    assert flights.carriers(["scope/1/2/*"]) == []
