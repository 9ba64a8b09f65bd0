"""The cache phase: a frames request the frame cache answers whole, before routing.

Pingora and Envoy look the cache up before anything else runs for a request; here the common request
of a viewer, GET `.../instances/{sop}/frames/{list}` for frames already cached, is answered by
`Lane.answer` without the router, the Request object or the layers a hit never needs. Two places ask
it: the server protocol itself (protocol.py), before an ASGI request even exists, and `HitLane`, an
ASGI layer right after the edge layer, for requests the protocol leaves alone (a CORS request, one
pipelined behind another, a client not keeping up, any other ASGI server). The answer is built by the
same code as the routed one (`frames.lookup`, `frames.cached_answer`); anything else, including every
malformed request (the routed path gives it its 400) and every partial hit, goes on to routing
untouched.

A hit on the disk tier (a frame another worker fetched, or one from before a restart) is answered here
too, and lands in the memory tier; when the lookup finds less than everything, what it found travels
on with the request (`frames.LOOKED_UP` in the scope) so that the routed path neither looks up nor counts
the same frames again.

An answer, once built, is kept as prepared header bytes plus the memory-tier keys and checksums of
its frames (`_Prepared`, a few hundred bytes; never the frames themselves): the next identical request
(same path, Accept and base URL) checks that each entry still holds the same bytes and writes them,
with no path validation, negotiation, ETag or multipart framing done again.

The lane is installed only when no per-request policy would have to run first: no inbound
authentication, no token pass-through to an archive, no per-client rate limits. Measured in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.cache.store import frame_key
from proxy.config import Settings
from proxy.dicomweb import frames
from proxy.dicomweb.context import Context
from proxy.dicomweb.responses import encode_headers, send_buffers
from proxy.dicomweb.target import DICOMWEB_ROOT, base_of, target_of
from proxy.errors import Problem
from proxy.formats.media import BadAccept, NotAcceptable, Resource, negotiate
from proxy.http.cors import LaneCors

_FRAMES = re.compile("^" + re.escape(DICOMWEB_ROOT) +
                     r"/studies/(?P<study>[^/]+)/series/(?P<series>[^/]+)/instances/(?P<instance>[^/]+)"
                     r"/frames/(?P<frames>[^/]+)$")
PREPARED = 4096  # answers kept prepared per worker (LRU)
Headers = list[tuple[bytes, bytes]]


def applies(settings: Settings, auth_mode: str, forwarding: bool) -> bool:
    """Whether the cache phase may answer before the policies: only when there are none to apply."""
    return (settings.cache_dir is not None and auth_mode == "none" and not forwarding
            and "hit_lane" not in settings.disable
            and settings.client_request_rate <= 0 and settings.client_byte_rate <= 0)


@dataclass(frozen=True, slots=True)
class Answer:
    """A response ready to write: status, headers (no request id: the edge adds it), body pieces."""

    status: int
    headers: Headers
    body: list[bytes | memoryview]
    size: int


@dataclass(frozen=True, slots=True)
class _Prepared:
    entries: tuple[tuple[str, int], ...]  # (memory-tier key, checksum) of each payload, in body order
    etag: str
    headers: Headers  # of the 200; its first four are the 304's
    pieces: tuple[bytes | None, ...]  # the body: framing bytes, None where the next payload goes
    size: int


class Lane:
    """Answers full frame hits (memory tier, else disk tier) of one worker; keeps its answers prepared."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        # The CORS headers an answer written before the ASGI layers needs (protocol.py; HitLane runs inside
        # the CORS layer).
        self.cors = LaneCors(ctx.settings.cors_origins) if ctx.settings.cors_origins else None
        self.prepared: OrderedDict[tuple[str, str | None, str], _Prepared] = OrderedDict()

    def answer(self, scope: Scope) -> Answer | None:
        """The answer to a GET with no query string, or None when routing has to answer it."""
        cache = self.ctx.cache
        if cache is None:
            return None
        path = scope["path"]
        accept = if_none_match = None
        for k, v in scope["headers"]:
            if k == b"accept" and accept is None:
                accept = v.decode("latin-1")
            elif k == b"if-none-match" and if_none_match is None:
                if_none_match = v.decode("latin-1")
        key = (path, accept, base_of(scope, self.ctx.settings) + self.ctx.root)
        prepared = self.prepared.get(key)
        payloads = None
        if prepared is not None:
            payloads = cache.memory_hits(prepared.entries)
            if payloads is None:  # evicted, purged or replaced since: prepare it again (or route it)
                del self.prepared[key]
                prepared = None
            else:
                self.prepared.move_to_end(key)
        if prepared is None:
            found = self._prepare(scope, path, accept, key[2])
            if found is None:
                return None
            prepared, payloads = found
        assert payloads is not None
        if if_none_match and prepared.etag in if_none_match:
            return Answer(304, prepared.headers[:4], [], 0)
        body: list[bytes | memoryview] = []
        it = iter(payloads)
        for piece in prepared.pieces:
            body.append(next(it) if piece is None else piece)
        return Answer(200, prepared.headers, body, prepared.size)

    def _prepare(self, scope: Scope, path: str, accept: str | None,
                 base: str) -> tuple[_Prepared, list[bytes | memoryview]] | None:
        cache = self.ctx.cache
        assert cache is not None
        found = _FRAMES.match(path)
        if found is None:
            return None
        try:
            target = target_of(found.groupdict())
        except Problem:
            return None  # the routed path answers 400
        assert target.frames is not None and target.instance is not None
        try:
            sel = negotiate(accept, Resource.FRAMES, len(target.frames) == 1)
        except (BadAccept, NotAcceptable):
            return None  # 400 / 406 from the routed path
        hits = frames.lookup(cache, target, sel)  # memory, then disk (counted: the routed path won't look again)
        if len(hits) < len(set(target.frames)) or any(
                not isinstance(f.payload, bytes | memoryview) or f.checksum < 0 for f in hits.values()):
            scope[frames.LOOKED_UP] = (target, sel, hits)  # a miss, a partial hit, a file to send: routing answers
            return None
        etag, headers, chunks = frames.cached_answer(target, sel, hits, base)
        if any(f.fallback for f in hits.values()):  # (the archive's own encoding may come: then it answers `*`)
            return _Prepared((), etag, encode_headers(headers), (None,) * len(chunks),
                             sum(len(c) for c in chunks)), list(chunks)  # (answered once, not kept prepared)
        item = frames.placed(target)
        owner = {id(f.payload): (frame_key(item, n, f.media_type, f.transfer_syntax), f.checksum, f.payload)
                 for n, f in hits.items()}
        entries = tuple(owner[id(c)][:2] for c in chunks if id(c) in owner)
        payloads = [owner[id(c)][2] for c in chunks if id(c) in owner]
        pieces = tuple(None if id(c) in owner else bytes(c) for c in chunks)
        prepared = _Prepared(entries, etag, encode_headers(headers), pieces, sum(len(c) for c in chunks))
        self.prepared[(path, accept, base)] = prepared
        if len(self.prepared) > PREPARED:
            self.prepared.popitem(last=False)
        return prepared, payloads


class HitLane:
    """The cache phase as an ASGI layer: `lane` answers what it can; everything else goes to `app`."""

    def __init__(self, app: ASGIApp, lane: Lane) -> None:
        self.app = app
        self.lane = lane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] == "GET" and not scope.get("query_string")
                and frames.LOOKED_UP not in scope):  # (the protocol's cache phase looked it up already)
            answer = self.lane.answer(scope)
            if answer is not None:
                await send_buffers(send, answer.status, answer.headers, answer.body)
                return
        await self.app(scope, receive, send)
