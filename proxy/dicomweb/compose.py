"""Resources the proxy composes where archives lack them: `/bulkdata` and `/pixeldata` (PS3.18 Annex H).

Both are built from the resource's metadata: the bulk data URIs it lists (or, for compressed pixel
data that Orthanc leaves out of metadata, the instance's frames), fetched one after another and
streamed as parts under one boundary, each with a `Content-Location` that points at the proxy (as
PS3.18 §10.4.3.3.6 asks: the URI the metadata gives).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.requests import Request

from proxy.cache.placement import SHARED, Placement
from proxy.dicomweb import objects
from proxy.dicomweb.context import Context
from proxy.dicomweb.fetch import open_upstream, upstream_problem
from proxy.dicomweb.responses import StreamResponse
from proxy.dicomweb.target import VARY, Target, dicomweb_base, select
from proxy.errors import Problem, StreamAborted
from proxy.formats.media import Resource
from proxy.formats.multipart import MultipartError, MultipartWriter, PartEnd, PartHeaders
from proxy.upstream.archive import Archive, UpstreamError
from proxy.upstream.parts import Kept, PartEvents

PIXEL_DATA = "7FE00010"
BULK_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


async def _metadata(request: Request, ctx: Context, target: Target) -> tuple[Archive, list[dict[str, Any]]]:
    resp, stack = await open_upstream(ctx, target.study, target.path() + "/metadata", "application/dicom+json",
                                      request, "metadata")
    async with stack:
        if resp.status >= 300:
            raise upstream_problem(resp, None)
        try:
            body = await resp.read(ctx.settings.max_json_bytes)
            instances = json.loads(body)
        except UpstreamError as exc:
            raise Problem(exc.status, exc.reason) from None
        except ValueError:
            raise Problem(502, f"archive '{resp.archive.name}' sent metadata that is not JSON") from None
    if not isinstance(instances, list):
        raise Problem(502, f"archive '{resp.archive.name}' sent metadata that is not a JSON array")
    return resp.archive, [i for i in instances if isinstance(i, dict)]


def _bulk_uris(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        uri = obj.get("BulkDataURI")
        if isinstance(uri, str):
            yield uri
        for v in obj.values():
            if isinstance(v, dict | list):
                yield from _bulk_uris(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _bulk_uris(v)


def _value(instance: dict[str, Any], tag: str) -> Any:
    values = instance.get(tag, {}).get("Value") or [None]
    return values[0]


def _pixel_items(instance: dict[str, Any], archive: Archive, base: str) -> list[tuple[str, list[str]]]:
    """(archive path, Content-Location of each part) for one instance's pixel data."""
    study, series, sop = (_value(instance, t) for t in ("0020000D", "0020000E", "00080018"))
    if not all(isinstance(v, str) for v in (study, series, sop)):
        return []
    inst = Target(study, series, sop)
    uri = instance.get(PIXEL_DATA, {}).get("BulkDataURI")
    path = archive.rewriter.archive_path(uri) if isinstance(uri, str) else None
    if path is not None:
        return [(path, [f"{base}{inst.path()}/pixeldata"])]
    frames = _value(instance, "00280008")
    count = int(frames) if isinstance(frames, int | float | str) and str(frames).isdigit() else 1
    if "00280010" not in instance:  # no image pixel module: nothing to send
        return []
    numbers = tuple(range(1, count + 1))
    locations = [f"{base}{Target(study, series, sop, (n,)).path()}" for n in numbers]
    return [(Target(study, series, sop, numbers).path(), locations)]


async def composed(request: Request, ctx: Context, target: Target, pixeldata: bool) -> StreamResponse:
    """`.../bulkdata` or `.../pixeldata` of a study, series or instance, as one multipart stream."""
    select(request, Resource.BULKDATA, False)
    archive, instances = await _metadata(request, ctx, target)
    base = dicomweb_base(request, ctx.settings, ctx.root)
    items: list[tuple[str, list[str]]] = []
    for inst in instances:
        if pixeldata:
            items += _pixel_items(inst, archive, base)
            continue
        for uri in _bulk_uris(inst):
            path = archive.rewriter.archive_path(uri)
            if path is not None:
                items.append((path, [archive.rewriter.rewrite_url(uri, base)]))
    if not items:
        raise Problem(404, "the resource has no " + ("pixel data" if pixeldata else "bulk data"))
    writer = MultipartWriter()
    headers = [("Content-Type", writer.content_type("application/octet-stream")), VARY]
    return StreamResponse(200, headers, _body(request, ctx, archive, items, writer), watch_disconnect=True)


def _element_key(path: str) -> objects.Key | None:
    """The cache key of a bulk data element named by an archive path (the one the element's own URL uses
    when asked with `transfer-syntax=*`), or None for anything else (pixel data as frames)."""
    m = objects.HIERARCHY.search(path)
    if m is None or not m.group(4).startswith("bulk/"):
        return None
    return objects.Key("bulkdata", f"{m.group(3)}/{m.group(4)[5:].lower()}", "application/octet-stream", "*",
                       Placement(m.group(1), m.group(2)))


async def _body(request: Request, ctx: Context, archive: Archive, items: list[tuple[str, list[str]]],
                writer: MultipartWriter) -> AsyncIterator[bytes | memoryview]:
    for path, locations in items:
        key = _element_key(path) if ctx.cache is not None else None
        if key is not None and ctx.cache is not None:
            # What this archive answered, for every reader or for this caller: the archive has just answered
            # the caller's metadata request about the study, with the caller's token where it takes one.
            hit = objects.lookup(ctx.cache, key, (SHARED, archive.audience) if archive.audience else (SHARED,))
            if hit is not None:  # an element already fetched (here or through its own URL): no archive I/O
                yield writer.part(hit.content_type, locations[0], len(hit.payload))
                yield hit.payload
                continue
        kept = Kept(objects.keeper(ctx.cache, key) if key is not None and ctx.cache is not None else None, "",
                    archive.audience)
        try:
            resp, stack = await open_upstream(ctx, None, path, BULK_ACCEPT, request, "bulkdata", archives=[archive])
        except Problem as exc:
            raise StreamAborted(exc.reason) from None
        async with stack:
            if resp.status >= 300:
                raise StreamAborted(f"archive '{archive.name}' answered {resp.status} for a bulk data element")
            try:
                events = PartEvents(resp)
            except Problem as exc:
                raise StreamAborted(exc.reason) from None
            index = ended = 0
            try:
                while (ev := await events.next()) is not None:
                    if isinstance(ev, PartHeaders):
                        loc = locations[min(index, len(locations) - 1)]
                        kept.content_type = ev.headers.get("content-type", "application/octet-stream")
                        yield writer.part(kept.content_type, loc)
                        index += 1
                    elif isinstance(ev, PartEnd):
                        ended = index
                    else:
                        kept.add(ev)
                        yield ev
                if index == ended == 1:  # one part, ended cleanly, then the body: the element is whole
                    kept.done()
            except (MultipartError, UpstreamError) as exc:
                raise StreamAborted(f"archive '{archive.name}': {exc}") from None
    yield writer.close()
