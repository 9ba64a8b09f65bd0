"""Flights: the one way the proxy collapses identical fetches, across tasks and across worker processes.

A *flight* is a fetch in progress, named by the keys of what it brings: `frame/{sop}/{n}` (a frame, any
encoding), `object/...` and `metadata/...` (a cached object or document), `search/...`, `scope/{study}/
{series}/{instance}` (a retrieve, a prefetch included: it brings every frame of what it names),
`learned/{sop}` (an instance split into frames), `prefetch/{series}`.

Whoever needs what a key names either **leads** (`lead`: fetches it) or **follows** (`carriers`,
`landing`: waits for the leader's end, then looks the cache up). A leader *lands* each key once its
result is in this worker's cache; its followers here wake at once. A leader's failure (a 404, a 502) is
handed to its followers (`Flight.end(failure)`, raised by `follow`) and counted; a leader that is
cancelled (its client went away) lands nothing, and its followers fetch for themselves.

Across processes (`connect`, when sibling workers share the cache directory), through the channel of
siblings.py: a lead is *claimed* (an abstract socket only one process can bind: two workers missing the
same frame in the same instant ask the archive once) and *announced*; each key is *settled* once its
result is on the shared disk tier (`land(written=...)`), and a follower in a sibling waits for that; a
leader's failure is settled with its status, which the siblings' followers answer with too. A
follower that would wait for a sibling's disk write asks that sibling for the bytes it holds in memory
instead (`take`, the hand-over of handover.py), or says it *wants* them (the sibling writes them next).

`share` builds the value-sharing form on top (searches): followers here get the leader's value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from proxy.coordination.handover import Find, Given, Giver, Taker, giver_of
from proxy.coordination.siblings import Siblings, digest
from proxy.observability import metrics

T = TypeVar("T")


class Flight:
    """A fetch this worker leads, under one or more keys (`Flights.lead`)."""

    def __init__(self, flights: Flights, keys: Sequence[str], futures: list[asyncio.Future[object]],
                 told: bool) -> None:
        self._flights = flights
        self.keys = list(keys)
        self._futures = dict(zip(self.keys, futures, strict=True))
        self._told = told  # the siblings know of it: each key is settled with them
        self._writing: dict[str, Awaitable[object]] = {}

    def land(self, key: str, written: Awaitable[object] | None = None, value: object = None) -> None:
        """What `key` names is in this worker's cache (or will not be): its followers here wake now (with
        `value`), those in sibling workers once `written` (its disk write) is done."""
        fut = self._futures.pop(key, None)
        if fut is None:
            return
        self._flights._drop(key, fut)
        if not fut.done():
            fut.set_result(value)
        if self._told:
            self._flights._settle(key, written)

    def end(self, failure: BaseException | None = None, value: object = None) -> None:
        """The fetch is over: every key not landed yet lands now, with `value`, or with `failure` for the
        followers here (an archive's refusal is theirs too; None: they look for themselves)."""
        for key in list(self._futures):
            fut = self._futures[key]
            if failure is not None and not fut.done():
                self._futures.pop(key)
                self._flights._drop(key, fut)
                fut.set_exception(failure)
                if self._told:  # the siblings' followers answer with its status too
                    self._flights._settle(key, None, getattr(failure, "status", None))
            else:
                self.land(key, value=value)


class Shared(Generic[T]):
    """What a caller of `Flights.share` got: the value, and whether it fetched it itself (led) or waited."""

    __slots__ = ("value", "led")

    def __init__(self, value: T, led: bool) -> None:
        self.value = value
        self.led = led


class Flights:
    """This worker's flights, and its end of the channel to the sibling workers (once `connect`ed)."""

    def __init__(self) -> None:
        self._led: dict[str, list[asyncio.Future[object]]] = {}  # key → the futures of the flights bringing it
        self._landing: dict[str, asyncio.Future[None]] = {}  # key → done when it lands (no flight needed)
        self._channel: Siblings | None = None
        self._giver: Giver | None = None
        self._taker: Taker | None = None
        self._opening: asyncio.Task[bool] | None = None

    # -- leading ---------------------------------------------------------------------------------

    def lead(self, keys: Sequence[str], exclusive: bool = True, siblings: bool = True) -> Flight | None:
        """Lead the fetch of every key: None (leading none) when `exclusive` and another flight, here or in
        a sibling (its claim), brings one of them. Not `exclusive` (a retrieve: two clients may stream the
        same series): always a flight, the claims taken where free, so that siblings see it at once.
        `siblings` False: a flight of this worker only (its result is in no tier the siblings read)."""
        if exclusive and any(self._led.get(k) for k in keys):
            return None
        channel = self._channel if siblings else None
        claimed = channel.claim(list(keys)) if channel is not None else True
        if exclusive and not claimed:
            return None
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[object]] = []
        for key in keys:
            fut: asyncio.Future[object] = loop.create_future()
            fut.add_done_callback(_seen)
            self._led.setdefault(key, []).append(fut)
            futures.append(fut)
            if channel is not None:
                channel.announce(key)
        return Flight(self, keys, futures, channel is not None)

    def land(self, key: str, written: Awaitable[object] | None = None) -> None:
        """What `key` names is in this worker's cache now without a flight of its own (an instance split
        off a retrieve): who waits for its `landing` wakes; siblings once `written` is done."""
        fut = self._landing.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
        self._settle(key, written)

    def _drop(self, key: str, fut: asyncio.Future[object]) -> None:
        live = self._led.get(key)
        if live is not None and fut in live:
            live.remove(fut)
            if not live:
                del self._led[key]

    def _settle(self, key: str, written: Awaitable[object] | None, failure: int | None = None) -> None:
        channel = self._channel
        if channel is None:
            return
        if written is None:
            channel.settle(key, failure if isinstance(failure, int) else None)
        else:
            asyncio.ensure_future(written).add_done_callback(lambda _: channel.settle(key))

    # -- following -------------------------------------------------------------------------------

    def carriers(self, keys: Iterable[str], want: bool = True, here: bool = True,
                 siblings: bool = True) -> list[asyncio.Future[Any]]:
        """What is bringing any of `keys`: flights `here`, and flights of `siblings` (done when they settle).
        `want`: say that this worker waits, so that a sibling holding one back writes it next."""
        keys = list(keys)
        found: list[asyncio.Future[Any]] = [f for k in keys for f in self._led.get(k, ()) if not f.done()] \
            if here else []
        if siblings and self._channel is not None:
            found += [f for k in keys if (f := self._channel.flying(k, want)) is not None]
        return found

    def here(self, keys: Iterable[str]) -> bool:
        """Whether a flight of this worker brings any of `keys`."""
        return any(self._led.get(k) for k in keys)

    def landing(self, key: str, want: bool = True, siblings: bool = True) -> list[asyncio.Future[Any]]:
        """Done when `key` lands here (`land`), and (`siblings`) when a sibling settles it."""
        fut = self._landing.get(key)
        if fut is None or fut.done():
            fut = self._landing[key] = asyncio.get_running_loop().create_future()
        if self._channel is None or not siblings:
            return [fut]
        return [fut, self._channel.landing(key, want)]

    async def follow(self, carriers: Sequence[asyncio.Future[Any]], patience: float) -> list[Any]:
        """Wait for the first of `carriers` to end, up to `patience` seconds: the values their leaders
        handed over (`Flight.end(value=...)`); a leader's failure is raised (and counted)."""
        if carriers and patience > 0:
            await asyncio.wait([asyncio.shield(f) for f in carriers], timeout=patience,
                               return_when=asyncio.FIRST_COMPLETED)
        values = []
        for f in carriers:
            if not f.done() or f.cancelled():
                continue
            if (exc := f.exception()) is not None:
                metrics.SHARED_FAILURES.labels(str(getattr(exc, "status", 500))).inc()
                raise exc
            if f.result() is not None and f.result() is not _LET_GO:
                values.append(f.result())
        return values

    async def share(self, key: str, fetch: Callable[[], Awaitable[T]], patience: float,
                    look: Callable[[], Awaitable[T | None]] | None = None, siblings: bool = True) -> Shared[T]:
        """`fetch()` once for the concurrent callers with `key`. A follower here gets the leader's value (or
        its failure); one in a sibling gets what `look()` finds in the cache once the sibling's leader is
        done (nothing: it fetches for itself). A leader cancelled, or past `patience`: the follower fetches
        for itself. `siblings` False: shared in this worker only (what the siblings keep in no shared tier)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        counted = False
        while True:
            local = [f for f in self._led.get(key, ()) if not f.done()]
            flight = None if local else self.lead([key], siblings=siblings)
            if flight is not None:
                return await self._fetch(flight, key, fetch)
            if not counted:
                metrics.CACHE_WAITERS.inc()
                counted = True
            left = max(deadline - loop.time(), 0.0)
            if not local:  # a sibling fetches it: its answer will be in the disk tier
                await self.follow(self.carriers([key], want=False), left)
                found = await look() if look is not None else None
                if found is not None:
                    return Shared(found, False)
                break
            try:
                value = await asyncio.wait_for(asyncio.shield(local[0]), left)
            except TimeoutError:
                break
            except Exception as exc:
                metrics.SHARED_FAILURES.labels(str(getattr(exc, "status", 500))).inc()
                raise
            if value is not _LET_GO:
                return Shared(value, False)  # type: ignore[arg-type]
        return Shared(await fetch(), True)  # (unled: nothing to hand over)

    async def _fetch(self, flight: Flight, key: str, fetch: Callable[[], Awaitable[T]]) -> Shared[T]:
        try:
            value = await fetch()
        except asyncio.CancelledError:
            flight.end(value=_LET_GO)
            raise
        except Exception as exc:
            flight.end(exc)
            raise
        except BaseException:
            flight.end(value=_LET_GO)
            raise
        flight.end(value=value)
        return Shared(value, True)

    # -- the siblings ----------------------------------------------------------------------------

    def connect(self, channel: Siblings, find: Find | None, check: Callable[[bytes | bytearray], int]) -> None:
        """Coordinate with the sibling workers through `channel` (open); `find`: hand them what this
        worker holds in memory (the hand-over; None: they read the disk tier); `check` a payload's checksum."""
        self._channel = channel
        if find is not None:
            self._giver, self._taker = Giver(giver_of(channel.name), find), Taker(check)
            self._opening = asyncio.ensure_future(self._giver.start())

    async def close(self) -> None:
        """Leave the channel; waiters are released (they find a miss and fetch for themselves)."""
        if self._giver is not None:
            await self._giver.close()
        if self._taker is not None:
            self._taker.close()
        if self._channel is not None:
            self._channel.close()
        self._channel = self._giver = self._taker = self._opening = None

    @property
    def channel(self) -> Siblings | None:
        """The channel to the siblings, None without one."""
        return self._channel

    def alone(self) -> bool:
        """Whether this worker knows it has no sibling (False without a channel: then it cannot know)."""
        return self._channel is not None and not self._channel.peers_now()

    def token(self, key: str) -> bytes:
        """What the siblings call `key` (a digest: keys hold UIDs), as the disk writer's queue knows it."""
        return digest(key)

    def want(self, keys: list[str]) -> None:
        """This worker waits for `keys` on the disk tier: a sibling holding them back writes them next."""
        if self._channel is not None:
            self._channel.want(keys)

    def preempt(self, key: str) -> None:
        """A client of this worker fetches what `key` names: a sibling fetching it in the background (a
        prefetch) may stop."""
        if self._channel is not None:
            self._channel.ask_to_yield(key)

    @property
    def can_take(self) -> bool:
        """Whether the siblings can be asked for results they hold in memory (the hand-over runs)."""
        op = self._opening
        return op is not None and op.done() and not op.cancelled() and bool(op.result())

    async def take(self, keys: list[str], fields: tuple[str, ...], wait: float) -> Given | None:
        """What the sibling leading one of `keys` holds in memory under `fields` (the giver's `find`),
        waiting up to `wait` seconds for it to arrive there; None when no sibling hands it over."""
        if self._taker is None or self._channel is None or not self.can_take:
            return None
        for sibling in self._channel.holders(keys):
            given = await self._taker.ask(giver_of(sibling), fields, wait)
            if given is not None:
                return given
        return None


_LET_GO = object()  # the leader was cancelled: its followers fetch for themselves


def _seen(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled():
        fut.exception()  # (a leader's failure nobody followed is not "never retrieved")
