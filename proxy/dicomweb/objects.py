"""Whole objects through the cache: single instances, bulk data, rendered images and thumbnails.

They share the frame cache's tiers, size bound and checks (checksum, length), tagged `obj:{study}` so that a
purge of the study or a store into it drops them. Keys name the bytes, never a URL; {placed X} is X with
the study and series the archive answered it under and whose answer it was (placement.py):

    instance/{placed SOP}/{media type}/{transfer syntax}   (+ instance-any/{placed SOP}/{media type} → the
                                                             cached syntax, so `transfer-syntax=*` reuses it)
    bulkdata/{placed SOP/attribute path}/{media type}/{transfer syntax asked}
    rendered|thumbnail/{placed UID/frames/rendering parameters, sorted}/{media type}/-

A value is the part's Content-Type, a NUL, then the payload. A hit is answered from the cache with no
archive I/O, a Content-Length, a strong ETag (304 on If-None-Match) and `X-Cache: HIT`; a miss streams
from the archive (`X-Cache: MISS`) and is stored only once the whole payload passed through.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.cache.placement import SHARED, Placement
from proxy.cache.store import FrameCache
from proxy.coordination.flights import Flight
from proxy.dicomweb import cache_phase, retrieve
from proxy.dicomweb.context import Context
from proxy.dicomweb.responses import AnyResponse, BuffersResponse, StreamResponse
from proxy.dicomweb.target import Target, dicomweb_base, select
from proxy.errors import Problem
from proxy.formats.media import Resource, Selection, parse_content_type
from proxy.formats.multipart import MultipartWriter
from proxy.upstream.archive import Archive
from proxy.upstream.parts import Keep

IMMUTABLE = "private, max-age=86400"  # an instance's bytes never change under its SOP Instance UID
REVALIDATE = "private, no-cache"  # a study or series rendering changes as instances arrive
HIERARCHY = re.compile(r"/studies/([0-9.]+)/series/([0-9.]+)/instances/([0-9.]+)/(.+)$")


@dataclass(frozen=True)
class Entry:
    """A cached object: its Content-Type and payload, and the checksum of the stored value."""

    content_type: str
    payload: memoryview
    checksum: int
    size: int  # of the stored value
    audience: str = SHARED  # whose answer it was (placement.py)

    def etag(self, multipart: bool) -> str:
        """A strong validator of the representation (single-part and multipart differ)."""
        return f'"{self.checksum:016x}-{self.size:x}{"-m" if multipart else ""}"'


def _encode(content_type: str, payload: bytes) -> bytes:
    return content_type.encode("latin-1") + b"\0" + payload


def _decode(value: bytes | memoryview, checksum: int, audience: str) -> Entry | None:
    cut = bytes(value[:1024]).find(b"\0")
    if cut < 0:
        return None
    return Entry(bytes(value[:cut]).decode("latin-1"), memoryview(value)[cut + 1 :], checksum, len(value), audience)


@dataclass(frozen=True)
class Key:
    """Where one object lives in the cache: its kind, what names it, and the representation asked."""

    kind: str  # a metrics.CACHE_KINDS value
    name: str  # SOP UID, plus attribute path or frames and rendering parameters
    media_type: str
    transfer_syntax: str  # as asked ("*" reuses what is cached); "-" where none applies
    place: Placement  # the study and series of the URL the archive answers (its audience: the answer's)

    def entry(self, transfer_syntax: str, audience: str = SHARED) -> str:
        return f"{self.kind}/{self.place.to(audience).key(self.name)}/{self.media_type}/{transfer_syntax}"

    def index(self, audience: str = SHARED) -> str:
        return f"{self.kind}-any/{self.place.to(audience).key(self.name)}/{self.media_type}"


def lookup(cache: FrameCache, key: Key, heard_by: tuple[str, ...] = (SHARED,)) -> Entry | None:
    """The cached object answered for one of the audiences `heard_by` (the first found), or None (a value
    that fails its checks is never returned). Serve it only once `access.admit` let the caller have it."""
    for audience in heard_by:
        ts = key.transfer_syntax
        if ts == "*":
            idx = cache.get_entry(key.index(audience), key.kind)
            if idx is None:
                continue
            ts = bytes(idx[0]).decode("latin-1")  # a memoryview when it came from disk
        found = cache.get_entry(key.entry(ts, audience), key.kind)
        if found is not None:
            return _decode(found[0], found[1], audience)
    return None


def flight_key(key: Key) -> str:
    """The flight key of a cached object's fetch."""
    return "object/" + key.entry(key.transfer_syntax)


def keeper(cache: FrameCache, key: Key, flight: Flight | None = None) -> Keep:
    """The tee for a miss: stores the object once it passed through whole (once per response); `flight`
    lands once it is kept (a follower here looks it up, one in a sibling once it is on disk)."""
    done = False

    def keep(content_type: str, pieces: list[bytes | memoryview], audience: str) -> None:
        nonlocal done
        if done or not content_type:
            return
        done = True
        ts = parse_content_type(content_type)[1].get("transfer-syntax") or key.transfer_syntax
        if key.transfer_syntax not in ("*", "-") and ts != key.transfer_syntax:
            return  # not what was asked for: it would answer the wrong request
        value = _encode(content_type, b"".join(pieces))
        entries = [(key.entry(ts, audience), value)]
        if key.transfer_syntax == "*":
            entries.append((key.index(audience), ts.encode("latin-1")))
        if not all([cache.put_entry(k, v) for k, v in entries]):
            return
        written = cache.submit(cache.write_entries, entries, key.kind, key.place.study)
        if flight is not None:
            flight.land(flight_key(key), written)

    return keep


def _answer(request: Request, entry: Entry, multipart: bool, location: str | None, cache_control: str) -> AnyResponse:
    etag = entry.etag(multipart)
    headers = [("ETag", etag), ("Vary", "Accept"), ("X-Cache", "HIT"), ("Cache-Control", cache_control)]
    if etag in [t.strip().removeprefix("W/") for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(None, 304, headers=dict(headers))
    if multipart:
        writer = MultipartWriter()
        head = writer.part(entry.content_type, location, len(entry.payload))
        chunks: list[bytes | memoryview] = [head, entry.payload, writer.close()]
        ctype = writer.content_type(parse_content_type(entry.content_type)[0])
    else:
        chunks, ctype = [entry.payload], entry.content_type
        if location:
            headers.append(("Content-Location", location))
    headers += [("Content-Type", ctype), ("Content-Length", str(sum(len(c) for c in chunks)))]
    return BuffersResponse(200, headers, chunks)  # each piece written as is: no join, no copy



class _Object:
    """An instance, bulk data element, rendering or thumbnail, as the cache phase (cache_phase.py) serves it."""

    want = False  # (objects are written to disk at once: nothing to ask a sibling to write)

    def __init__(self, cache: FrameCache, key: Key, fetch: Callable[[Keep], Awaitable[StreamResponse]],
                 respond: Callable[[Entry], AnyResponse], cache_control: str) -> None:
        self.cache = cache
        self.key = key
        self.study = key.place.study
        self._fetch = fetch
        self._respond = respond
        self.cache_control = cache_control
        self.found: Entry | None = None

    async def look(self, heard_by: tuple[str, ...]) -> bool:
        self.found = lookup(self.cache, self.key, heard_by)
        return self.found is not None

    def adopt(self, values: list[Any]) -> bool:
        return False

    def audiences(self) -> set[str]:
        return set() if self.found is None else {self.found.audience}

    def keys(self) -> list[str]:
        return [flight_key(self.key)]

    def carriers(self, ctx: Context) -> list[asyncio.Future[Any]]:
        return []

    def answer(self) -> AnyResponse:
        assert self.found is not None
        return self._respond(self.found)

    async def fetch(self, flight: Flight | None) -> AnyResponse:
        """The archive's answer, streamed with `X-Cache: MISS` and kept by the tee once it passed whole."""
        got = await self._fetch(keeper(self.cache, self.key, flight))
        got.raw_headers += [(b"x-cache", b"MISS"), (b"cache-control", self.cache_control.encode())]
        return got

    def hands(self, failure: Problem) -> bool:
        return True  # (the key names the representation: the same request would get the same refusal)

    def stop(self) -> None:
        return None


async def _cached(ctx: Context, key: Key, fetch: Callable[[Keep], Awaitable[StreamResponse]],
                  respond: Callable[[Entry], AnyResponse], cache_control: str) -> AnyResponse:
    assert ctx.cache is not None
    return await cache_phase.serve(ctx, _Object(ctx.cache, key, fetch, respond, cache_control))


async def instance(request: Request, ctx: Context, target: Target) -> AnyResponse:
    """One instance (application/dicom), answered from the cache when its Part 10 bytes are there."""
    if ctx.cache is None or target.instance is None:
        return await retrieve.retrieve(request, ctx, target, Resource.INSTANCE, "instance")
    sel = select(request, Resource.INSTANCE, True)
    key = Key("instance", target.instance, sel.media_type, sel.transfer_syntax or "*",
              Placement(target.study, target.series or ""))
    location = dicomweb_base(request, ctx.settings, ctx.root) + target.path()
    return await _cached(ctx, key, lambda tee: retrieve.retrieve(request, ctx, target, Resource.INSTANCE, "instance",
                                                             keep=tee),
                         lambda hit: _answer(request, hit, sel.multipart, location, IMMUTABLE), IMMUTABLE)


async def bulk(request: Request, ctx: Context, target: Target, tags: str, location: str) -> AnyResponse:
    """A bulk data element named by its instance and attribute path (`.../instances/{sop}/bulk/{tags}`)."""
    path = f"{target.path()}/bulk/{tags}"
    if ctx.cache is None or target.instance is None:
        return await retrieve.retrieve(request, ctx, target, Resource.BULKDATA, "bulkdata", upstream_path=path,
                                   location=location)
    sel = select(request, Resource.BULKDATA, True)
    key = Key("bulkdata", f"{target.instance}/{tags.lower()}", sel.media_type, sel.transfer_syntax or "*",
              Placement(target.study, target.series or ""))
    return await _bulk(request, ctx, target, sel, key, path, location, None)


async def opaque_bulk(request: Request, ctx: Context, archive_name: str, remainder: str, location: str) -> AnyResponse:
    """A bulk data URI minted as /bulk/{archive}/{token}: cached when the archive path names its study,
    series and instance (placed there, and found there by a purge of the study), passed through otherwise."""
    archive = ctx.archive(archive_name)
    assert archive is not None
    m = HIERARCHY.search(remainder.split("?", 1)[0])
    if ctx.cache is None or m is None:
        return await retrieve.retrieve(request, ctx, Target(""), Resource.BULKDATA, "bulkdata",
                                   upstream_path=remainder, archives=[archive])
    sel = select(request, Resource.BULKDATA, True)
    key = Key("bulkdata", f"{m.group(3)}/{archive_name}:{remainder}", sel.media_type, sel.transfer_syntax or "*",
              Placement(m.group(1), m.group(2)))
    return await _bulk(request, ctx, Target(""), sel, key, remainder, location, [archive])


async def _bulk(request: Request, ctx: Context, target: Target, sel: Selection, key: Key, path: str,
                location: str, archives: list[Archive] | None) -> AnyResponse:
    return await _cached(ctx, key, lambda tee: retrieve.retrieve(request, ctx, target, Resource.BULKDATA, "bulkdata",
                                                             upstream_path=path, archives=archives,
                                                             location=location, keep=tee),
                         lambda hit: _answer(request, hit, sel.multipart, location, IMMUTABLE), IMMUTABLE)


def rendering_key(target: Target, query: str) -> str:
    """The name of a rendering: the deepest UID, the frames, and the parameters in a canonical order."""
    uid = target.instance or target.series or target.study
    frames = ",".join(map(str, target.frames)) if target.frames else "-"
    params = "&".join(sorted(query.split("&"))) if query else "-"
    return f"{uid}/{frames}/{params}"


async def rendered(request: Request, ctx: Context, target: Target, thumbnail: bool) -> AnyResponse:
    """A rendered image or thumbnail, per media type and rendering parameters."""
    if ctx.cache is None:
        return await retrieve.rendered(request, ctx, target, thumbnail)
    sel = select(request, Resource.RENDERED, True)
    kind = "thumbnail" if thumbnail else "rendered"
    key = Key(kind, rendering_key(target, retrieve.rendered_query(request, thumbnail)), sel.media_type, "-",
              Placement(target.study, target.series or ""))
    control = IMMUTABLE if target.instance else REVALIDATE
    return await _cached(ctx, key, lambda tee: retrieve.rendered(request, ctx, target, thumbnail, keep=tee),
                         lambda hit: _answer(request, hit, False, None, control), control)
