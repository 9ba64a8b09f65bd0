"""PS3.18 URL templates → handlers, with UIDs and frame lists validated at the door (400)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from functools import cache

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.dicomweb import compose, objects
from proxy.dicomweb import frames as frame_cache
from proxy.dicomweb import retrieve as wado
from proxy.dicomweb import search as qido
from proxy.dicomweb import store as stow
from proxy.dicomweb.capabilities import capabilities_response
from proxy.dicomweb.context import Context
from proxy.dicomweb.metadata import retrieve_metadata
from proxy.dicomweb.responses import AnyResponse
from proxy.dicomweb.target import Target, checked_uid, dicomweb_base, external_base, target_of
from proxy.errors import Problem
from proxy.formats.dicomjson import BadToken, decode_token
from proxy.formats.media import Resource

TAG_PATH = re.compile(r"^[0-9A-Fa-f]{8}(/[0-9]+/[0-9A-Fa-f]{8})*$")

Handler = Callable[[Request], Awaitable[Response]]


def target(request: Request) -> Target:
    """The validated UIDs and frame numbers of a WADO-RS URL."""
    return target_of(request.path_params)


def _ctx(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    name = request.path_params.get("upstream")
    if name is None:
        return ctx
    single = ctx.single.get(name)
    if single is None:
        raise Problem(404, "no such archive")
    return single


async def search(request: Request) -> Response:
    """QIDO-RS at any of the six search targets."""
    p = request.path_params
    path = ""
    if "study" in p:
        path = f"/studies/{checked_uid(p['study'], 'study')}"
        if "series" in p:
            path += f"/series/{checked_uid(p['series'], 'series')}"
    path += "/" + request.url.path.rstrip("/").rsplit("/", 1)[-1]
    return await qido.search(request, _ctx(request), path)


async def retrieve(request: Request) -> AnyResponse:
    """Study, series or instance retrieve."""
    t = target(request)
    if t.instance:
        return await objects.instance(request, _ctx(request), t)
    return await wado.retrieve(request, _ctx(request), t, Resource.INSTANCES, "instance")


async def metadata(request: Request) -> AnyResponse:
    """Study, series or instance metadata."""
    return await retrieve_metadata(request, _ctx(request), target(request))


async def frames(request: Request) -> AnyResponse:
    """Frames of an instance."""
    return await frame_cache.frames(request, _ctx(request), target(request))


async def rendered(request: Request) -> AnyResponse:
    """Rendered study, series, instance or frames."""
    return await objects.rendered(request, _ctx(request), target(request), thumbnail=False)


async def thumbnail(request: Request) -> AnyResponse:
    """Thumbnail of a study, series, instance or frames."""
    return await objects.rendered(request, _ctx(request), target(request), thumbnail=True)


async def bulk(request: Request) -> AnyResponse:
    """A bulk data element named by the path the proxy minted in metadata (archive-shaped)."""
    t = target(request)
    tags = request.path_params["tags"]
    if not TAG_PATH.match(tags):
        raise Problem(400, "malformed bulk data path")
    location = external_base(request, _ctx(request).settings) + request.url.path
    return await objects.bulk(request, _ctx(request), t, tags, location)


async def opaque_bulk(request: Request) -> AnyResponse:
    """A bulk data URI outside the study hierarchy, minted as /bulk/{archive}/{token}."""
    ctx = _ctx(request)
    archive = ctx.archive(request.path_params["archive"])
    if archive is None:
        raise Problem(404, "no such archive")
    try:
        remainder = decode_token(request.path_params["token"], archive.rewriter.key, archive.name)
    except BadToken as exc:
        raise Problem(400, str(exc)) from None
    location = external_base(request, ctx.settings) + request.url.path
    return await objects.opaque_bulk(request, ctx, archive.name, remainder, location)


async def pixeldata(request: Request) -> AnyResponse:
    """Pixel Data of a study, series or instance (PS3.18 Annex H), composed from metadata."""
    return await compose.composed(request, _ctx(request), target(request), pixeldata=True)


async def bulkdata(request: Request) -> AnyResponse:
    """Every bulk data element of a study, series or instance, composed from metadata."""
    return await compose.composed(request, _ctx(request), target(request), pixeldata=False)


async def store(request: Request) -> Response:
    """STOW-RS."""
    study = request.path_params.get("study")
    return await stow.store(request, _ctx(request), checked_uid(study, "study") if study else None)


S = "/studies/{study}"
SE = S + "/series/{series}"
IN = SE + "/instances/{instance}"
FR = IN + "/frames/{frames}"


async def options(request: Request) -> Response:
    """`OPTIONS` on the service base URL: the Retrieve Capabilities transaction (PS3.18 §8.9)."""
    ctx = _ctx(request)
    return capabilities_response(request, dicomweb_base(request, ctx.settings, ctx.root), _route_table())


@cache
def _route_table() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(path, methods) of every route, built once (a Route compiles its path pattern when made)."""
    return tuple((r.path, tuple(sorted(r.methods or ()))) for r in dicomweb_routes())


def dicomweb_routes() -> list[Route]:
    """Every PS3.18 template the proxy serves, relative to the DICOMweb root."""
    get = ["GET"]
    # Most frequent first: Starlette tries routes in order, and a viewer mostly asks for frames.
    routes = [
        Route(FR, frames, methods=get),
        Route(IN + "/metadata", metadata, methods=get),
        Route(SE + "/metadata", metadata, methods=get),
        Route(IN, retrieve, methods=get),
        Route("/studies", search, methods=get),
        Route("/series", search, methods=get),
        Route("/instances", search, methods=get),
        Route(S + "/series", search, methods=get),
        Route(S + "/instances", search, methods=get),
        Route(SE + "/instances", search, methods=get),
        Route("/studies", store, methods=["POST"]),
        Route(S, store, methods=["POST"]),
        Route(FR + "/rendered", rendered, methods=get),
        Route(FR + "/thumbnail", thumbnail, methods=get),
        Route(IN + "/bulk/{tags:path}", bulk, methods=get),
        Route("/bulk/{archive}/{token}", opaque_bulk, methods=get),
        Route("/", options, methods=["OPTIONS"]),  # Retrieve Capabilities (PS3.18 §8.9) on the service base URL
    ]
    for level in (S, SE, IN):
        routes += [
            Route(level, retrieve, methods=get),
            Route(level + "/metadata", metadata, methods=get),
            Route(level + "/rendered", rendered, methods=get),
            Route(level + "/thumbnail", thumbnail, methods=get),
            Route(level + "/bulkdata", bulkdata, methods=get),
            Route(level + "/pixeldata", pixeldata, methods=get),
        ]
    return routes
