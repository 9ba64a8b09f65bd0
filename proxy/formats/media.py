"""Media types: parsing Accept (RFC 7231 §5.3) and choosing what to answer (PS3.18 §8.7.8).

The proxy negotiates itself, because archives get it wrong (Orthanc 1.7 ignores q-values and answers
400 where PS3.18 wants 406): it parses the client's Accept (quoted and unquoted parameters, q-values,
wildcards, the `accept` query parameter), picks one `Selection`, answers 406 when nothing fits, and
sends the archive one explicit media range.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from enum import Enum

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
ANY_TS = "*"
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# Default transfer syntax for a compressed frame media type (PS3.18 Table 8.7.3-3; cornerstone defaults).
IMAGE_TS_DEFAULTS = {
    "image/jpeg": "1.2.840.10008.1.2.4.50",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/x-dicom-rle": "1.2.840.10008.1.2.5",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
    "image/x-jxl": "1.2.840.10008.1.2.4.110",
    "image/jxl": "1.2.840.10008.1.2.4.110",
}
RENDERED_TYPES = ("image/jpeg", "image/png", "image/gif")
JSON_TYPES = ("application/dicom+json", "application/json")


class Resource(Enum):
    """What a request targets, as far as negotiation is concerned."""

    INSTANCES = "instances"  # study, series: always multipart
    INSTANCE = "instance"  # one instance: multipart or single-part application/dicom
    FRAMES = "frames"
    BULKDATA = "bulkdata"
    RENDERED = "rendered"
    JSON = "json"  # metadata, search results, store responses


class NotAcceptable(Exception):
    """Nothing the client accepts can be produced (406)."""


class BadAccept(ValueError):
    """The Accept header or `accept` parameter cannot be parsed (400)."""


@dataclass(frozen=True)
class MediaRange:
    """One element of an Accept header."""

    type: str  # "multipart/related", "image/*", "*/*"
    params: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    q: float = 1.0

    @property
    def inner(self) -> str | None:
        """The `type` parameter of a multipart range, lower-cased, without stray parameters."""
        t = self.params.get("type")
        return t.split(";")[0].strip().lower() if t else None

    @property
    def transfer_syntax(self) -> str | None:
        """The `transfer-syntax` parameter, also when Orthanc-style it hides inside `type`."""
        ts = self.params.get("transfer-syntax")
        if ts is None and self.params.get("type") and ";" in self.params["type"]:
            for p in self.params["type"].split(";")[1:]:
                k, _, v = p.partition("=")
                if k.strip().lower() == "transfer-syntax":
                    ts = v.strip().strip('"')
        return ts


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z/-]+"
_PARAM = re.compile(r"\s*;\s*(" + _TOKEN + r")\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^;,\s]*)")
_RANGE = re.compile(r"\s*(" + _TOKEN + r")")


def parse_accept(header: str) -> list[MediaRange]:
    """Parse an Accept header into media ranges, most preferred first (stable for equal q)."""
    ranges: list[MediaRange] = []
    pos, n = 0, len(header)
    while pos < n:
        if header[pos] in ", \t":
            pos += 1
            continue
        m = _RANGE.match(header, pos)
        if not m or "/" not in m.group(1):
            raise BadAccept(f"malformed media range at position {pos}")
        mtype = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        q = 1.0
        while True:
            p = _PARAM.match(header, pos)
            if not p:
                break
            key, value = p.group(1).lower(), p.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    raise BadAccept(f"bad q-value {value!r}") from None
                if not 0 <= q <= 1:
                    raise BadAccept(f"q-value {value!r} out of range")
            else:
                params[key] = value
            pos = p.end()
        rest = header[pos:].lstrip(" \t")
        if rest and not rest.startswith(","):
            raise BadAccept(f"unexpected text after media range {mtype!r}")
        pos = n - len(rest)
        ranges.append(MediaRange(mtype, params, q))
    if not ranges:
        raise BadAccept("empty Accept")
    order = sorted(range(len(ranges)), key=lambda i: (-ranges[i].q, i))
    return [ranges[i] for i in order if ranges[i].q > 0]


@dataclass(frozen=True)
class Selection:
    """What the proxy will answer: multipart or not, the part media type, the transfer syntax."""

    multipart: bool
    media_type: str  # of each part (multipart) or of the whole body
    transfer_syntax: str | None = None  # a UID, "*", or None where it does not apply


def _match(pattern: str, concrete: str) -> bool:
    if pattern in ("*", "*/*") or pattern == concrete:
        return True
    if pattern.endswith("/*"):
        return concrete.split("/")[0] == pattern[:-2]
    return False


def _ts(r: MediaRange, default: str) -> str:
    ts = r.transfer_syntax
    if ts is None or ts == "":
        return default
    if ts != ANY_TS and not UID_RE.match(ts):
        raise BadAccept(f"transfer-syntax {ts!r} is not a UID or '*'")
    return ts


def _select_one(r: MediaRange, resource: Resource, single_item: bool) -> Selection | None:
    mt = r.type
    if resource is Resource.JSON:
        for t in JSON_TYPES:
            if _match(mt, t):
                return Selection(False, "application/dicom+json")
        return None
    if resource is Resource.RENDERED:
        if mt == "*/*" or mt == "image/*":
            return Selection(False, "image/jpeg")
        return Selection(False, mt) if mt in RENDERED_TYPES else None
    if mt in ("*/*", "multipart/*", "multipart/related"):
        inner = r.inner if mt == "multipart/related" else None
        return _select_inner(inner or "*/*", r, resource)
    if single_item and resource is Resource.INSTANCE and mt == "application/dicom":
        return Selection(False, mt, _ts(r, EXPLICIT_VR_LE))
    if single_item and resource in (Resource.FRAMES, Resource.BULKDATA):
        if mt == "application/octet-stream":
            return Selection(False, mt, _ts(r, EXPLICIT_VR_LE))
        if resource is Resource.FRAMES and mt in IMAGE_TS_DEFAULTS:
            return Selection(False, mt, _ts(r, IMAGE_TS_DEFAULTS[mt]))
    return None


def _select_inner(inner: str, r: MediaRange, resource: Resource) -> Selection | None:
    if resource in (Resource.INSTANCES, Resource.INSTANCE):
        if _match(inner, "application/dicom"):
            return Selection(True, "application/dicom", _ts(r, EXPLICIT_VR_LE))
        return None
    if resource is Resource.BULKDATA:
        if _match(inner, "application/octet-stream"):
            return Selection(True, "application/octet-stream", _ts(r, EXPLICIT_VR_LE))
        return None
    # frames
    if _match(inner, "application/octet-stream"):
        return Selection(True, "application/octet-stream", _ts(r, EXPLICIT_VR_LE))
    for image_type, default_ts in IMAGE_TS_DEFAULTS.items():
        if inner == image_type:
            ts = _ts(r, default_ts)
            if ts == ANY_TS:
                raise NotAcceptable(f"transfer-syntax=* cannot be combined with {image_type}")
            return Selection(True, image_type, ts)
    return None


@functools.lru_cache(maxsize=1024)
def negotiate(accept: str | None, resource: Resource, single_item: bool = False) -> Selection:
    """Choose the representation for `resource` from an Accept header (None or empty: default).

    `single_item` is true where a single-part answer is possible (one instance, one frame,
    one bulk data element).
    """
    ranges = parse_accept(accept) if accept and accept.strip() else [MediaRange("*/*")]
    best: Selection | None = None
    best_q = 0.0
    for r in ranges:
        if best is not None and r.q < best_q:
            break
        try:
            sel = _select_one(r, resource, single_item)
        except (NotAcceptable, BadAccept):
            if best is None:
                raise
            continue  # a range the client likes no more than the one already chosen
        if sel is None:
            continue
        if sel.transfer_syntax == ANY_TS:
            # Among equally preferred ranges, the one the stored transfer syntax satisfies: no transcoding
            # (dicom-microscopy-viewer lists JPEG-LS and JPEG 2000 before `transfer-syntax=*`).
            return sel
        if best is None:
            best, best_q = sel, r.q
    if best is not None:
        return best
    raise NotAcceptable("none of the requested media types can be provided for this resource")


def content_type(media_type: str, transfer_syntax: str | None) -> str:
    """A part or body Content-Type, with a `transfer-syntax` parameter when it names a UID."""
    if transfer_syntax and transfer_syntax != ANY_TS:
        return f"{media_type}; transfer-syntax={transfer_syntax}"
    return media_type


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type into its lower-cased media type and parameters (quotes removed)."""
    m = _RANGE.match(value)
    if not m:
        return "", {}
    params: dict[str, str] = {}
    pos = m.end()
    while True:
        p = _PARAM.match(value, pos)
        if not p:
            break
        v = p.group(2)
        params[p.group(1).lower()] = re.sub(r"\\(.)", r"\1", v[1:-1]) if v.startswith('"') else v
        pos = p.end()
    return m.group(1).lower(), params
