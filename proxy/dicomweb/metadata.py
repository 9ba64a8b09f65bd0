"""WADO-RS metadata: study, series and instance metadata, its BulkDataURIs pointed at the proxy.

Phases: locate the archives that hold the study → (series metadata: start the prefetch of the series,
the viewer asks for its frames next) → the metadata cache (frame cache's disk tier, `metadata_cache_ttl`,
skipped on `Cache-Control: no-cache`) → the archive, or each archive holding part of the study, merged
with every instance once → stored before answering. An archive failure is answered with the last good
document, marked stale (`stale_if_error`), where there is one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.auth import access
from proxy.cache import documents
from proxy.cache.placement import SHARED
from proxy.coordination.flights import Flight
from proxy.dicomweb import assemble, cache_phase
from proxy.dicomweb.context import Context
from proxy.dicomweb.fetch import json_answer, locate, open_upstream, upstream_problem
from proxy.dicomweb.responses import AnyResponse
from proxy.dicomweb.target import VARY, Target, dicomweb_base, select
from proxy.errors import Problem
from proxy.federation import merge
from proxy.formats.media import Resource
from proxy.upstream.archive import Archive

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
        body = await json_answer(ctx, resp)
    if body.strip() not in (b"", b"[]"):
        access.confirm(ctx, resp.archive, None, path)
    return resp.archive.rewriter.rewrite_json(body, dicomweb_base(request, ctx.settings, ctx.root)), resp.archive


async def _study_metadata(request: Request, ctx: Context, target: Target, archive: Archive) -> bytes | None:
    """A study's metadata from an archive that has none at study level: its series' joined (assemble.py),
    URLs rewritten (None when it does not hold the study)."""
    body = await assemble.study_metadata(request, ctx, archive, target.study)
    return None if body is None else archive.rewriter.rewrite_json(body, dicomweb_base(request, ctx.settings,
                                                                                       ctx.root))


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


async def retrieve_metadata(request: Request, ctx: Context, target: Target) -> AnyResponse:
    """Study, series or instance metadata, BulkDataURIs pointed at the proxy; merged when split."""
    select(request, Resource.JSON, True)
    archives = await locate(ctx, target.study)
    path = target.path() + "/metadata"
    if target.series and not target.instance:
        # At once: measured, the series streaming in while the metadata is made beat starting it after
        # the answer (cold viewer 0.65 vs 0.85 s, benchmarks/replay.py's viewer, 5 interleaved rounds).
        ctx.prefetch.schedule(ctx, target.study, target.series)  # the viewer asks for its frames next
    url = dicomweb_base(request, ctx.settings, ctx.root) + path
    document = _Document(request, ctx, target, archives, path, url)
    try:
        # Concurrent identical misses (a study opened on several workstations at once) ask the archive once.
        return await cache_phase.serve(ctx, document)
    except Problem as exc:
        cache = ctx.cache
        if not document.storing or document.fresh or exc.status not in STALE_IF or not ctx.settings.stale_if_error:
            raise
        assert cache is not None  # (storing)
        stale = await asyncio.to_thread(documents.get_json, cache, url, access.audiences(ctx), True)
        if stale is None:
            raise
        await access.admit(ctx, target.study, (stale[1],))
        # RFC 7234 §5.5.1 (stale-if-error, RFC 5861): the last good answer, marked, instead of the failure.
        return _document(stale[0], [("X-Cache", "STALE"), ("Warning", '110 - "Response is Stale"')])


class _Document:
    """A metadata document as the cache phase (cache_phase.py) serves it: from the metadata cache (the disk
    tier, `metadata_cache_ttl`; not on `Cache-Control: no-cache`), or from the archives, stored before
    answering; a request that follows another gets the document that one fetched."""

    want = False

    def __init__(self, request: Request, ctx: Context, target: Target, archives: list[Archive], path: str,
                 url: str) -> None:
        self.request, self.ctx, self.target, self.archives, self.path, self.url = \
            request, ctx, target, archives, path, url
        self.study = target.study
        self.fresh = "no-cache" in request.headers.get("cache-control", "").lower()
        self.storing = ctx.cache is not None and ctx.settings.metadata_cache_ttl > 0
        self.found: tuple[bytes, Heard, list[tuple[str, str]]] | None = None  # body, audiences, headers

    async def look(self, heard_by: tuple[str, ...]) -> bool:
        if not self.storing or self.fresh:
            return False
        assert self.ctx.cache is not None
        found = await asyncio.to_thread(documents.get_json, self.ctx.cache, self.url, heard_by)
        if found is not None:
            self.found = (found[0], frozenset((found[1],)), [("X-Cache", "HIT")])
        return found is not None

    def adopt(self, values: list[Any]) -> bool:
        """What another request fetched meanwhile: the same bytes, in a response of this request's own."""
        for answer, heard in values:
            warnings = [("Warning", w) for w in answer.headers.getlist("warning")]
            self.found = (bytes(answer.body), heard, [("X-Cache", "HIT"), *warnings])
            return True
        return False

    def audiences(self) -> set[str]:
        return set() if self.found is None else set(self.found[1])

    def keys(self) -> list[str]:
        return ["metadata/" + self.url]

    def carriers(self, ctx: Context) -> list[asyncio.Future[Any]]:
        return []

    def answer(self) -> AnyResponse:
        assert self.found is not None
        return _document(self.found[0], self.found[2])

    async def fetch(self, flight: Flight | None) -> AnyResponse:
        ctx, cache = self.ctx, self.ctx.cache
        answer, heard = await _metadata(self.request, ctx, self.target, self.archives, self.path)
        audience = _one_audience(heard)
        if self.storing and audience is not None and answer.status_code == 200 and "warning" not in answer.headers:
            # Stored before answering, so that the next request (from any worker) is a hit; by the writer
            # thread, ahead of the frames a prefetch queues there (cache.write_first).
            assert cache is not None
            await cache.write_first(documents.put_json, cache, self.url, audience, bytes(answer.body),
                                    self.study, ctx.settings.metadata_cache_ttl, ctx.settings.stale_if_error)
            answer.headers["X-Cache"] = "MISS"
        if flight is not None:
            flight.end(value=(answer, heard))  # its followers here answer with it
        return answer

    def hands(self, failure: Problem) -> bool:
        return True

    def stop(self) -> None:
        return None


async def _metadata(request: Request, ctx: Context, target: Target, archives: list[Archive],
                    path: str) -> tuple[Response, Heard]:
    if target.series is None and len(archives) == 1 and not archives[0].profile.whole_retrieve:
        body = await _study_metadata(request, ctx, target, archives[0])
        if body is None:
            raise Problem(404, "no such resource in the archive")
        return Response(body, 200, media_type="application/dicom+json", headers=dict([VARY])), \
            frozenset((archives[0].audience,))
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
            if target.series is None and not archive.profile.whole_retrieve:
                body = await _study_metadata(request, ctx, target, archive)
            else:
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
