"""Asking the archives for a study's resource: which archives hold it (`locate`), the first of them that
answers (`open_upstream`: a 404 or an unreachable archive moves on), what the client hears when the
archive answered an error (`upstream_problem`), and an archive's JSON answer read and checked (`json_answer`)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any, Protocol

from proxy.auth import access
from proxy.dicomweb.context import Context
from proxy.errors import Problem
from proxy.formats.media import ANY_TS, Selection
from proxy.upstream import jsonbody
from proxy.upstream.archive import Archive, UpstreamError, UpstreamResponse


class Caller(Protocol):
    """What `open_upstream` reads of the client's request: its ASGI scope (a Starlette Request, or the
    stand-in of a prefetch, which has no client request)."""

    @property
    def scope(self) -> Mapping[str, Any]: ...


async def locate(ctx: Context, study: str) -> list[Archive]:
    """The archives holding `study`, or 404."""
    if not ctx.archives:
        raise Problem(502, "no archive is configured")
    found = await ctx.archives_for(study)
    if not found:
        raise Problem(404, "no archive holds this study")
    return found


async def open_upstream(ctx: Context, study: str | None, path: str, accept: str, request: Caller,
                        service: str, query: str = "", archives: list[Archive] | None = None,
                        relay: bool = False) -> tuple[UpstreamResponse, AsyncExitStack]:
    """Open the first archive that has the resource (a 404 or an unreachable archive moves on).
    `relay`: the body is to be relayed past Python (Archive.open)."""
    candidates = archives if archives is not None else await locate(ctx, study or "")
    last: Problem | None = None
    failed: Problem | None = None  # an archive that could not be asked (and so may hold the resource)
    headers = {"Accept": accept}
    rid = request.scope.get("state", {}).get("request_id")
    if rid:
        headers["X-Request-ID"] = rid
    for i, archive in enumerate(candidates):
        stack = AsyncExitStack()
        try:
            resp = await stack.enter_async_context(archive.open("GET", path, query, headers, service=service,
                                                                    relay=relay))
        except UpstreamError as exc:
            await stack.aclose()
            last = failed = failed or Problem(exc.status, exc.reason, {
                "Warning": f"299 dicomweb-edge: archive '{archive.name}' is unavailable", **_retry_after(exc.status)})
            continue
        if resp.status == 404 and (i + 1 < len(candidates) or failed is not None):
            await stack.aclose()  # a 404 moves on; after an archive that could not be asked, its failure answers
            last = failed or Problem(404, "not found in any archive")
            continue
        if resp.status == 404 and study and len(candidates) > 1:
            await ctx.locator.forget(study)  # what we learned is stale: probe again next time
        if resp.status == 200 and service in access.CONFIRMING:
            access.confirm(ctx, archive, study, path)  # token pass-through: this caller may see the study
        return resp, stack
    raise last or Problem(502, "no archive is configured")


def _retry_after(status: int) -> dict[str, str]:
    return {"Retry-After": "5"} if status == 503 else {}


def upstream_problem(resp: UpstreamResponse, sel: Selection | None) -> Problem:
    """What the client hears when the archive answered an error status."""
    s, name = resp.status, resp.archive.name
    if s == 404:
        return Problem(404, "no such resource in the archive")
    if s in (400, 406, 415, 409, 410, 413):
        return Problem(s, f"archive '{name}' refused the request (HTTP {s})")
    if s == 500 and sel is not None and sel.transfer_syntax not in (None, ANY_TS):
        # Orthanc answers 500 when it cannot transcode (docs/archive-behaviour.md): nothing acceptable.
        return Problem(406, f"archive '{name}' cannot provide transfer syntax {sel.transfer_syntax}")
    if s in (401, 403) and resp.archive.config.forward_authorization:
        return access.refused(s)  # the caller's own token was refused: say so, not 502
    if s in (401, 403):
        return Problem(502, f"archive '{name}' refused the proxy's credentials (HTTP {s})")
    if s == 503:
        return Problem(503, f"archive '{name}' is unavailable", {"Retry-After": resp.headers.get("Retry-After", "5")})
    return Problem(502, f"archive '{name}' failed (HTTP {s})")


async def json_answer(ctx: Context, resp: UpstreamResponse) -> bytes:
    """The archive's JSON body, read up to `max_json_bytes` and checked (Problem with the status the
    failure justifies when it is too large, truncated or not JSON)."""
    try:
        return await jsonbody.checked(resp, await resp.read(ctx.settings.max_json_bytes))
    except UpstreamError as exc:
        raise Problem(exc.status, exc.reason) from None
