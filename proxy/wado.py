"""WADO-RS retrieve: negotiate, ask an archive with one explicit Accept, stream the answer back.

Phases of a retrieve: negotiate (media.py) → pick archives (context) → upstream request with one
media range the archive is known to accept → re-frame the multipart under our own boundary, part by
part, with truthful `Content-Type` and rewritten `Content-Location` (M-01..M-07) → client.
Pixel bytes are passed on as the slices the parser produced; nothing is buffered beyond one chunk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from . import part10
from .context import Context
from .media import ANY_TS, BadAccept, NotAcceptable, Resource, Selection, negotiate, parse_content_type
from .multipart import Event, MultipartError, MultipartReader, MultipartWriter, PartEnd, PartHeaders
from .responses import Problem, StreamAborted, StreamResponse
from .upstream import Archive, UpstreamError, UpstreamResponse
from .urls import dicomweb_base

VARY = ("Vary", "Accept")


@dataclass(frozen=True)
class Target:
    """The UIDs (and frame numbers) a WADO-RS URL names."""

    study: str
    series: str | None = None
    instance: str | None = None
    frames: tuple[int, ...] | None = None

    def path(self) -> str:
        """The DICOMweb path of the resource, relative to a service base URL."""
        p = f"/studies/{self.study}"
        if self.series:
            p += f"/series/{self.series}"
        if self.instance:
            p += f"/instances/{self.instance}"
        if self.frames:
            p += "/frames/" + ",".join(map(str, self.frames))
        return p


def client_accept(request: Request) -> str | None:
    """The `accept` query parameter wins over the Accept header (W-06, PS3.18 §8.7.8.1)."""
    return request.query_params.get("accept") or request.headers.get("accept")


def select(request: Request, resource: Resource, single_item: bool) -> Selection:
    """Negotiate, turning failures into 400/406 Problems."""
    try:
        return negotiate(client_accept(request), resource, single_item)
    except BadAccept as exc:
        raise Problem(400, f"malformed Accept: {exc}") from None
    except NotAcceptable as exc:
        raise Problem(406, str(exc)) from None


def upstream_accept(sel: Selection, resource: Resource, archive: Archive) -> tuple[str, bool]:
    """The one media range to send the archive, and whether to unwrap a single part from it."""
    if not sel.multipart and sel.media_type in ("application/dicom+json", "image/jpeg", "image/png", "image/gif"):
        return sel.media_type, False
    prof = archive.profile
    single_native = (resource is Resource.INSTANCE and prof.single_part_instance) or (
        resource is Resource.FRAMES and prof.single_part_frame)
    if not sel.multipart and single_native:
        return f"{sel.media_type}; transfer-syntax={sel.transfer_syntax}", False
    q = '"' if prof.quote_type else ""
    ts = f"; transfer-syntax={sel.transfer_syntax}" if sel.transfer_syntax else ""
    return f"multipart/related; type={q}{sel.media_type}{q}{ts}", not sel.multipart


async def open_upstream(ctx: Context, study: str | None, path: str, accept: str, request: Request,
                        service: str, query: str = "",
                        archives: list[Archive] | None = None) -> tuple[UpstreamResponse, AsyncExitStack]:
    """Open the first archive that has the resource (a 404 or an unreachable archive moves on)."""
    candidates = archives if archives is not None else ctx.archives_for(study or "")
    last: Problem | None = None
    headers = {"Accept": accept}
    rid = request.scope.get("state", {}).get("request_id")
    if rid:
        headers["X-Request-ID"] = rid
    for i, archive in enumerate(candidates):
        stack = AsyncExitStack()
        try:
            resp = await stack.enter_async_context(archive.open("GET", path, query, headers, service=service))
        except UpstreamError as exc:
            await stack.aclose()
            last = Problem(exc.status, exc.reason)
            continue
        if resp.status == 404 and i + 1 < len(candidates):
            await stack.aclose()
            last = Problem(404, "not found in any archive")
            continue
        return resp, stack
    raise last or Problem(502, "no archive is configured")


def upstream_problem(resp: UpstreamResponse, sel: Selection | None) -> Problem:
    """What the client hears when the archive answered an error status."""
    s, name = resp.status, resp.archive.name
    if s == 404:
        return Problem(404, "no such resource in the archive")
    if s in (400, 406, 415, 409, 410, 413):
        return Problem(s, f"archive '{name}' refused the request (HTTP {s})")
    if s == 500 and sel is not None and sel.transfer_syntax not in (None, ANY_TS):
        # Orthanc answers 500 when it cannot transcode (real-stack.md §0.4): nothing acceptable.
        return Problem(406, f"archive '{name}' cannot provide transfer syntax {sel.transfer_syntax}")
    if s in (401, 403):
        return Problem(502, f"archive '{name}' refused the proxy's credentials (HTTP {s})")
    if s == 503:
        return Problem(503, f"archive '{name}' is unavailable", {"Retry-After": resp.headers.get("Retry-After", "5")})
    return Problem(502, f"archive '{name}' failed (HTTP {s})")


class PartEvents:
    """Pull-style events from an upstream multipart body."""

    def __init__(self, resp: UpstreamResponse) -> None:
        mtype, params = parse_content_type(resp.content_type)
        if not mtype.startswith("multipart/") or not params.get("boundary"):
            raise Problem(502, f"archive '{resp.archive.name}' sent {mtype or 'no content type'} "
                               "where multipart/related was expected")
        self.reader = MultipartReader(params["boundary"])
        self.chunks = resp.iter_chunks()
        self.pending: deque[Event] = deque()

    async def next(self) -> Event | None:
        """The next event, None at a clean end; MultipartError/UpstreamError on a broken body."""
        while not self.pending:
            chunk = await anext(self.chunks, None)
            if chunk is None:
                self.reader.close()
                return None
            self.pending.extend(self.reader.feed(chunk))
        return self.pending.popleft()


async def _first_part(events: PartEvents, archive: str) -> PartHeaders | None:
    try:
        ev = await events.next()
    except (MultipartError, UpstreamError) as exc:
        raise Problem(502, f"archive '{archive}' sent a broken multipart body ({exc})") from None
    if ev is not None and not isinstance(ev, PartHeaders):
        raise Problem(502, f"archive '{archive}' sent a malformed multipart body")
    return ev


async def _labelled(events: PartEvents, headers: PartHeaders, sel: Selection) -> tuple[str, list[Event]]:
    """The part's Content-Type with its transfer syntax; for DICOM parts read from the File Meta."""
    ctype = headers.headers.get("content-type", sel.media_type)
    mtype, params = parse_content_type(ctype)
    ts = params.get("transfer-syntax")
    held: list[Event] = []
    if mtype == "application/dicom" and not ts:
        head = b""
        while True:
            found = part10.transfer_syntax(head)
            if found != part10.NEED_MORE:
                ts = found
                break
            ev = await events.next()
            if ev is None or isinstance(ev, PartEnd | PartHeaders):
                if ev is not None:
                    held.append(ev)
                break
            held.append(ev)
            head += bytes(ev[: part10.MAX_META - len(head)])
    if not mtype:
        mtype = sel.media_type
    if ts is None and sel.transfer_syntax not in (None, ANY_TS):
        ts = sel.transfer_syntax
    return (f"{mtype}; transfer-syntax={ts}" if ts else mtype), held


async def multipart_body(events: PartEvents, first: PartHeaders | None, writer: MultipartWriter,
                         sel: Selection, archive: Archive, base: str,
                         frame_locations: list[str] | None = None) -> AsyncIterator[bytes]:
    """Re-frame the archive's parts under `writer`'s boundary."""
    ev: Event | None = first
    index = 0
    try:
        while ev is not None:
            if isinstance(ev, PartHeaders):
                ctype, held = await _labelled(events, ev, sel)
                loc = ev.headers.get("content-location")
                if loc:
                    loc = archive.rewriter.rewrite_url(loc, base)
                elif frame_locations and index < len(frame_locations):
                    loc = frame_locations[index]
                length = ev.headers.get("content-length")
                yield writer.part(ctype, loc, int(length) if length and length.isdigit() else None)
                index += 1
                for h in held:
                    if isinstance(h, PartHeaders):
                        ev = h
                        break
                    if not isinstance(h, PartEnd):
                        yield h
                else:
                    ev = await events.next()
                continue
            if not isinstance(ev, PartEnd):
                yield ev
            ev = await events.next()
        yield writer.close()
    except (MultipartError, UpstreamError) as exc:
        raise StreamAborted(f"archive '{archive.name}': {exc}") from None


async def single_body(events: PartEvents, first: PartHeaders, archive: Archive) -> AsyncIterator[bytes]:
    """The payload of the first part only, as a single-part body."""
    try:
        while True:
            ev = await events.next()
            if ev is None or isinstance(ev, PartEnd | PartHeaders):
                return
            yield ev
    except (MultipartError, UpstreamError) as exc:
        raise StreamAborted(f"archive '{archive.name}': {exc}") from None


async def retrieve(request: Request, ctx: Context, target: Target, resource: Resource, service: str,
                   upstream_path: str | None = None, archives: list[Archive] | None = None,
                   location: str | None = None) -> StreamResponse:
    """Study, series, instance, frames and bulk data retrieve, streamed."""
    single_item = resource is Resource.INSTANCE or (
        resource is Resource.FRAMES and target.frames is not None and len(target.frames) == 1) or (
        resource is Resource.BULKDATA)
    sel = select(request, resource, single_item)
    candidates = archives if archives is not None else ctx.archives_for(target.study)
    if not candidates:
        raise Problem(502, "no archive is configured")
    accept, unwrap = upstream_accept(sel, resource, candidates[0])
    resp, stack = await open_upstream(ctx, target.study, upstream_path or target.path(), accept, request,
                                      service, archives=candidates)
    try:
        if resp.status >= 300:
            raise upstream_problem(resp, sel)
        base = dicomweb_base(request, ctx.settings)
        if not sel.multipart and not unwrap:
            # The archive answered single-part itself: pass the body through.
            ctype = resp.content_type or sel.media_type
            headers = [("Content-Type", ctype), VARY]
            if "Content-Length" in resp.headers:
                headers.append(("Content-Length", resp.headers["Content-Length"]))
            return StreamResponse(200, headers, _passthrough(resp), stack.aclose)
        events = PartEvents(resp)
        first = await _first_part(events, resp.archive.name)
        if unwrap:
            if first is None:
                raise Problem(404, "the archive returned no content")
            ctype, held = await _labelled(events, first, sel)
            headers = [("Content-Type", ctype), VARY]
            if location:
                headers.append(("Content-Location", location))
            if not held and first.headers.get("content-length", "").isdigit():
                headers.append(("Content-Length", first.headers["content-length"]))
            return StreamResponse(200, headers, _prepend(held, single_body(events, first, resp.archive)),
                                  stack.aclose)
        writer = MultipartWriter()
        frame_locs = None
        if target.frames:
            frame_locs = [f"{base}{Target(target.study, target.series, target.instance, (n,)).path()}"
                          for n in target.frames]
        elif location:
            frame_locs = [location]
        part_type = sel.media_type
        if first is not None:
            part_type = parse_content_type(first.headers.get("content-type", part_type))[0] or part_type
        headers = [("Content-Type", writer.content_type(part_type)), VARY]
        body = multipart_body(events, first, writer, sel, resp.archive, base, frame_locs)
        return StreamResponse(200, headers, body, stack.aclose,
                              watch_disconnect=resource in (Resource.INSTANCES, Resource.BULKDATA))
    except BaseException:
        await stack.aclose()
        raise


async def _prepend(held: list[Event], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for h in held:
        if isinstance(h, PartEnd | PartHeaders):
            return
        yield h
    async for chunk in rest:
        yield chunk


async def _passthrough(resp: UpstreamResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.iter_chunks():
            yield chunk
    except UpstreamError as exc:
        raise StreamAborted(str(exc)) from None


async def metadata(request: Request, ctx: Context, target: Target) -> Response:
    """Study, series or instance metadata: JSON with every BulkDataURI pointed at the proxy."""
    select(request, Resource.JSON, True)
    resp, stack = await open_upstream(ctx, target.study, target.path() + "/metadata",
                                      "application/dicom+json", request, "metadata")
    async with stack:
        if resp.status >= 300:
            raise upstream_problem(resp, None)
        try:
            body = await resp.read(ctx.settings.max_json_bytes)
        except UpstreamError as exc:
            raise Problem(exc.status, exc.reason) from None
        body = resp.archive.rewriter.rewrite_json(body, dicomweb_base(request, ctx.settings))
    return Response(body, 200, media_type="application/dicom+json", headers=dict([VARY]))


async def rendered(request: Request, ctx: Context, target: Target, thumbnail: bool) -> StreamResponse:
    """Rendered images and thumbnails (made from /rendered where the archive has no thumbnails)."""
    sel = select(request, Resource.RENDERED, True)
    query = rendered_query(request, thumbnail)
    candidates = ctx.archives_for(target.study)
    if not candidates:
        raise Problem(502, "no archive is configured")
    use_rendered = not thumbnail or not candidates[0].profile.thumbnail
    suffix = "/rendered" if use_rendered else "/thumbnail"
    if thumbnail and use_rendered and "viewport=" not in query:
        query = "&".join(filter(None, [query, "viewport=128,128"]))
    resp, stack = await open_upstream(ctx, target.study, target.path() + suffix, sel.media_type, request,
                                      "thumbnail" if thumbnail else "rendered", query=query)
    try:
        if resp.status >= 300:
            raise upstream_problem(resp, None)
        ctype = parse_content_type(resp.content_type)[0]
        if not ctype.startswith("image/") and not ctype.startswith("video/"):
            raise Problem(502, f"archive '{resp.archive.name}' sent {ctype or 'no content type'} for a "
                               "rendered image")
        headers = [("Content-Type", resp.content_type), VARY]
        if "Content-Length" in resp.headers:
            headers.append(("Content-Length", resp.headers["Content-Length"]))
        return StreamResponse(200, headers, _passthrough(resp), stack.aclose)
    except BaseException:
        await stack.aclose()
        raise


_RENDER_PARAMS = {"annotation", "quality", "viewport", "window", "iccprofile"}


def rendered_query(request: Request, thumbnail: bool) -> str:
    """Validated rendering parameters (W-19), re-encoded for any archive."""
    out = []
    for key, value in request.query_params.multi_items():
        if key == "accept":
            continue
        if key not in _RENDER_PARAMS:
            raise Problem(400, f"unknown rendering parameter {key!r}")
        if not value or any(not (c.isalnum() or c in ",.-") for c in value):
            raise Problem(400, f"malformed value for {key!r}")
        out.append(f"{key}={value}")
    return "&".join(out)
