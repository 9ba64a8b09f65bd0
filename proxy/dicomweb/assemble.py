"""A study or series retrieved instance by instance, for an archive that has no study or series retrieve
(`Profile.whole_retrieve` False: AWS HealthImaging documents GetDICOMInstance, GetDICOMInstanceFrames,
GetDICOMInstanceMetadata and GetDICOMSeriesMetadata, nothing wider).

Instances: the study's series are searched, then each series' instances (QIDO-RS, paged), then each
instance is retrieved in turn (single part, application/dicom) and written as one part of our multipart
answer. One instance's answer is open at a time and its bytes pass straight through, so memory is that of
one piece in flight plus the list of UIDs, whatever the size of the study.
Metadata: a JSON document the proxy reads whole anyway (bounded by `max_json_bytes`): the series' metadata
arrays are joined into one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from functools import partial

from starlette.requests import Request

from proxy.dicomweb.context import Context
from proxy.dicomweb.fetch import json_answer, open_upstream, upstream_problem
from proxy.dicomweb.responses import StreamResponse
from proxy.dicomweb.target import VARY, Target, dicomweb_base
from proxy.errors import Problem, StreamAborted
from proxy.federation import merge
from proxy.formats.media import Selection
from proxy.formats.multipart import MultipartWriter
from proxy.upstream.archive import Archive, UpstreamError, UpstreamResponse
from proxy.upstream.parts import Keep, Kept

SERIES_UID = "0020000E"
SOP_UID = "00080018"


async def series_of(request: Request, ctx: Context, archive: Archive, study: str) -> list[str]:
    """The Series Instance UIDs of `study` at `archive` (none when it does not hold the study)."""
    return await _uids(request, ctx, archive, f"/studies/{study}/series", SERIES_UID)


async def _json(request: Request, ctx: Context, archive: Archive, path: str, service: str,
                query: str = "") -> bytes | None:
    """A JSON answer of `archive` (None for 204 or 404)."""
    resp, stack = await open_upstream(ctx, None, path, "application/dicom+json", request, service, query=query,
                                      archives=[archive])
    async with stack:
        if resp.status in (204, 404):
            return None
        if resp.status >= 300:
            raise upstream_problem(resp, None)
        body = await json_answer(ctx, resp)
    if body.strip() and not body.lstrip().startswith(b"["):
        raise Problem(502, f"archive '{archive.name}' sent a JSON answer that is not an array")
    return body if body.strip() else None


async def study_metadata(request: Request, ctx: Context, archive: Archive, study: str) -> bytes | None:
    """The study's metadata: each series' metadata array, joined (None when the archive has none)."""
    pieces: list[bytes] = []
    size = 0
    for uid in await series_of(request, ctx, archive, study):
        body = await _json(request, ctx, archive, f"/studies/{study}/series/{uid}/metadata", "metadata")
        inner = body.strip()[1:-1].strip() if body else b""
        size += len(inner)
        if size > ctx.settings.max_json_bytes:
            raise Problem(502, f"archive '{archive.name}' holds more metadata for this study than "
                               f"max_json_bytes ({ctx.settings.max_json_bytes})")
        if inner:
            pieces.append(inner)
    return b"[" + b",".join(pieces) + b"]" if pieces else None


async def _uids(request: Request, ctx: Context, archive: Archive, path: str, tag: str) -> list[str]:
    """The values of `tag` in a search of `path` at `archive`, in the archive's order, paged through (as far
    as the archive's searches reach: `Profile.max_results`)."""
    uids: list[str] = []
    seen: set[str] = set()
    page = archive.profile.max_limit or 1000
    reach = archive.profile.max_results
    offset = 0
    while reach is None or offset < reach:
        size = page if reach is None else min(page, reach - offset)
        query = f"includefield={tag}&limit={size}" + (f"&offset={offset}" if offset else "")
        body = await _json(request, ctx, archive, path, "qido", query)
        got = [merge.value(r, tag) for r in (merge.loads(body) if body else [])]
        for uid in got:
            if isinstance(uid, str) and uid and uid not in seen:
                seen.add(uid)
                uids.append(uid)
        offset += len(got)
        if len(got) < size:
            break
    return uids


async def _instance(request: Request, ctx: Context, archive: Archive, target: Target, accept: str,
                    service: str) -> tuple[UpstreamResponse, AsyncExitStack] | None:
    """One instance's single-part retrieve, opened (None when the archive no longer has it)."""
    resp, stack = await open_upstream(ctx, target.study, target.path(), accept, request, service, archives=[archive])
    if resp.status == 200:
        return resp, stack
    await stack.aclose()
    if resp.status == 404:
        return None
    raise upstream_problem(resp, None)


async def plan(request: Request, ctx: Context, target: Target, archive: Archive) -> list[Target]:
    """The instances of the study or series `target` names at `archive`, from its searches."""
    series = [target.series] if target.series else await series_of(request, ctx, archive, target.study)
    found: list[Target] = []
    for uid in series:
        path = f"/studies/{target.study}/series/{uid}/instances"
        found += [Target(target.study, uid, sop) for sop in await _uids(request, ctx, archive, path, SOP_UID)]
    return found


async def parts(request: Request, ctx: Context, archive: Archive, planned: list[Target], sel: Selection,
                writer: MultipartWriter, service: str, seen: set[str] | None = None,
                tee: Keep | None = None) -> AsyncIterator[bytes | memoryview]:
    """The planned instances retrieved one at a time, each written as one part (an instance in `seen`, sent
    already by another archive, is skipped); `tee` (the frame cache learning) is given each whole one."""
    accept = "application/dicom" + (f"; transfer-syntax={sel.transfer_syntax}" if sel.transfer_syntax else "")
    base = dicomweb_base(request, ctx.settings, ctx.root)
    for one in planned:
        if seen is not None and one.instance is not None:
            if one.instance in seen:
                continue
            seen.add(one.instance)
        try:
            opened = await _instance(request, ctx, archive, one, accept, service)
        except Problem as exc:
            raise StreamAborted(f"archive '{archive.name}': {exc.reason}") from None
        if opened is None:
            continue
        resp, stack = opened
        async with stack:
            length = resp.headers.get("Content-Length")
            size = int(length) if length and length.isdigit() else None
            kept = Kept(tee, resp.content_type or "application/dicom", archive.audience)
            yield writer.part(kept.content_type, base + one.path(), size)
            try:
                async for chunk in resp.iter_chunks():
                    kept.add(chunk)
                    yield chunk
            except UpstreamError as exc:
                raise StreamAborted(str(exc)) from None
            if size is None or size == kept.size:
                kept.done()


def check_media(sel: Selection, archive: Archive) -> None:
    """406 unless the client takes instances as application/dicom (what the archive retrieves one by one)."""
    if sel.media_type != "application/dicom":
        raise Problem(406, f"archive '{archive.name}' retrieves a study or series as application/dicom only")


async def instances(request: Request, ctx: Context, target: Target, sel: Selection, archive: Archive,
                    service: str) -> StreamResponse:
    """A study's or series' instances, one at a time from the archive, as one multipart answer, streamed:
    one instance's answer is open at a time, so memory stays that of one piece in flight."""
    check_media(sel, archive)
    planned = await plan(request, ctx, target, archive)
    if not planned:
        raise Problem(404, "the archive holds no instances here")
    writer = MultipartWriter()
    headers = [("Content-Type", writer.content_type("application/dicom", sel.transfer_syntax)), VARY]

    tee = partial(ctx.learner.learn_instance, ctx.cache, native=sel.transfer_syntax == "*") \
        if ctx.cache is not None else None

    async def body() -> AsyncIterator[bytes | memoryview]:
        async for chunk in parts(request, ctx, archive, planned, sel, writer, service, tee=tee):
            yield chunk
        yield writer.close()

    return StreamResponse(200, headers, body(), watch_disconnect=True)
