"""The application: the edge layer (request id, metrics, errors), routes, and the lifespan."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import access, logs, metrics
from .auth import AuthMiddleware
from .auth import parse as parse_auth
from .config import Settings
from .context import Context
from .health import STATE_VALUE
from .limits import BODILESS
from .responses import Problem, error_response
from .routes import dicomweb_routes
from .sendfile import body_size
from .upstream import Archive
from .urls import DICOMWEB_ROOT

log = logs.access
SETTINGS_ENV = "DICOMWEB_EDGE__SETTINGS_JSON"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def service_of(method: str, path: str) -> str:
    """The DICOMweb service a request belongs to (a closed set: safe as a metric label)."""
    if path.startswith("/upstreams/"):
        path = "/" + path.split("/", 3)[-1]
    if not path.startswith(DICOMWEB_ROOT + "/"):
        return "other"
    if method == "POST":
        return "stow"
    tail = path.rstrip("/").rsplit("/", 2)
    last = tail[-1]
    if last in ("studies", "series", "instances"):
        return "qido"
    if last in ("metadata", "rendered", "thumbnail"):
        return last
    if last == "pixeldata" or "/bulk/" in path or "/bulkdata" in path:
        return "bulkdata"
    if len(tail) > 1 and tail[-2] == "frames":
        return "frames"
    return "instance"


class EdgeMiddleware:
    """Request id, access log without patient data, and request metrics, as plain ASGI."""

    def __init__(self, app: ASGIApp, log_patient_data: bool = False) -> None:
        self.app = app
        self.log_patient_data = log_patient_data

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = v.decode("latin-1")
                break
        if rid is None or not _REQUEST_ID.match(rid):
            rid = secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid
        service = service_of(scope["method"], scope["path"])
        fields: dict[str, Any] = {"request_id": rid}
        token = logs.REQUEST.set(fields)
        status = 500
        sent = received = 0
        ttfb = None

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def tracked(message: Message) -> None:
            nonlocal status, sent, ttfb
            if message["type"] == "http.response.start":
                status = message["status"]
                ttfb = time.perf_counter() - started
                for k, v in message.get("headers", ()):
                    if k == b"x-cache":
                        fields["cache"] = v.decode("latin-1").lower()
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            else:
                sent += body_size(message)
            await send(message)

        tally = metrics.TALLY
        in_flight = metrics.REQUESTS_IN_FLIGHT
        tally.inc(in_flight)
        try:
            await self.app(scope, receive if scope["method"] in BODILESS else counted, tracked)
        finally:
            tally.inc(in_flight, -1)
            elapsed = time.perf_counter() - started
            tally.inc(metrics.child(metrics.REQUESTS, service, str(status)))
            tally.observe(metrics.child(metrics.REQUEST_DURATION, service, _CODE_CLASS.get(status // 100, "5xx")),
                          elapsed)
            if ttfb is not None:
                tally.observe(metrics.child(metrics.REQUEST_TTFB, service), ttfb)
            tally.inc(metrics.child(metrics.RESPONSE_BYTES, service), sent)
            if received:
                tally.inc(metrics.child(metrics.REQUEST_BYTES, service), received)
            if log.isEnabledFor(logging.INFO):
                # No path, no query (they hold UIDs and patient names) unless debugging asks for them.
                fields.update(service=service, method=scope["method"], status=status, bytes_in=received,
                              bytes_out=sent, duration_ms=round(elapsed * 1000, 2),
                              ttfb_ms=None if ttfb is None else round(ttfb * 1000, 2))
                if self.log_patient_data:
                    qs = scope.get("query_string", b"").decode("latin-1")
                    fields["path"] = scope["path"] + ("?" + qs if qs else "")
                log.info("request", extra={"fields": fields})
            logs.REQUEST.reset(token)


_CODE_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return error_response(exc.status, exc.reason, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    reason = {404: "no such DICOMweb resource", 405: "method not allowed"}.get(status, "request failed")
    return error_response(status, reason)


async def _health_loop(ctx: Context) -> None:
    """Probe every archive periodically; the probes feed the circuit breakers and the up gauge."""
    while True:
        await probe_all(ctx)
        await asyncio.sleep(ctx.settings.health_interval)


async def probe_all(ctx: Context) -> list[bool]:
    """Probe the archives whose breaker lets a request through (an open one is not asked until its
    cool-down is over); refresh the health gauges."""
    async def one(archive: Archive) -> bool:
        return await archive.probe() if archive.breaker.allow() else False

    results = await asyncio.gather(*(one(a) for a in ctx.archives))
    for archive, ok in zip(ctx.archives, results, strict=True):
        metrics.child(metrics.ARCHIVE_UP, archive.name).set(1 if ok else 0)
        metrics.child(metrics.ARCHIVE_BREAKER, archive.name).set(STATE_VALUE[archive.breaker.state])
    return results


def create_app(settings: Settings) -> Starlette:
    """Build the ASGI application for `settings`."""
    ctx = Context.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.ensure_future(_health_loop(ctx)) if settings.health_interval > 0 else None
        ctx.start()  # follows the other replicas' stores when a shared tier is configured
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            await ctx.close()
            metrics.TALLY.flush()  # this worker's last requests

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        states = await probe_all(ctx)
        archives = {a.name: {"up": ok, "breaker": a.breaker.state} for a, ok in zip(ctx.archives, states, strict=True)}
        ready = any(states)
        return JSONResponse({"status": "ready" if ready else "no archive reachable", "archives": archives},
                            200 if ready else 503)

    def admin(request: Request) -> None:
        # With inbound authentication on, AuthMiddleware required the admin scope; without it, admin
        # actions come only from trusted hops.
        if settings.auth.get("mode", "none") == "none" and (
                request.client is None or request.client.host not in settings.trusted_proxies):
            raise Problem(403, "admin endpoints are only served to trusted addresses")
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
        removed = await asyncio.to_thread(ctx.cache.purge, study)
        return JSONResponse({"removed": removed})

    async def metrics_endpoint(request: Request) -> Response:
        stats = None if ctx.cache is None else await asyncio.to_thread(ctx.cache.stats)
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
        from .viewer import viewer_routes

        routes += viewer_routes(settings.viewer_dir, settings)  # last: its fallback never shadows the proxy
    from starlette.exceptions import HTTPException

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={Problem: _problem, HTTPException: _http_error})
    app.state.ctx = ctx
    forwarding = any(a.forward_authorization for a in settings.archives)
    auth_config = parse_auth(settings.auth, settings.host, forwarding)
    access.MEMO.ttl = auth_config.access_ttl
    if auth_config.mode != "none" or forwarding:  # inside CORS: preflights are answered before it, 401s get CORS
        app.add_middleware(AuthMiddleware, config=auth_config, trusted=settings.trusted_proxies,
                           viewer=bool(settings.viewer_dir), forwarding=forwarding)
    from .limits import LimitsMiddleware

    app.add_middleware(LimitsMiddleware, settings=settings)  # inside CORS: a 429 carries the CORS headers too
    from . import hitlane

    if hitlane.applies(settings, auth_config.mode, forwarding):
        app.add_middleware(hitlane.HitLane, ctx=ctx)  # the cache phase: inside CORS and the edge layer
    if settings.cors_origins:  # a viewer served from another origin (viewer.py serves one same-origin)
        from starlette.middleware.cors import CORSMiddleware

        from .viewer import CORS_EXPOSED

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "HEAD", "POST"],
                           allow_headers=["*"], expose_headers=CORS_EXPOSED, max_age=600)
    app.add_middleware(EdgeMiddleware, log_patient_data=settings.log_patient_data)
    return app


def app_from_env() -> Starlette:
    """Factory for uvicorn workers: settings arrive serialised in the environment."""
    return create_app(Settings.from_json(os.environ[SETTINGS_ENV]))
