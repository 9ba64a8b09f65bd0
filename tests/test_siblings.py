"""The channel between worker processes on one cache directory (proxy/coordination/siblings.py)."""

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

import pytest

from proxy.coordination.siblings import Siblings

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="abstract Unix sockets are Linux-only")


async def settled(fut: asyncio.Future[None]) -> bool:
    try:
        await asyncio.wait_for(asyncio.shield(fut), 5)
    except TimeoutError:
        return False
    return True


async def until(check) -> None:
    """Let the event loop deliver datagrams until `check()` holds (bounded)."""
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0)


async def acquainted(*sibs: Siblings) -> None:
    """Started together: wait until each knows the others (a hello, or its next look)."""
    await until(lambda: all({o.name for o in sibs if o is not s} <= set(s._peers()) for s in sibs))


async def test_an_announced_fetch_is_waited_for_until_it_settles(tmp_path):
    a, b = Siblings(str(tmp_path), "1"), Siblings(str(tmp_path), "2")
    other = Siblings(str(tmp_path / "elsewhere"), "3")  # another cache directory: not a sibling
    assert a.start() and b.start() and other.start()
    await acquainted(a, b)
    try:
        assert b.flying("frame/1.2.3/1") is None
        a.announce("frame/1.2.3/1")
        await until(lambda: b.flying("frame/1.2.3/1") is not None)
        fut = b.flying("frame/1.2.3/1")
        assert fut is not None and not fut.done()
        assert other.flying("frame/1.2.3/1") is None
        a.settle("frame/1.2.3/1")
        assert await settled(fut)
        assert b.flying("frame/1.2.3/1") is None  # settled: a miss now goes to the disk tier, then upstream
    finally:
        for s in (a, b, other):
            s.close()


@contextlib.asynccontextmanager
async def pair(directory) -> AsyncIterator[tuple[Siblings, Siblings]]:
    """Two workers on one cache directory, each knowing the other (in the test's own event loop)."""
    a, b = Siblings(str(directory), "1"), Siblings(str(directory), "2")
    assert a.start() and b.start()
    try:
        await acquainted(a, b)
        yield a, b
    finally:
        a.close()
        b.close()


async def test_a_settle_wakes_a_waiter_that_never_saw_the_announcement(tmp_path):
    async with pair(tmp_path) as (a, b):
        fut = b.landing("learned/1.2.3")
        a.settle("learned/1.2.3")
        assert await settled(fut)


async def test_a_vanished_siblings_announcements_do_not_hold_anyone(tmp_path):
    async with pair(tmp_path) as (a, b):
        a.announce("scope/1.2/3.4/*")
        await until(lambda: b.flying("scope/1.2/3.4/*") is not None)
        a.close()  # the worker died mid-fetch
        b._looked -= 10  # its next look at /proc/net/unix is due
        assert b.flying("scope/1.2/3.4/*") is None


async def test_a_waiter_says_once_what_it_wants_and_the_holder_hears_it(tmp_path):
    """A worker that starts waiting for a key tells its siblings (by digest): one that holds the key's
    frames back for a quiet moment writes them next (diskwriter.py)."""
    from proxy.coordination.siblings import digest

    async with pair(tmp_path) as (a, b):
        heard: list[bytes] = []
        a.on_want = heard.append
        b.landing("learned/1.2.3")
        b.landing("learned/1.2.3")  # a second request waiting for the same instance: no second want
        a.announce("scope/1.2/1.2.4/*")
        await until(lambda: b.flying("scope/1.2/1.2.4/*") is not None)
        await until(lambda: len(heard) >= 2)
        assert heard == [digest("learned/1.2.3"), digest("scope/1.2/1.2.4/*")]


async def test_a_client_retrieve_in_one_worker_stops_the_same_prefetch_in_the_other(tmp_path):
    """A series (or its study) that one worker prefetches and a client of the other retrieves is streamed by
    the archive once: the retrieving worker says so, and the prefetching one stops (prefetch.py)."""
    from proxy.cache.learning import Learner
    from proxy.coordination.flights import Flights
    from proxy.dicomweb import prefetch

    async def streaming() -> None:
        await asyncio.sleep(3600)

    flights = Flights()
    prefetcher = prefetch.Prefetcher(flights, Learner(flights), 2)
    async with pair(tmp_path) as (a, b):
        a.on_yield = prefetcher.sibling_yield
        tasks = {series: asyncio.ensure_future(streaming()) for series in ("1.2.3.1", "1.2.3.2", "1.2.3.3")}
        for series, task in tasks.items():  # what _prefetch registers while it streams
            prefetcher.running[series] = ("1.2.3" if series != "1.2.3.3" else "1.2.9", task)
        try:
            b.ask_to_yield(prefetch._scope_key("1.2.3", "1.2.3.1"))  # a series retrieve
            await until(lambda: tasks["1.2.3.1"].cancelled())
            assert not tasks["1.2.3.2"].done()
            b.ask_to_yield(prefetch._scope_key("1.2.3", None))  # a study retrieve: every series of it
            await until(lambda: tasks["1.2.3.2"].cancelled())
            assert not tasks["1.2.3.3"].done()  # a series of another study (the same message left it)
        finally:
            for task in tasks.values():
                task.cancel()


async def test_messages_carry_no_uids(tmp_path):
    import socket

    a = Siblings(str(tmp_path), "1")
    spy = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    spy.bind("\0" + a.prefix + "spy")
    spy.setblocking(False)
    assert a.start()
    try:
        a.announce("frame/1.2.840.113619.2.55.3/1")
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(spy, 65536), 5)
        assert b"1.2.840" not in data and len(data) == 26  # its hello, then the announcement: 1 + 12 bytes each
    finally:
        a.close()
        spy.close()


async def test_a_worker_that_starts_later_is_known_at_once(tmp_path):
    a = Siblings(str(tmp_path), "1")
    assert a.start()
    assert a._peers() == []  # looked before its sibling existed
    a._looked += 60  # ... and will not look again soon
    b = Siblings(str(tmp_path), "2")
    assert b.start()  # finds a, says hello
    try:
        await until(lambda: a.peers == [b.name])
        a.announce("frame/1.2.3/1")
        await until(lambda: b.flying("frame/1.2.3/1") is not None)
    finally:
        a.close()
        b.close()


async def test_a_worker_that_starts_mid_fetch_learns_what_is_in_flight(tmp_path):
    a = Siblings(str(tmp_path), "1")
    assert a.start()
    a.announce("scope/1.2/3.4/*")  # nobody to tell yet
    a.announce("frame/1.2.3/1")
    a.settle("frame/1.2.3/1")
    b = Siblings(str(tmp_path), "2")
    assert b.start()  # says hello; a tells it what it is still fetching
    try:
        await until(lambda: b.flying("scope/1.2/3.4/*") is not None)
        assert b.flying("frame/1.2.3/1") is None
    finally:
        a.close()
        b.close()


async def test_a_claim_is_seen_by_a_sibling_before_any_message_arrives(tmp_path):
    """Two workers miss one frame in the same instant: the first to claim it fetches it, the second sees
    the claim at once (no datagram delivered yet: no await in between) and waits for its settle."""
    key = "frame/1.2.3/1"
    async with pair(tmp_path) as (a, b):
        assert a.claim([key, "frame/1.2.3/2"])
        a.announce(key)
        assert not b.claim(["frame/1.2.3/3", key])  # all or nothing: 3 is not held by b either
        fut = b.flying(key)
        assert fut is not None and not fut.done()
        assert a.flying(key) is None  # its own claim: its own single-flight table knows it
        assert b.claim(["frame/1.2.3/3"]) and not a.claim(["frame/1.2.3/3"])
        a.settle(key)  # on disk: the claim ends with the settle
        assert await settled(fut)
        assert b.claim([key])
        assert not a.claim(["frame/1.2.3/1"])
        b.settle(key)
        assert a.claim([key])


async def test_a_dead_workers_claims_end_with_it(tmp_path):
    async with pair(tmp_path) as (a, b):
        assert a.claim(["frame/9/1"]) and not b.claim(["frame/9/1"])
        a.close()  # (the kernel closes a dead process's sockets the same way)
        assert b.claim(["frame/9/1"])


async def test_a_waiter_that_asks_for_a_hand_over_wants_nothing_written_until_it_fails(tmp_path):
    """A worker that asks its sibling for a frame's bytes (handover.py) waits without a want, so the
    sibling's writes keep waiting for a quiet moment; the want goes out only when no hand-over came."""
    from proxy.coordination.siblings import digest

    async with pair(tmp_path) as (a, b):
        heard: list[bytes] = []
        a.on_want = heard.append
        a.announce("scope/1.2/1.2.5/*")
        await until(lambda: b.flying("scope/1.2/1.2.5/*", want=False) is not None)
        b.landing("learned/1.2.6", want=False)
        assert b.holders(["learned/1.2.6", "scope/1.2/1.2.5/*"]) == [a.name]
        assert b.holders(["scope/9/9/*"]) == [a.name]  # announced by nobody: every sibling
        b.want(["learned/1.2.6"])
        b.want(["end"])  # (datagrams arrive in order: a want sent by the waiters would be heard first)
        await until(lambda: len(heard) >= 2)
        assert heard == [digest("learned/1.2.6"), digest("end")]


def test_claims_leave_most_descriptors_to_connections(monkeypatch):
    """A worker under a low descriptor limit (1,024 is a common default) claims at most an eighth of it."""
    import resource

    from proxy.coordination import siblings

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    assert siblings._claims_allowed() == 128
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1 << 20, 1 << 20))
    assert siblings._claims_allowed() == siblings.MAX_CLAIMS


async def test_no_claim_beyond_the_limit(tmp_path):
    async with pair(tmp_path) as (a, b):
        a.max_claims = 2
        assert a.claim(["k/1", "k/2"]) and a.claim(["k/3"])  # the third goes ahead unclaimed
        assert not b.claim(["k/1"]) and b.claim(["k/3"])


async def test_a_failed_settle_gives_its_waiters_the_leaders_status(tmp_path):
    """A leader whose archive refused (404) settles with that status: a sibling waiting for the key fails with
    it instead of finding a miss and asking the archive again; messages around it are read whole."""
    from proxy.errors import Problem

    async with pair(tmp_path) as (a, b):
        a.announce("frame/1.2.3/1")
        await until(lambda: b.flying("frame/1.2.3/1") is not None)
        refused, landed = b.flying("frame/1.2.3/1"), b.landing("frame/1.2.3/2")
        a.settle("frame/1.2.3/1", failure=404)  # (queued in one datagram with the next message)
        a.settle("frame/1.2.3/2")
        assert await settled(landed) and landed.result() is None
        await asyncio.wait([refused], timeout=5)
        with pytest.raises(Problem) as failed:
            refused.result()
        assert failed.value.status == 404 and "1.2.3" not in failed.value.reason


def test_datagrams_never_cut_a_message():
    from proxy.coordination.siblings import DATAGRAM, _datagrams, _messages

    messages = [b"A" + bytes(12), b"F" + bytes(12) + (502).to_bytes(2, "big"), b"S" + bytes(12)] * 5000
    datagrams = list(_datagrams(messages))
    assert len(datagrams) > 1 and all(len(d) <= DATAGRAM for d in datagrams)
    read = [m for d in datagrams for m in _messages(d)]
    assert [(kind, status) for kind, _, status in read] == [(b"A", None), (b"F", 502), (b"S", None)] * 5000
