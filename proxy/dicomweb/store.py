"""STOW-RS store: stream the request body to the archive that takes stores, rewrite the answer.

The body is never buffered: chunks go to the archive as they arrive, counted against the size
limit. Only its start is held back until the multipart reader sees the first part open (a preamble and
part headers of at most 16 KB each): a body without a part (empty, a boundary that never comes, only the
close delimiter) is refused with 400 and nothing is sent to the archive. The Store Instances Response
Module comes back with every RetrieveURL pointed at the proxy and exactly `Content-Type:
application/dicom+json` (with a `charset` parameter, the Python dicomweb-client silently ignores the body).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from proxy.cache import purges
from proxy.dicomweb.context import Context
from proxy.dicomweb.target import dicomweb_base
from proxy.errors import Problem
from proxy.formats.media import parse_content_type
from proxy.formats.multipart import MultipartError, MultipartReader, PartHeaders
from proxy.upstream.archive import UpstreamError

ACCEPTED_TYPES = ("application/dicom", "application/dicom+json", "application/dicom+xml")
NO_PART = "the multipart body has no part (no delimiter of its boundary opens one)"


class BodyTooLarge(Exception):
    """The client sent more than the configured STOW limit."""


def check_content_type(value: str) -> None:
    """415 unless the body is multipart/related with a DICOM `type`; 400 without a boundary (PS3.18 §10.5)."""
    mtype, params = parse_content_type(value)
    if mtype != "multipart/related":
        raise Problem(415, "STOW-RS takes multipart/related; type=\"application/dicom\"")
    inner = params.get("type", "").split(";")[0].strip().lower()
    if not inner:
        raise Problem(415, "multipart/related needs a type parameter, e.g. type=\"application/dicom\"")
    if inner not in ACCEPTED_TYPES:
        raise Problem(415, f"type={inner} cannot be stored")
    if not params.get("boundary"):
        raise Problem(400, "multipart/related without a boundary parameter")


async def _counted(request: Request, limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        if chunk:
            yield chunk


async def _with_a_part(chunks: AsyncIterator[bytes], boundary: str) -> AsyncIterator[bytes]:
    """`chunks` as they are, once the multipart reader has seen the first part open in them; Problem(400)
    before anything is passed on when the body has none (it closes first, ends, or is not multipart)."""
    head: list[bytes] = []
    try:
        reader = MultipartReader(boundary)
        async for chunk in chunks:
            head.append(chunk)
            if any(isinstance(event, PartHeaders) for event in reader.feed(chunk)):
                break
            if reader.done:
                raise Problem(400, NO_PART)
        else:
            raise Problem(400, NO_PART)
    except MultipartError:
        raise Problem(400, NO_PART) from None
    for chunk in head:
        yield chunk
    async for chunk in chunks:
        yield chunk


async def _again(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


_STUDY_IN_URL = re.compile(rb"/studies/([0-9][0-9.]*)")


async def _learn(ctx: Context, archive: str, study: str | None, body: bytes) -> None:
    """Remember where the stored studies now live, and drop cached search results (now stale), here
    and, with a shared tier, in every other process."""
    studies = {m.decode() for m in _STUDY_IN_URL.findall(body)}
    if study:
        studies.add(study)
    for uid in studies:
        if ctx.cache is not None:
            await purges.forget_study(ctx.cache, uid)  # its metadata, renderings and the like may change
    ctx.clear_searches()
    await ctx.locator.share({uid: [archive] for uid in studies})
    if ctx.shared is not None:
        await ctx.shared.stored({uid: archive for uid in studies})


async def store(request: Request, ctx: Context, study: str | None) -> Response:
    """Forward one STOW-RS request and answer with the archive's (rewritten) response module."""
    check_content_type(request.headers.get("content-type", ""))
    limit = ctx.settings.max_stow_bytes
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise Problem(413, f"the body exceeds the {limit}-byte store limit" if length.isdigit()
                      else "malformed Content-Length")
    accept = request.headers.get("accept", "application/dicom+json")
    if "xml" in accept and "json" not in accept:
        accept = "application/dicom+xml"
    else:
        accept = "application/dicom+json"
    archive = ctx.store_target()
    if archive is None:
        raise Problem(503, "no archive is configured to take stores")
    headers = {"Content-Type": request.headers["content-type"], "Accept": accept}
    if length is not None:
        headers["Content-Length"] = length
    path = "/studies" + (f"/{study}" if study else "")
    try:
        boundary = parse_content_type(request.headers["content-type"])[1]["boundary"]
        sent = _with_a_part(_counted(request, limit), boundary)
        first = await anext(sent)  # (the archive is asked only once a part begins)
        async with archive.open("POST", path, headers=headers, body=_again(first, sent), service="stow") as resp:
            body = await resp.read(ctx.settings.max_json_bytes)
            status = resp.status
            ctype = resp.content_type
    except BodyTooLarge:
        raise Problem(413, f"the body exceeds the {limit}-byte store limit") from None
    except ClientDisconnect:
        raise Problem(400, "the client stopped sending the body") from None
    except UpstreamError as exc:
        raise Problem(exc.status, exc.reason) from None
    if status >= 500:
        raise Problem(502, f"archive '{archive.name}' failed to store (HTTP {status})")
    if 300 <= status < 400:  # redirects are never followed, nor their Location passed on
        raise Problem(502, f"archive '{archive.name}' answered a redirect (HTTP {status}), which the proxy "
                           "does not follow")
    if status in (401, 403):
        raise Problem(502, f"archive '{archive.name}' refused the proxy's credentials (HTTP {status})")
    if status == 415:
        raise Problem(415, f"archive '{archive.name}' does not accept this media type")
    base = dicomweb_base(request, ctx.settings, ctx.root)
    if status < 300 or status == 409:
        await _learn(ctx, archive.name, study, body)
    if not body.strip():
        return Response(None, status)
    body = archive.rewriter.rewrite_json(body, base)
    media = "application/dicom+xml" if "xml" in ctype else "application/dicom+json"
    if media == "application/dicom+json" and not body.lstrip().startswith(b"{"):
        if status < 300:
            raise Problem(502, f"archive '{archive.name}' sent a malformed store response")
        raise Problem(status, f"archive '{archive.name}' refused the store (HTTP {status})")
    response = Response(body, status)
    response.headers["Content-Type"] = media  # exactly this, no charset (see the module docstring)
    return response
