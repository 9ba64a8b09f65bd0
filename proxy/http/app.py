"""The application: the layers a request passes (edge.py, the cache phase, limits, auth), routes, errors,
and the lifespan."""

from __future__ import annotations

import asyncio
import re

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Lifespan

from proxy.auth.inbound import AuthMiddleware
from proxy.auth.inbound import parse as parse_auth
from proxy.cache import purges
from proxy.cache.store import OFF_STATS
from proxy.dicomweb.context import Context
from proxy.dicomweb.routes import dicomweb_routes
from proxy.dicomweb.target import DICOMWEB_ROOT
from proxy.errors import Problem, error_response
from proxy.http import cors, hitlane
from proxy.http.edge import EdgeMiddleware
from proxy.http.limits import LimitsMiddleware, client_key
from proxy.http.viewer import viewer_routes
from proxy.observability import metrics
from proxy.upstream.egress import Egress


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return error_response(exc.status, exc.reason, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    reason = {404: "no such DICOMweb resource", 405: "method not allowed"}.get(status, "request failed")
    return error_response(status, reason)


def readiness(ctx: Context) -> tuple[int, dict[str, object]]:
    """`/readyz`: whether this proxy can serve. 503 only when it can serve nothing (no cache to read, and
    every archive found down), so that an archive outage leaves the cache and stale-if-error serving. Each
    archive's state is what the health loop last found (`up` None: not probed yet); nothing is asked of an
    archive here."""
    archives = {a.name: {"up": a.up, "breaker": a.breaker.state} for a in ctx.archives}
    cache_on = ctx.cache is not None
    ready = cache_on or any(a.up is not False for a in ctx.archives)
    body: dict[str, object] = {"status": "ready" if ready else "no cache and no archive reachable",
                               "archives": archives}
    if ctx.settings.cache_dir:
        body["cache"] = "on" if cache_on else f"off: {ctx.cache_off}"
    return 200 if ready else 503, body


def build_app(ctx: Context, lifespan: Lifespan) -> Starlette:
    """The ASGI application serving `ctx`: routes, error handlers and the layers a request passes."""
    settings = ctx.settings

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        status, body = readiness(ctx)
        return JSONResponse(body, status)

    trusted = settings.trusted

    def admin(request: Request) -> None:
        # With inbound authentication on, AuthMiddleware required the admin scope; without it, admin
        # actions come only from trusted hops.
        if settings.auth.get("mode", "none") == "none" and (  # (a request a trusted front relayed is not)
                client_key(request.scope, trusted) not in trusted):
            raise Problem(403, "admin endpoints are only served to trusted addresses")
        if ctx.cache is None and ctx.cache_off is not None:
            raise Problem(503, "the cache is off: its directory cannot be opened now", {"Retry-After": "5"})
        if ctx.cache is None:
            raise Problem(404, "the frame cache is not configured (cache_dir)")

    async def cache_stats(request: Request) -> Response:
        admin(request)
        assert ctx.cache is not None
        return JSONResponse(ctx.cache.stats())

    async def cache_purge(request: Request) -> Response:
        admin(request)
        assert ctx.cache is not None
        study = request.query_params.get("study")
        if study is not None and not re.match(r"^[0-9]+(\.[0-9]+)*$", study):
            raise Problem(400, "malformed study UID")
        removed = await purges.purge_soon(ctx.cache, study)
        return JSONResponse({"removed": removed})

    async def metrics_endpoint(request: Request) -> Response:
        stats = None if ctx.cache is None else await asyncio.to_thread(ctx.cache.stats)
        if stats is None and settings.cache_dir:
            stats = OFF_STATS  # configured, but its directory cannot be opened now
        body, ctype = metrics.render(stats)
        return Response(body, media_type=ctype)

    routes = [
        Mount(DICOMWEB_ROOT, routes=dicomweb_routes()),  # first: it carries nearly all the traffic
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        Route("/admin/cache", cache_stats, methods=["GET"]),
        Route("/admin/cache/purge", cache_purge, methods=["POST"]),
        Mount("/upstreams/{upstream}" + DICOMWEB_ROOT, routes=dicomweb_routes()),
    ]
    if settings.viewer_dir:
        routes += viewer_routes(settings.viewer_dir, settings)  # last: its fallback never shadows the proxy
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={Problem: _problem, HTTPException: _http_error})
    app.state.ctx = ctx
    forwarding = any(a.forward_authorization for a in settings.archives)
    auth_config = parse_auth(settings.auth, settings.host, forwarding)
    auth_config.egress = Egress.from_settings(settings)
    ctx.access_memo.ttl = auth_config.access_ttl
    if auth_config.mode != "none" or forwarding:  # inside CORS: preflights are answered before it, 401s get CORS
        app.add_middleware(AuthMiddleware, config=auth_config, trusted=settings.trusted,
                           viewer=bool(settings.viewer_dir), forwarding=forwarding)
    app.add_middleware(LimitsMiddleware, settings=settings)  # inside CORS: a 429 carries the CORS headers too
    if hitlane.applies(settings, auth_config.mode, forwarding):
        lane = hitlane.Lane(ctx)
        app.add_middleware(hitlane.HitLane, lane=lane)  # the cache phase: inside CORS and the edge layer
        app.state.lane = lane  # the server protocol asks it first (protocol.py)
    if settings.cors_origins:  # a viewer served from another origin (viewer.py serves one same-origin)
        cors.install(app, settings.cors_origins)
    app.add_middleware(EdgeMiddleware, activity=ctx.activity, log_patient_data=settings.log_patient_data)
    return app

