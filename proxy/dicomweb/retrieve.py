"""WADO-RS retrieve: negotiate, find the archives that hold the study, stream the answer back.

Phases of a retrieve: negotiate (target.py, media.py) → locate (fetch.py: which archives hold the study) →
upstream request with one media range the archive is known to accept → re-frame under our own
boundary (reframe.py) → client. A study or series held by several archives comes back as one
response, each instance once; an instance or frame comes from the first archive that has it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from functools import partial

from starlette.requests import Request

from proxy.cache.learning import Retrieving
from proxy.dicomweb import assemble
from proxy.dicomweb.context import Context
from proxy.dicomweb.fetch import locate, open_upstream, upstream_problem
from proxy.dicomweb.reframe import PartOut, Reframer, label, payload
from proxy.dicomweb.responses import StreamResponse
from proxy.dicomweb.target import VARY, Target, dicomweb_base, select, upstream_accept
from proxy.errors import Problem, StreamAborted
from proxy.formats.media import Resource, Selection, parse_content_type
from proxy.formats.multipart import MultipartError
from proxy.upstream import splice
from proxy.upstream.archive import Archive, UpstreamError, UpstreamResponse
from proxy.upstream.parts import Keep, Kept, PartEvents, sent_whole
from proxy.upstream.splice import Relay


async def retrieve(request: Request, ctx: Context, target: Target, resource: Resource, service: str,
                   upstream_path: str | None = None, archives: list[Archive] | None = None,
                   location: str | None = None, keep: Keep | None = None) -> StreamResponse:
    """Study, series, instance, frames and bulk data retrieve, streamed. `keep` (one instance or bulk
    data element) is given the content type and payload of the part once it passed through whole."""
    one_frame = resource is Resource.FRAMES and target.frames is not None and len(target.frames) == 1
    single_item = resource in (Resource.INSTANCE, Resource.BULKDATA) or one_frame
    sel = select(request, resource, single_item)
    candidates = archives if archives is not None else await locate(ctx, target.study)
    accept, unwrap = upstream_accept(sel, resource, candidates[0])
    path = upstream_path or target.path()
    if resource is Resource.INSTANCES and not candidates[0].profile.whole_retrieve and len(candidates) == 1:
        return await assemble.instances(request, ctx, target, sel, candidates[0], service)  # one at a time
    if resource is Resource.INSTANCES and len(candidates) > 1:
        return await _retrieve_federated(request, ctx, target, sel, candidates, path, accept, service)
    fetching = None
    if ctx.cache is not None and resource in (Resource.INSTANCE, Resource.INSTANCES):
        fetching = ctx.learner.retrieving(ctx.cache, target.study, target.series, target.instance)  # frame
        # requests follow this retrieve
        if target.instance is None:
            ctx.prefetch.yield_to(target.study, target.series)  # this retrieve teaches the cache the same instances
    # Nothing keeps the body (no cache tee): it will be relayed past Python, so read only its start.
    relay = splice.offered(request.scope) and keep is None and fetching is None
    try:
        resp, stack = await open_upstream(ctx, target.study, path, accept, request, service, archives=candidates,
                                          relay=relay)
    except BaseException:
        if fetching is not None:
            await fetching.done()
        raise
    if fetching is not None:
        stack.push_async_callback(fetching.done)
    try:
        if resp.status >= 300:
            raise upstream_problem(resp, sel)
        if not sel.multipart and not unwrap:
            # The archive answered single-part itself: pass the body through.
            headers = [("Content-Type", resp.content_type or sel.media_type), VARY]
            if "Content-Length" in resp.headers:
                headers.append(("Content-Length", resp.headers["Content-Length"]))
            return StreamResponse(200, headers, _passthrough(resp, keep, splice.offered(request.scope)),
                                  stack.aclose)
        reframer = _reframer(request, ctx, target, sel, location, fetching, keep)
        return await _reframed(request, reframer, resp, stack, sel, resource, unwrap, keep, location)
    except BaseException:
        await stack.aclose()
        raise


def _reframer(request: Request, ctx: Context, target: Target, sel: Selection, location: str | None,
              fetching: Retrieving | None, keep: Keep | None) -> Reframer:
    """Our framing of the archive's parts: their Content-Locations, and what tees each whole part (the
    frame cache learning instances, a cache keeping this one object)."""
    base = dicomweb_base(request, ctx.settings, ctx.root)
    locations = None
    if target.frames:
        locations = [f"{base}{Target(target.study, target.series, target.instance, (n,)).path()}"
                     for n in target.frames]
    elif location:
        locations = [location]
    reframer = Reframer(sel, base, locations)
    learn = partial(ctx.learner.learn_instance, ctx.cache, retrieving=fetching, native=sel.transfer_syntax == "*") \
        if ctx.cache is not None and fetching is not None else None
    reframer.tee = _both(learn, keep) if learn and keep else learn or keep
    reframer.relay = splice.offered(request.scope)
    return reframer


async def _reframed(request: Request, reframer: Reframer, resp: UpstreamResponse, stack: AsyncExitStack,
                    sel: Selection, resource: Resource, unwrap: bool, keep: Keep | None,
                    location: str | None) -> StreamResponse:
    """The archive's multipart answer as ours: one part unwrapped (a single-part answer the archive could
    only send as multipart), exactly one part of known size with a Content-Length, or chunked."""
    events = PartEvents(resp)
    first_headers = await events.first()
    try:
        first = await label(events, first_headers, sel, reframer.seen) if first_headers else None
    except UpstreamError as exc:
        raise Problem(exc.status, exc.reason) from None
    except MultipartError as exc:
        raise Problem(502, f"archive '{resp.archive.name}' sent a broken multipart body ({exc})") from None
    if unwrap:
        if first is None:
            raise Problem(404, "the archive returned no content")
        headers = [("Content-Type", first.content_type), VARY]
        if location:
            headers.append(("Content-Location", location))
        if not first.held and first.length is not None:
            headers.append(("Content-Length", str(first.length)))
        return StreamResponse(200, headers, payload(events, first, keep, splice.offered(request.scope)),
                              stack.aclose)
    part_type = parse_content_type(first.content_type)[0] if first else sel.media_type
    headers = [("Content-Type", reframer.writer.content_type(part_type)), VARY]
    one_frame = resource is Resource.FRAMES and len(reframer.locations or ()) == 1
    if (resource is Resource.INSTANCE or one_frame) and first is not None and first.length is not None:
        # Exactly one part is coming and its size is known: send a Content-Length, no chunking.
        head = reframer.header(first, resp.archive)
        tail = reframer.close()
        headers.append(("Content-Length", str(len(head) + first.length + len(tail))))
        body = _one_part(reframer, events, first, head, tail)
    else:
        body = _single_archive(reframer, events, first)
    return StreamResponse(200, headers, body, stack.aclose,
                          watch_disconnect=resource in (Resource.INSTANCES, Resource.BULKDATA))


def _both(first: Keep, second: Keep) -> Keep:
    def tee(content_type: str, pieces: list[bytes | memoryview], audience: str) -> None:
        first(content_type, pieces, audience)
        second(content_type, pieces, audience)
    return tee


async def _one_part(reframer: Reframer, events: PartEvents, first: PartOut, head: bytes,
                    tail: bytes) -> AsyncIterator[bytes | memoryview | Relay]:
    async for chunk in reframer.parts(events, first, max_parts=1, first_header=head):
        yield chunk
    yield tail
    await events.finish()


async def _single_archive(reframer: Reframer, events: PartEvents | None,
                          first: PartOut | None) -> AsyncIterator[bytes | memoryview | Relay]:
    if events is not None:
        async for chunk in reframer.parts(events, first):
            yield chunk
    yield reframer.close()


async def _open_each(request: Request, ctx: Context, archives: list[Archive], path: str, accept: str,
                    service: str) -> tuple[list[tuple[UpstreamResponse, AsyncExitStack]], list[str], Problem | None]:
    """Open the resource at every archive at once: (answers with content, Warnings, first failure)."""
    async def one(archive: Archive) -> tuple[UpstreamResponse, AsyncExitStack] | Problem:
        try:
            return await open_upstream(ctx, None, path, accept, request, service, archives=[archive])
        except Problem as exc:
            return exc

    opened = await asyncio.gather(*(one(a) for a in archives))
    found, warnings, failure = [], [], None
    for archive, result in zip(archives, opened, strict=True):
        if isinstance(result, Problem):
            failure = failure or result
            warnings.append(f"299 dicomweb-edge: archive '{archive.name}' is unavailable; "
                            "instances it holds are missing")
            continue
        resp, stack = result
        if resp.status == 404:
            await stack.aclose()
        elif resp.status >= 300:
            failure = failure or upstream_problem(resp, None)
            warnings.append(f"299 dicomweb-edge: archive '{archive.name}' answered HTTP {resp.status}; "
                            "instances it holds are missing")
            await stack.aclose()
        else:
            found.append(result)
    return found, warnings, failure


async def _built_plans(request: Request, ctx: Context, target: Target, archives: list[Archive]
                       ) -> tuple[list[tuple[Archive, list[Target]]], list[str], Problem | None]:
    """For the archives without a study or series retrieve: the instances each holds (assemble.py), the
    Warnings for those that could not be asked, the first failure."""
    plans, warnings, failure = [], [], None
    for archive in archives:
        try:
            planned = await assemble.plan(request, ctx, target, archive)
        except Problem as exc:
            failure = failure or exc
            warnings.append(f"299 dicomweb-edge: archive '{archive.name}' is unavailable; instances it holds are "
                            "missing")
            continue
        if planned:
            plans.append((archive, planned))
    return plans, warnings, failure


async def _retrieve_federated(request: Request, ctx: Context, target: Target, sel: Selection,
                              archives: list[Archive], path: str, accept: str, service: str) -> StreamResponse:
    """A study or series held by several archives: every archive's parts under one boundary, each
    instance once (an archive without a study or series retrieve: its instances one by one, assemble.py).
    An archive that fails is left out and named in a Warning."""
    built = [a for a in archives if not a.profile.whole_retrieve]
    for archive in built:
        assemble.check_media(sel, archive)
    found, warnings, failure = await _open_each(request, ctx, [a for a in archives if a not in built], path,
                                                accept, service)
    plans, more, built_failure = await _built_plans(request, ctx, target, built)
    warnings += more
    failure = failure or built_failure
    stacks = [stack for _, stack in found]

    async def close_all() -> None:
        for stack in stacks:
            await stack.aclose()

    if not found and not plans:
        raise failure or Problem(404, "no archive holds this resource")
    try:
        reframer = Reframer(sel, dicomweb_base(request, ctx.settings, ctx.root), dedupe=True)
        if ctx.cache is not None:
            reframer.tee = partial(ctx.learner.learn_instance, ctx.cache, native=sel.transfer_syntax == "*")
        reframer.relay = splice.offered(request.scope)
        streams = [PartEvents(resp) for resp, _ in found]
        heads = [await events.first() for events in streams]
        first_type = next((h.headers.get("content-type") for h in heads if h is not None), None)
        part_type = parse_content_type(first_type)[0] if first_type else sel.media_type
    except BaseException:
        await close_all()
        raise
    headers = [("Content-Type", reframer.writer.content_type(part_type or sel.media_type)), VARY]
    headers += [("Warning", w) for w in warnings]

    async def body() -> AsyncIterator[bytes | memoryview | Relay]:
        for events, head in zip(streams, heads, strict=True):
            if head is None:
                continue
            try:
                part = await label(events, head, sel, reframer.seen)
            except (UpstreamError, MultipartError) as exc:
                raise StreamAborted(f"archive '{events.archive.name}': {exc}") from None
            async for chunk in reframer.parts(events, part):
                yield chunk
        for archive, planned in plans:
            async for piece in assemble.parts(request, ctx, archive, planned, sel, reframer.writer, service,
                                              reframer.seen, reframer.tee):
                yield piece
        yield reframer.close()

    return StreamResponse(200, headers, body(), close_all, watch_disconnect=True)


async def _passthrough(resp: UpstreamResponse, keep: Keep | None = None,
                       relay: bool = False) -> AsyncIterator[bytes | memoryview | Relay]:
    kept = Kept(keep, resp.content_type or "", resp.archive.audience)
    length = resp.headers.get("Content-Length")
    if relay and keep is None and length and length.isdigit() and int(length) >= splice.MIN_RELAY:
        moving = resp.relay(int(length))  # the whole body, past Python (splice.py); else read as usual
        if moving is not None:
            yield moving
            sent_whole(moving, resp)
    else:
        resp.unwindow()  # not relayed: read the body as usual
    try:
        async for chunk in resp.iter_chunks():  # (after a relay: nothing is left, the body is complete)
            kept.add(chunk)
            yield chunk
    except UpstreamError as exc:
        raise StreamAborted(str(exc)) from None
    length = resp.headers.get("Content-Length")
    if kept.content_type and (length is None or not length.isdigit() or int(length) == kept.size):
        kept.done()


async def rendered(request: Request, ctx: Context, target: Target, thumbnail: bool,
                   keep: Keep | None = None) -> StreamResponse:
    """Rendered images and thumbnails (made from /rendered where the archive has no thumbnails);
    `keep` is given the content type and image once it passed through whole."""
    sel = select(request, Resource.RENDERED, True)
    query = rendered_query(request, thumbnail)
    candidates = await locate(ctx, target.study)
    if not candidates[0].profile.rendered:
        raise Problem(501, f"archive '{candidates[0].name}' renders no images (no /rendered, no /thumbnail)")
    use_rendered = not thumbnail or not candidates[0].profile.thumbnail
    suffix = "/rendered" if use_rendered else "/thumbnail"
    if thumbnail and use_rendered and "viewport=" not in query:
        query = "&".join(filter(None, [query, "viewport=128,128"]))
    resp, stack = await open_upstream(ctx, target.study, target.path() + suffix, sel.media_type, request,
                                      "thumbnail" if thumbnail else "rendered", query=query, archives=candidates)
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
        return StreamResponse(200, headers, _passthrough(resp, keep), stack.aclose)
    except BaseException:
        await stack.aclose()
        raise


_RENDER_PARAMS = {"annotation", "quality", "viewport", "window", "iccprofile"}


def rendered_query(request: Request, thumbnail: bool) -> str:
    """Validated rendering parameters (PS3.18 §8.3.5: annotation, quality, viewport, window), re-encoded."""
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
