"""The cache phase before routing: a frames request this worker's memory tier answers whole.

Pingora and Envoy look the cache up before anything else runs for a request; here the common request
of a viewer, GET `.../instances/{sop}/frames/{list}` for frames already in memory, is answered right
inside the edge layer (request id, metrics, access log, CORS still apply), without the router, the
Request object or the layers a hit never needs. The answer is built by the same code as the routed one
(`frames.lookup`, `frames.from_cache`); anything else, including every malformed request (the routed
path gives it its 400) and every partial hit, goes on to routing untouched.

It is installed only when no per-request policy would have to run first: no inbound authentication,
no token pass-through to an archive, no per-client rate limits. Measured in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from . import frames
from .config import Settings
from .context import Context
from .media import BadAccept, NotAcceptable, Resource, negotiate
from .responses import Problem
from .routes import target_of
from .urls import DICOMWEB_ROOT, base_of

_FRAMES = re.compile("^" + re.escape(DICOMWEB_ROOT) +
                     r"/studies/(?P<study>[^/]+)/series/(?P<series>[^/]+)/instances/(?P<instance>[^/]+)"
                     r"/frames/(?P<frames>[^/]+)$")


def applies(settings: Settings, auth_mode: str, forwarding: bool) -> bool:
    """Whether the cache phase may answer before the policies: only when there are none to apply."""
    return (settings.cache_dir is not None and auth_mode == "none" and not forwarding
            and settings.client_request_rate <= 0 and settings.client_byte_rate <= 0)


class HitLane:
    """Answers full memory-tier frame hits; hands everything else to `app` (the routed path)."""

    def __init__(self, app: ASGIApp, ctx: Context) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("query_string"):
            found = _FRAMES.match(scope["path"])
            if found is not None:
                answer = self._answer(scope, found.groupdict())
                if answer is not None:
                    await answer(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _answer(self, scope: Scope, params: dict[str, str]) -> ASGIApp | None:
        cache = self.ctx.cache
        if cache is None:
            return None
        try:
            target = target_of(params)
        except Problem:
            return None  # the routed path answers 400
        assert target.frames is not None
        accept = if_none_match = None
        for k, v in scope["headers"]:
            if k == b"accept" and accept is None:
                accept = v.decode("latin-1")
            elif k == b"if-none-match" and if_none_match is None:
                if_none_match = v.decode("latin-1")
        try:
            sel = negotiate(accept, Resource.FRAMES, len(target.frames) == 1)
        except (BadAccept, NotAcceptable):
            return None  # 400 / 406 from the routed path
        hits = frames.lookup(cache, target, sel, memory_only=True)
        if len(hits) < len(set(target.frames)):
            return None  # a miss or a partial hit: single-flight, the archive, the tee
        cache.count_hits(list(hits.values()))
        return frames.from_cache(if_none_match or "", target, sel, hits,
                                 base_of(scope, self.ctx.settings) + self.ctx.root)
