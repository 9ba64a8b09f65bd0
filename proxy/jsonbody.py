"""DICOM JSON bodies from archives (metadata, search results) are checked before the proxy uses them.

An archive that answers 200 with an HTML error page, a truncated document or garbage becomes a 502
naming the archive, never a complete-looking but wrong answer to the client, and never a cache entry
(issue 7 point 7). Content-Type: JSON media types, or none at all; the body must parse.
"""

from __future__ import annotations

import asyncio
import json

from .media import parse_content_type
from .upstream import UpstreamError, UpstreamResponse

JSON_TYPES = ("application/dicom+json", "application/json")
_IN_THREAD = 256 * 1024  # larger bodies are parsed off the event loop


async def checked(resp: UpstreamResponse, body: bytes) -> bytes:
    """`body` when it is labelled as JSON (or unlabelled) and parses; UpstreamError(502) otherwise.
    An empty body (no matches) is left to the caller."""
    name = resp.archive.name
    ctype = parse_content_type(resp.content_type)[0] if resp.content_type else ""
    if ctype and ctype not in JSON_TYPES and not ctype.endswith("+json"):
        resp.archive.count_error("protocol")
        raise UpstreamError(502, f"archive '{name}' sent {ctype} where DICOM JSON was expected")
    if not body.strip():
        return body
    try:
        if len(body) > _IN_THREAD:
            await asyncio.to_thread(json.loads, body)
        else:
            json.loads(body)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        resp.archive.count_error("protocol")
        raise UpstreamError(502, f"archive '{name}' sent a body that is not valid JSON") from None
    return body
