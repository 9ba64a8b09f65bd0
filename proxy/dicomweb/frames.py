"""Frames retrieve through the cache: hits from the cache, only the missing frames from the archive.

Phases: negotiate → look every requested frame up (cache.py) → all hit: answer from the cache with a
Content-Length, a strong ETag (304 on If-None-Match) and `X-Cache: HIT`, no archive I/O → otherwise
one upstream request for the missing frames only, streamed to the client in the requested order,
interleaved with the cached ones, each upstream frame stored as it completes (a broken stream never
stores a partial frame).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.cache.learning import learned_key, scope_keys
from proxy.cache.placement import SHARED, Placement
from proxy.cache.store import Frame, FrameCache, checksum_of
from proxy.coordination.flights import Flight
from proxy.dicomweb import cache_phase
from proxy.dicomweb.context import Context
from proxy.dicomweb.fetch import open_upstream, upstream_problem
from proxy.dicomweb.reframe import PartOut, Reframer, label
from proxy.dicomweb.responses import AnyResponse, BuffersResponse, StreamResponse
from proxy.dicomweb.retrieve import retrieve
from proxy.dicomweb.target import Target, dicomweb_base, select, upstream_accept
from proxy.errors import Problem, StreamAborted
from proxy.formats.media import Resource, Selection, parse_content_type
from proxy.formats.multipart import MultipartError, MultipartWriter, PartHeaders, whole
from proxy.observability import metrics
from proxy.upstream.archive import UpstreamError
from proxy.upstream.parts import Held, PartEvents, part_payload

CACHE_CONTROL = ("Cache-Control", "private, max-age=86400")
LOOKED_UP = "dicomweb_edge.looked_up"  # scope key: (Target, Selection, hits) of the cache phase's lookup


def frame_key(sop: str, frame: int) -> str:
    """The flight key of a frame (any encoding: a follower looks its own up once the flight lands)."""
    return f"frame/{sop}/{frame}"


def handed_failure(exc: Problem) -> bool:
    """Whether an archive's refusal of a frame fetch is its followers' answer too: only what does not depend
    on the encoding asked (the instance is not there, the archive fails), since they may ask for another."""
    return exc.status in (404, 410) or exc.status >= 500


def placed(target: Target, audience: str = SHARED) -> str:
    """The cache's name of the instance a frames URL names, placed where the URL says (placement.py)."""
    assert target.instance is not None
    return Placement(target.study, target.series or "", audience).key(target.instance)


def _store(ctx: Context, cache: FrameCache, place: Placement, sop: str, frame: int, content_type: str,
           pieces: list[bytes | memoryview], flight: Flight | None, native: bool) -> None:
    """Keep a frame the archive sent (`native`: what it answered to `transfer-syntax=*`, its own encoding)."""
    mtype, params = parse_content_type(content_type)
    ts = params.get("transfer-syntax")
    if not mtype or not ts:
        return  # an unlabelled frame cannot be keyed truthfully
    payload = whole(pieces)  # (no copy when the frame was received whole into a buffer of its own)
    checksum = checksum_of(payload)  # once, for the memory tier and the disk tier's entry
    item = place.key(sop)
    key = frame_key(sop, frame)
    if not cache.put(item, frame, mtype, ts, payload, checksum, native):
        if flight is not None:
            flight.land(key)
        return
    # Visible to this worker now, to all once on disk. Held back for a quiet moment like what a retrieve or
    # prefetch brings (cache/learning.py): the writes no longer share the cores with the viewers (1 worker, no
    # prefetch: the proxy's CPU 670 -> 410 ms over a cold viewer, 160 -> 80 ms over the next one), and a
    # sibling serving the same viewer asks for it from memory (the hand-over; 2 workers, no prefetch: the
    # first viewer 0.380 -> 0.300 s). Without the hand-over, a sibling would wait for the disk: then written
    # at once (held back, the second viewer took 0.32 s against 0.22 s).
    flights = ctx.flights
    written = cache.write_soon([(item, frame, mtype, ts, payload, checksum, native)], place.study, flights.token(key),
                               defer=flights.alone() or flights.can_take)
    if flight is not None:
        flight.land(key, written)  # followers here look it up now; siblings read it from disk once written


def lookup(cache: FrameCache, target: Target, sel: Selection, heard_by: tuple[str, ...] = (SHARED,),
           memory_only: bool = False) -> dict[int, Frame]:
    """The requested frames the cache holds under the URL's study and series, answered for one of the
    audiences `heard_by` (placement.py; serve them once `access.admit` let the caller have them), by frame
    number (`memory_only`: this worker's memory tier, and not counted in the lookup metrics)."""
    assert target.instance is not None and target.frames is not None
    found: dict[int, Frame] = {}
    items = [(audience, placed(target, audience)) for audience in heard_by]
    for n in target.frames:
        for audience, item in items:
            hit = cache.get(item, n, sel.media_type, sel.transfer_syntax or "*",
                            count=not memory_only, memory_only=memory_only)
            if hit is not None:
                found[n] = hit if audience == SHARED else replace(hit, audience=audience)
                break
    return found


def from_cache(if_none_match: str, target: Target, sel: Selection, hits: dict[int, Frame],
               base: str) -> Response | BuffersResponse:
    """Answer from the cache: no archive I/O, no parsing, the cached bytes handed to the server as they are."""
    etag, headers, chunks = cached_answer(target, sel, hits, base)
    if etag in if_none_match:
        return Response(None, 304, headers=dict(headers[:4]))
    return BuffersResponse(200, headers, chunks)  # each piece written as is: no join, no copy


def cached_answer(target: Target, sel: Selection, hits: dict[int, Frame],
                  base: str) -> tuple[str, list[tuple[str, str]], list[bytes | memoryview]]:
    """(ETag, headers, body pieces) of the 200 answer made of `hits`: the headers start with the four a
    304 carries too (ETag, Vary, X-Cache, Cache-Control); the pieces are the frames' payloads themselves
    (the very objects) between the multipart framing."""
    assert target.frames is not None
    frames = [hits[n] for n in target.frames]
    etag = frames[0].etag if len(frames) == 1 else (
        '"' + format(checksum_of("".join(f.etag for f in frames).encode()), "016x") + f'-{len(frames)}"')
    headers = [("ETag", etag), ("Vary", "Accept"), ("X-Cache", "HIT"), CACHE_CONTROL]
    chunks: list[bytes | memoryview]
    if not sel.multipart:
        chunks = [frames[0].payload]
        ctype = frames[0].content_type
    else:
        writer = MultipartWriter()
        chunks = []
        for n, f in zip(target.frames, frames, strict=True):
            loc = base + Target(target.study, target.series, target.instance, (n,)).path()
            chunks += [writer.part(f.content_type, loc, len(f.payload)), f.payload]
        chunks.append(writer.close())
        ctype = writer.content_type(parse_content_type(frames[0].content_type)[0])
    headers += [("Content-Type", ctype), ("Content-Length", str(sum(len(c) for c in chunks)))]
    return etag, headers, chunks


def _sibling_keys(target: Target, n: int) -> list[str]:
    """Every key a sibling bringing frame `n` may lead it under."""
    assert target.instance is not None
    return [frame_key(target.instance, n), learned_key(target.instance),
            *scope_keys(target.study, target.series, target.instance)]


async def _take(ctx: Context, cache: FrameCache, target: Target, sel: Selection, n: int, wait: float) -> None:
    """Ask the siblings bringing frame `n` for its bytes (into this worker's memory tier); when none
    hands it over, ask them to write it to disk instead (the waiter then reads it there)."""
    assert target.instance is not None
    keys = _sibling_keys(target, n)
    fields = (target.study, target.series or "", target.instance, str(n), sel.media_type, sel.transfer_syntax or "*")
    given = await ctx.flights.take(keys, fields, wait)
    if given is not None:
        cache.put(placed(target), n, given.media_type, given.transfer_syntax,
                  given.payload, given.checksum, native=False)  # (a memoryview of a buffer of its own, as a split's)
        metrics.TALLY.inc(metrics.CACHE_HANDOVERS.labels("given"))
        return
    metrics.TALLY.inc(metrics.CACHE_HANDOVERS.labels("none"))
    ctx.flights.want(keys)


async def give(ctx: Context, fields: tuple[str, ...], wait: float) -> tuple[bytes | memoryview, int, str, str] | None:
    """What this worker hands a sibling (the hand-over): the frame `fields` name (study, series, SOP
    Instance UID, number, media type, transfer syntax) from its memory tier, waiting up to `wait` seconds
    while a fetch or retrieve here is bringing it; None when it does not hold it. Only what the proxy
    learned with its own credentials, placed where the sibling's URL says (placement.py)."""
    study, series, sop, number, media_type, transfer_syntax = fields
    frame, cache = int(number), ctx.cache
    if cache is None:
        return None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    item = Placement(study, series).key(sop)
    flights = ctx.flights
    while True:
        hit = cache.get(item, frame, media_type, transfer_syntax, count=False, memory_only=True)
        if hit is not None:
            return hit.payload, hit.checksum, hit.media_type, hit.transfer_syntax
        bringing = flights.carriers([frame_key(sop, frame)], siblings=False)
        if scopes := flights.carriers(scope_keys(study, series or None, sop), siblings=False):
            bringing += [*flights.landing(learned_key(sop), siblings=False), *scopes]
        if not bringing or (left := deadline - loop.time()) <= 0:
            return None
        await asyncio.wait([asyncio.shield(f) for f in bringing], timeout=left, return_when=asyncio.FIRST_COMPLETED)


class _Frames:
    """A frames request as the cache phase (cache_phase.py) serves it: the frames the cache holds, and the
    missing ones fetched in one upstream request, streamed in the requested order between the cached ones."""

    def __init__(self, request: Request, ctx: Context, cache: FrameCache, target: Target, sel: Selection,
                 handed: dict[int, Frame] | None) -> None:
        assert target.instance is not None and target.frames is not None
        self.request, self.ctx, self.cache, self.target, self.sel = request, ctx, cache, target, sel
        self.instance, self.frames = target.instance, target.frames
        self.study = target.study
        self.base = dicomweb_base(request, ctx.settings, ctx.root)
        self.hits: dict[int, Frame] = {}
        self.handed = handed  # what the hit lane found (and counted) already
        self.want = not ctx.flights.can_take  # (asked over the hand-over instead: no disk write needed)
        self.asks: list[asyncio.Future[None]] = []

    def missing(self) -> tuple[int, ...]:
        return tuple(n for n in dict.fromkeys(self.frames) if n not in self.hits)

    async def look(self, heard_by: tuple[str, ...]) -> bool:
        if self.handed is not None:
            self.hits, self.handed = self.handed, None
        else:
            self.hits = lookup(self.cache, self.target, self.sel, heard_by)
        return not self.missing()

    def adopt(self, values: list[Any]) -> bool:
        return False

    def audiences(self) -> set[str]:
        return {f.audience for f in self.hits.values()}

    def keys(self) -> list[str]:
        return [frame_key(self.instance, n) for n in self.missing()]

    def carriers(self, ctx: Context) -> list[asyncio.Future[Any]]:
        """The retrieves (a prefetch included) whose answer carries the instance, here or in a sibling; and
        when only siblings bring the missing frames, asks for them (the hand-over), made once."""
        t, flights = self.target, ctx.flights
        arriving = ctx.learner.arrivals(t.study, t.series, self.instance, self.want)
        keys = self.keys()
        if not self.asks and not self.want and keys and not flights.carriers(keys, siblings=False) \
                and not flights.here(scope_keys(t.study, t.series, self.instance)) \
                and (arriving or flights.carriers(keys, False, here=False)):
            self.asks = [asyncio.ensure_future(_take(ctx, self.cache, t, self.sel, n, ctx.patience()))
                         for n in self.missing()]
        return arriving + [a for a in self.asks if not a.done()]

    def answer(self) -> AnyResponse:
        return from_cache(self.request.headers.get("if-none-match", ""), self.target, self.sel, self.hits, self.base)

    async def fetch(self, flight: Flight | None) -> AnyResponse:
        return await _fetch(self.request, self.ctx, self.target, self.sel, self.base, self.cache, self.hits,
                            self.missing(), flight)

    def hands(self, failure: Problem) -> bool:
        return handed_failure(failure)

    def stop(self) -> None:
        for a in self.asks:
            a.cancel()


async def frames(request: Request, ctx: Context, target: Target) -> AnyResponse:
    """`.../instances/{sop}/frames/{list}`, through the frame cache when one is configured."""
    cache = ctx.cache
    if cache is None:
        return await retrieve(request, ctx, target, Resource.FRAMES, "frames")
    assert target.frames is not None and target.instance is not None
    sel = select(request, Resource.FRAMES, len(target.frames) == 1)
    handed = request.scope.pop(LOOKED_UP, None)  # what the hit lane found (and counted) already
    hits = handed[2] if handed is not None and handed[:2] == (target, sel) else None
    return await cache_phase.serve(ctx, _Frames(request, ctx, cache, target, sel, hits))


async def _fetch(request: Request, ctx: Context, target: Target, sel: Selection, base: str, cache: FrameCache,
                 hits: dict[int, Frame], missing: tuple[int, ...], flight: Flight | None) -> StreamResponse:
    """One upstream request for the missing frames, streamed and teed."""
    assert target.instance is not None
    fetch = Target(target.study, target.series, target.instance, missing)
    candidates = await ctx.archives_for(target.study)
    if not candidates:
        raise Problem(404, "no archive holds this study")
    accept, _ = upstream_accept(Selection(True, sel.media_type, sel.transfer_syntax), Resource.FRAMES,
                                candidates[0])
    resp, stack = await open_upstream(ctx, target.study, fetch.path(), accept, request, "frames",
                                      archives=candidates)
    try:
        if resp.status >= 300:
            raise upstream_problem(resp, sel)
        events = PartEvents(resp)
        rf = Reframer(sel, base)
        first = await events.first()
        if first is None:
            raise Problem(502, f"archive '{resp.archive.name}' returned no frames")
        part = await label(events, first, sel)
    except (UpstreamError, MultipartError) as exc:
        await stack.aclose()
        raise Problem(502, f"archive '{resp.archive.name}': {exc}") from None
    except BaseException:
        await stack.aclose()
        raise
    headers = [("Vary", "Accept"), ("X-Cache", "PARTIAL" if hits else "MISS"), CACHE_CONTROL]
    # Kept where the archive answered it: the study and series of the URL it answered 200, for its audience.
    place = Placement(target.study, target.series or "", resp.archive.audience)
    if not sel.multipart:
        headers.append(("Content-Type", part.content_type))
        if part.length is not None and not part.held:
            headers.append(("Content-Length", str(part.length)))
        body = _single(ctx, cache, target, place, events, part, flight, sel.transfer_syntax == "*")
    else:
        ctype = rf.writer.content_type(parse_content_type(part.content_type)[0])
        headers.append(("Content-Type", ctype))
        body = _interleaved(ctx, cache, target, place, hits, events, part, rf, base, flight)

    async def close() -> None:
        if flight is not None:
            flight.end()  # whatever happened to the stream, nobody waits for it any more
        await stack.aclose()

    return StreamResponse(200, headers, body, close)


async def _single(ctx: Context, cache: FrameCache, target: Target, place: Placement, events: PartEvents,
                  part: PartOut, flight: Flight | None, part_native: bool) -> AsyncIterator[bytes | memoryview]:
    assert target.frames is not None and target.instance is not None
    held = Held(cache.max_entry)
    try:
        async for piece in part_payload(events, part.held, held):
            yield piece
    except (UpstreamError, MultipartError) as exc:
        raise StreamAborted(str(exc)) from None
    if held.pieces is not None:
        _store(ctx, cache, place, target.instance, target.frames[0], part.content_type, held.pieces, flight,
               part_native)
    await events.finish()


async def _interleaved(ctx: Context, cache: FrameCache, target: Target, place: Placement, hits: dict[int, Frame],
                       events: PartEvents, part: PartOut | None, rf: Reframer, base: str,
                       flight: Flight | None) -> AsyncIterator[bytes | memoryview]:
    assert target.frames is not None and target.instance is not None
    fetched: dict[int, Frame] = {}
    try:
        for n in target.frames:
            loc = base + Target(target.study, target.series, target.instance, (n,)).path()
            cached = hits.get(n) or fetched.get(n)
            if cached is not None:
                yield rf.writer.part(cached.content_type, loc, len(cached.payload))
                yield cached.payload
                continue
            if part is None:
                nxt = await events.next()
                if not isinstance(nxt, PartHeaders):
                    raise MultipartError("the archive sent fewer frames than asked for")
                part = await label(events, nxt, rf.sel)
            yield rf.writer.part(part.content_type, loc, part.length)
            repeated = target.frames.count(n) > 1  # asked again later in the list: hold it whatever its size
            held = Held(1 << 62 if repeated else cache.max_entry)
            async for piece in part_payload(events, part.held, held):
                yield piece
            pieces = held.pieces or []
            mtype, params = parse_content_type(part.content_type)
            if held.pieces is not None:
                _store(ctx, cache, place, target.instance, n, part.content_type, pieces, flight,
                       rf.sel.transfer_syntax == "*")
            if repeated:
                fetched[n] = Frame(whole(pieces), mtype, params.get("transfer-syntax", ""))
            part = None
        yield rf.close()
        await events.finish()
    except (UpstreamError, MultipartError) as exc:
        raise StreamAborted(str(exc)) from None
