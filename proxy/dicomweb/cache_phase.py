"""The cache phase: one way every cached object is served (frames, instances, bulk data, renderings,
thumbnails, metadata).

    key → lookup (memory, disk) → complete? ── admit → answer from the cache (no archive I/O)
                                   │ no
                                   ▼
              coalesce: follow what brings it (another request, a retrieve, a sibling worker), look again
                                   │ still missing
                                   ▼
              lead its flight → admit what was found → fetch from the archive, streamed to the client and
              teed into the cache; the flight lands as the tee stores, and ends with the response

What differs between kinds of object is an `Item` (frames.py, objects.py, metadata.py): its keys, how it
is looked up, answered and fetched. What is the same is here, once: the order of the steps, the one call
to the pass-through rule (`access.admit`, before anything cached is served), following and leading
(coordination/flights.py), handing a leader's failure to its followers, and ending the flight whatever
happens to the fetch.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from proxy.auth import access
from proxy.coordination.flights import Flight
from proxy.dicomweb.context import Context
from proxy.dicomweb.responses import AnyResponse, StreamResponse
from proxy.errors import Problem
from proxy.observability import metrics

LEAD_TRIES = 3  # looks for what brings the object, each ending in a try to lead; then fetched unled


class Item(Protocol):
    """One cached object as the cache phase sees it: what a request asks for, and what was found of it."""

    study: str  # the study it belongs to (what the pass-through rule admits a caller to)
    want: bool  # followers ask sibling workers to write what they hold back (frames)

    async def look(self, heard_by: tuple[str, ...]) -> bool:
        """Look the cache up (for one of the audiences `heard_by`): True when all of it was found."""

    def adopt(self, values: list[Any]) -> bool:
        """Take what a leader handed over with its flight's end (a document); True when that is all of it."""

    def audiences(self) -> set[str]:
        """Whose answers what was found so far are (empty: nothing found)."""

    def keys(self) -> list[str]:
        """The flight keys of what is still missing."""

    def carriers(self, ctx: Context) -> list[asyncio.Future[Any]]:
        """What else brings what is missing, besides flights of its keys (a retrieve, a sibling's memory)."""

    def answer(self) -> AnyResponse:
        """The answer made of what was found (all of it)."""

    async def fetch(self, flight: Flight | None) -> AnyResponse:
        """Ask the archive for what is missing, teed into the cache (landing `flight`'s keys as they are kept)."""

    def hands(self, failure: Problem) -> bool:
        """Whether this failure of the archive is the answer of the requests that follow this one."""

    def stop(self) -> None:
        """The phase is over: stop whatever `carriers` started."""


async def serve(ctx: Context, item: Item) -> AnyResponse:
    """Serve `item` through the cache."""
    heard_by = access.audiences(ctx)
    flight = None
    try:
        complete = await item.look(heard_by)
        if not complete:
            complete, flight = await _coalesce(ctx, item, heard_by)
    finally:
        item.stop()
    if complete:
        await access.admit(ctx, item.study, item.audiences())
        return item.answer()
    try:
        if found := item.audiences():  # (led first: a request arriving meanwhile follows this one)
            await access.admit(ctx, item.study, found)
        response = await item.fetch(flight)
    except Problem as exc:
        if flight is not None:
            flight.end(exc if item.hands(exc) else None)
        raise
    except BaseException:
        if flight is not None:
            flight.end()
        raise
    if flight is not None:
        _end_with(response, flight)
    return response


async def _coalesce(ctx: Context, item: Item, heard_by: tuple[str, ...]) -> tuple[bool, Flight | None]:
    """(found all of it, the flight this request leads): what another request, retrieve or sibling is
    bringing is followed (up to the archives' idle_read) and looked up again; what is left is led."""
    flights = ctx.flights
    loop = asyncio.get_running_loop()
    deadline = None
    for _ in range(LEAD_TRIES):
        bringing = _bringing(ctx, item)
        if bringing and deadline is None:
            metrics.CACHE_WAITERS.inc()
            deadline = loop.time() + ctx.patience()
        while bringing and deadline is not None and (left := deadline - loop.time()) > 0:
            values = await flights.follow(bringing, left)
            if item.adopt(values) or await item.look(heard_by):
                return True, None
            # Still missing: what was bringing it may have handed over to another fetch (a prefetch that
            # stopped for a client's retrieve of the same series): follow that one too.
            bringing = [f for f in _bringing(ctx, item) if not f.done()]
        # Led here and claimed among the workers before the archive is asked: a sibling that missed the same
        # object in the same instant holds its claim now (its announcement still on its way): look again.
        flight = flights.lead(item.keys())
        if flight is not None:
            return False, flight
        if await item.look(heard_by):
            return True, None
    return False, None  # fetched unled


def _bringing(ctx: Context, item: Item) -> list[asyncio.Future[Any]]:
    return ctx.flights.carriers(item.keys(), item.want) + item.carriers(ctx)


def _end_with(response: AnyResponse, flight: Flight) -> None:
    """End `flight` once `response` has been sent (a stream: whatever happened to it), or now."""
    if not isinstance(response, StreamResponse):
        flight.end()
        return
    closing = response.on_close

    async def close() -> None:
        try:
            if closing is not None:
                await closing()
        finally:
            flight.end()  # whatever happened to the stream, nobody waits for it any more

    response.on_close = close
