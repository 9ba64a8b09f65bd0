"""WADO-RS metadata: study, series and instance metadata, its BulkDataURIs pointed at the proxy.

Phases: locate the archives that hold the study → (series metadata: start the prefetch of the series,
the viewer asks for its frames next) → the metadata cache (frame cache's disk tier, `metadata_cache_ttl`,
skipped on `Cache-Control: no-cache`) → the archive, or each archive holding part of the study, merged
with every instance once → stored before answering. An archive failure is answered with the last good
document, marked stale (`stale_if_error`), where there is one.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from proxy.auth import access
from proxy.cache import documents
from proxy.cache.placement import SHARED
from proxy.dicomweb.context import Context
from proxy.dicomweb.fetch import locate, open_upstream, upstream_problem
from proxy.dicomweb.target import VARY, Target, select
from proxy.dicomweb.urls import dicomweb_base
from proxy.errors import Problem
from proxy.federation import merge
from proxy.formats.media import Resource
from proxy.upstream import jsonbody
from proxy.upstream.archive import Archive, UpstreamError

STALE_IF = (502, 503, 504)  # archive failures a cached metadata document may stand in for


Heard = frozenset[str]  # the audiences of the archives an answer was made of (placement.py)


async def _metadata_body(request: Request, ctx: Context, archives: list[Archive],
                         path: str) -> tuple[bytes | None, Archive]:
    """The first of `archives` that has the metadata, URLs rewritten (None when none has it), and the
    archive that answered."""
    resp, stack = await open_upstream(ctx, None, path, "application/dicom+json", request, "metadata",
                                      archives=archives)
    async with stack:
        if resp.status == 404:
            return None, resp.archive
        if resp.status >= 300:
            raise upstream_problem(resp, None)
        try:
            body = await jsonbody.checked(resp, await resp.read(ctx.settings.max_json_bytes))
        except UpstreamError as exc:
            raise Problem(exc.status, exc.reason) from None
    if body.strip() not in (b"", b"[]"):
        access.confirm(resp.archive, None, path)
    return resp.archive.rewriter.rewrite_json(body, dicomweb_base(request, ctx.settings, ctx.root)), resp.archive


def _one_audience(heard: Heard) -> str | None:
    """The audience a document made of answers for `heard` is kept for: the pass-through archive's when one
    answered (strictest), the proxy's own when none did; None (not kept) when several did."""
    per_caller = heard - {SHARED}
    return SHARED if not per_caller else next(iter(per_caller)) if len(per_caller) == 1 else None


def _document(body: bytes, headers: list[tuple[str, str]]) -> Response:
    response = Response(body, 200, media_type="application/dicom+json", headers={"Vary": "Accept"})
    for name, value in headers:
        response.headers.append(name, value)
    return response


async def retrieve_metadata(request: Request, ctx: Context, target: Target) -> Response:
    """Study, series or instance metadata, BulkDataURIs pointed at the proxy; merged when split."""
    select(request, Resource.JSON, True)
    archives = await locate(ctx, target.study)
    path = target.path() + "/metadata"
    if target.series and not target.instance:
        # At once: measured, the series streaming in while the metadata is made beat starting it after
        # the answer (cold viewer 0.65 vs 0.85 s, benchmarks/replay.py's viewer, 5 interleaved rounds).
        ctx.prefetch.schedule(ctx, target.study, target.series)  # the viewer asks for its frames next
    cache, ttl = ctx.cache, ctx.settings.metadata_cache_ttl
    fresh = "no-cache" in request.headers.get("cache-control", "").lower()
    url = dicomweb_base(request, ctx.settings, ctx.root) + path
    heard_by = access.audiences(ctx)
    if cache is not None and ttl > 0 and not fresh:
        cached = await asyncio.to_thread(documents.get_json, cache, url, heard_by)
        if cached is not None:
            await access.admit(ctx, target.study, (cached[1],))  # token pass-through: the archive said yes
            return _document(cached[0], [("X-Cache", "HIT")])
    storing = cache is not None and ttl > 0

    async def fetch() -> tuple[Response, Heard]:
        answer, heard = await _metadata(request, ctx, target, archives, path)
        audience = _one_audience(heard)
        if storing and audience is not None and answer.status_code == 200 and "warning" not in answer.headers:
            # Stored before answering, so that the next request (from any worker) is a hit; by the writer
            # thread, ahead of the frames a prefetch queues there (cache.write_first).
            assert cache is not None
            await cache.write_first(documents.put_json, cache, url, audience, bytes(answer.body), target.study, ttl,
                                    ctx.settings.stale_if_error)
            answer.headers["X-Cache"] = "MISS"
        return answer, heard

    async def look() -> tuple[Response, Heard] | None:  # what a sibling worker fetched meanwhile, from the disk tier
        if not storing:
            return None
        assert cache is not None  # storing: the cache is on
        found = await asyncio.to_thread(documents.get_json, cache, url, heard_by)
        return None if found is None else (_document(found[0], []), frozenset((found[1],)))

    try:
        # Concurrent identical misses (a study opened on several workstations at once) ask the archive once.
        got = await ctx.flights.share("metadata/" + url, fetch, ctx.patience(), look)
    except Problem as exc:
        if cache is None or ttl <= 0 or fresh or exc.status not in STALE_IF or not ctx.settings.stale_if_error:
            raise
        stale = await asyncio.to_thread(documents.get_json, cache, url, heard_by, True)
        if stale is None:
            raise
        await access.admit(ctx, target.study, (stale[1],))
        # RFC 7234 §5.5.1 (stale-if-error, RFC 5861): the last good answer, marked, instead of the failure.
        return _document(stale[0], [("X-Cache", "STALE"), ("Warning", '110 - "Response is Stale"')])
    answer, heard = got.value
    if got.led:
        return answer
    # What another request fetched meanwhile: the same bytes, in a response of this request's own, once
    # this caller is admitted to what the archives answered the other one.
    await access.admit(ctx, target.study, heard)
    return _document(answer.body, [("X-Cache", "HIT"), *(("Warning", w) for w in answer.headers.getlist("warning"))])


async def _metadata(request: Request, ctx: Context, target: Target, archives: list[Archive],
                    path: str) -> tuple[Response, Heard]:
    if target.instance or len(archives) == 1:
        body, archive = await _metadata_body(request, ctx, archives, path)
        if body is None:
            raise Problem(404, "no such resource in the archive")
        return Response(body, 200, media_type="application/dicom+json", headers=dict([VARY])), \
            frozenset((archive.audience,))
    # A study or series held by several archives: every instance once, first archive's copy wins.
    merged: dict[str, merge.Record] = {}
    warnings: list[str] = []
    failure: Problem | None = None
    heard: set[str] = set()
    for archive in archives:
        try:
            body, _ = await _metadata_body(request, ctx, [archive], path)
        except Problem as exc:
            failure = failure or exc
            warnings.append(f"299 dicomweb-edge: archive '{archive.name}' is unavailable; "
                            "instances it holds are missing")
            continue
        if body is None:
            continue
        try:
            records = merge.loads(body)
        except ValueError:
            raise Problem(502, f"archive '{archive.name}' sent metadata that is not a JSON array") from None
        heard.add(archive.audience)
        for rec in records:
            merged.setdefault(str(merge.value(rec, merge.SOP_UID)), rec)
    if not merged:
        raise failure or Problem(404, "no such resource in any archive")
    response = Response(merge.dumps(merged.values()), 200, media_type="application/dicom+json",
                        headers=dict([VARY]))
    for w in warnings:
        response.headers.append("Warning", w)
    return response, frozenset(heard)
