"""One upstream request for concurrent identical misses of a cached document or whole object.

Frames have their own single-flight (frames.py, flights.py: across frame lists, retrieves and
workers). Here, for everything else the cache keeps (metadata documents; instances, bulk data,
rendered images and thumbnails): the first request that misses a key *leads* and fetches it; the
others that miss the same key meanwhile *follow*, waiting for the leader's result instead of asking the
archive. A leader's error (a 404, a 502) is every follower's too; a leader whose client went
away leaves the fetch to its first follower.

Across workers the leader also holds the key's claim (siblings.py) until its answer is in the shared
disk tier: a sibling that misses the same key meanwhile waits for the claim's settle and reads it there.
(Searches, which the siblings keep in no shared tier unless Redis is configured, are shared within a
worker only.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from proxy.coordination import siblings
from proxy.observability import metrics

T = TypeVar("T")
_leaders: dict[str, asyncio.Future[object]] = {}
_LET_GO = object()  # the leader was cancelled: a follower leads instead


class Shared(Generic[T]):
    """What a request got: the fetched value, and whether it fetched it itself (led) or waited."""

    __slots__ = ("value", "led")

    def __init__(self, value: T, led: bool) -> None:
        self.value = value
        self.led = led


async def shared(key: str, fetch: Callable[[], Awaitable[T]], patience: float,
                 look: Callable[[], Awaitable[T | None]] | None = None, across: bool = True) -> Shared[T]:
    """`fetch()` once for the concurrent callers with this `key`, in this worker and its siblings. A
    follower in this worker gets the leader's value (or raises its exception); one in a sibling gets what
    `look()` finds in the cache once the sibling's leader is done (None, or no `look`: it fetches for
    itself). After `patience` seconds of waiting a follower fetches for itself. `across`: the siblings
    share the answer too (what they cannot read from a tier of their own is shared in this worker only)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    counted = claimed = False
    while True:
        lead = _leaders.get(key)
        if lead is None and (not across or siblings.claim([key])):
            claimed = across
            break
        if not counted:
            metrics.CACHE_WAITERS.inc()
            counted = True
        left = max(deadline - loop.time(), 0.0)
        if lead is None:  # a sibling fetches it: its answer will be in the disk tier
            sibling = siblings.flying(key, want=False)
            if sibling is not None and left > 0:
                await asyncio.wait([asyncio.shield(sibling)], timeout=left)
            found = await look() if look is not None else None
            if found is not None:
                return Shared(found, False)
            break  # (it failed, or is too slow: fetch it here)
        try:
            value = await asyncio.wait_for(asyncio.shield(lead), left)
        except TimeoutError:
            break
        except Exception as exc:  # the leader's failure is this request's answer too: counted as such
            metrics.SHARED_FAILURES.labels(str(getattr(exc, "status", 500))).inc()  # (at once: rare)
            raise
        if value is _LET_GO:
            continue
        return Shared(value, False)  # type: ignore[arg-type]
    mine: asyncio.Future[object] | None = None
    if key not in _leaders:
        mine = _leaders[key] = loop.create_future()
        mine.add_done_callback(_retrieved)
    try:
        value = await fetch()
    except asyncio.CancelledError:
        _end(key, mine, _LET_GO, claimed)
        raise
    except BaseException as exc:
        _end(key, mine, exc, claimed)
        raise
    _end(key, mine, value, claimed)
    return Shared(value, True)


def _end(key: str, mine: asyncio.Future[object] | None, outcome: object, claimed: bool) -> None:
    if claimed:
        siblings.settle(key)  # its claim ends: the answer is in the disk tier, or will not be
    if mine is None:
        return
    if _leaders.get(key) is mine:
        del _leaders[key]
    if not mine.done():
        if isinstance(outcome, BaseException):
            mine.set_exception(outcome)
        else:
            mine.set_result(outcome)


def _retrieved(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled():
        fut.exception()  # (seen: a leader's error nobody followed is not "never retrieved")


class Lead:
    """A fetch this request leads (`wait_or_lead`): `end()` once its answer is in this worker's cache, or
    will not be. A sibling waiting for it is told once the disk write `writing` (if any) is done."""

    def __init__(self, key: str, fut: asyncio.Future[object], claimed: bool) -> None:
        self.key = key
        self.fut = fut
        self.claimed = claimed
        self.writing: asyncio.Future[None] | None = None  # the answer on its way to the disk tier

    def end(self) -> None:
        if _leaders.get(self.key) is self.fut:
            del _leaders[self.key]
        if not self.fut.done():
            self.fut.set_result(None)
        if self.claimed:
            self.claimed = False
            if self.writing is not None and not self.writing.done():
                self.writing.add_done_callback(lambda _: siblings.settle(self.key))
            else:
                siblings.settle(self.key)


async def wait_or_lead(key: str, patience: float) -> Lead | None:
    """For answers that stream to their client while the cache keeps them (no value to share): the
    first of the concurrent misses of `key`, in this worker and its siblings, gets a Lead, and fetches;
    the others wait for its end (up to `patience` seconds) and get None: they look the cache up again
    (a sibling's answer in the disk tier), and fetch for themselves what it does not hold (too large to
    keep, or the leader failed)."""
    lead = _leaders.get(key)
    if lead is None and siblings.claim([key]):
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        _leaders[key] = fut
        return Lead(key, fut, True)
    metrics.CACHE_WAITERS.inc()
    waiting = lead if lead is not None else siblings.flying(key, want=False)
    if waiting is not None:
        try:
            await asyncio.wait_for(asyncio.shield(waiting), patience)
        except TimeoutError:
            pass
    return None
