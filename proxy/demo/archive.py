"""A small in-memory DICOMweb origin that answers like Orthanc 1.10 + DICOMweb 1.7, with fault injection.

`dicomweb-edge demo` runs two of these when Orthanc is missing; the tests use them as upstreams that can
be made slow, broken or malformed on demand (`SampleArchive.faults`). Binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import collections
import io
import itertools
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from email.message import Message
from http import HTTPStatus

import numpy as np
import pydicom
import uvicorn
from PIL import Image
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import UID, JPEGBaseline8Bit
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Mount, Route

from proxy.demo.synth import to_part10

CHUNK = 64 * 1024
DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"
RESERVED = {"limit", "offset", "includefield", "fuzzymatching", "orderby"}
PHRASES = {s.value: s.phrase for s in HTTPStatus}
DEFAULT_FIELDS = {level: [int(t, 16) for t in tags.split()] for level, tags in {  # Orthanc's QIDO defaults
    "study": "00080005 00080020 00080030 00080050 00080061 00080090 00081190 00100010 00100020 00100030 "
             "00100040 0020000D 00200010 00201206 00201208",
    "series": "00080060 0008103E 00081190 0020000D 0020000E 00200011 00201209",
    "instance": "00080016 00080018 00081190 0020000D 0020000E 00200013 00280010 00280011 00280100 00280008",
}.items()}


@dataclass
class Faults:
    """Fault injection switches, all off by default; tests may flip them while the server runs."""

    first_byte_delay: float = 0.0  # seconds before the response start
    body_chunk_delay: float = 0.0  # seconds between body chunks (each part, and every 64 KB)
    status: int | None = None  # answer every request with this status and a short JSON error
    reset_after_bytes: int | None = None  # drop the connection after this many body bytes
    stall_after_bytes: int | None = None  # after this many body bytes, send nothing more until cleared
    truncate_multipart: bool = False  # omit the closing --boundary--
    wrong_boundary: bool = False  # the Content-Type boundary differs from the body's
    invalid_json: bool = False  # JSON bodies are truncated garbage
    content_type: str | None = None  # override the response Content-Type
    endless_body: bool = False  # stream zeros forever
    endless_part: bool = False  # multipart: the first part's headers (no Content-Length), then zeros forever
    short_part_length: bool = False  # multipart: parts after the first declare a Content-Length 1000 B short
    uncounted_parts: bool = False  # multipart: no part declares a Content-Length (found by its boundary)
    huge_headers: int | None = None  # add an X-Padding header of this many bytes
    max_limit: int | None = None  # like Azure (cap 200): a search with a larger `limit` gets 400
    bulk_uri_base: str | None = None  # BulkDataURIs and frame Content-Locations point under this base (elsewhere)
    redirect_to: str | None = None  # answer every request with 302 and Location: this URL + the request path
    ignore_uid_filters: bool = False  # searches ignore Study/Series/SOP Instance UID matching keys

    def clear(self) -> None:
        """Switch every fault off again."""
        for f in fields(self):
            setattr(self, f.name, f.default)


class ArchiveReset(Exception):
    """Raised from a response body so that the server drops the connection mid-body."""


def _not_a_reset(record: logging.LogRecord) -> bool:
    """Log filter: an injected reset is not worth uvicorn's "Exception in ASGI application" traceback."""
    return not (record.exc_info and isinstance(record.exc_info[1], ArchiveReset))


@dataclass
class _Entry:
    data: bytes  # the Part-10 bytes, served as stored
    ds: Dataset  # the index: parsed with stop_before_pixels
    study: str
    series: str
    sop: str
    path: str  # /studies/S/series/X/instances/I
    ts: UID
    pixel_vr: str | None  # VR of native PixelData; None when absent or encapsulated


@dataclass
class _Payload:
    status: int = 200
    media_type: str = DICOM_JSON
    body: bytes = b""
    parts: list[tuple[list[tuple[str, str]], bytes]] | None = None  # multipart: (headers, content)
    is_json: bool = False


def _json(obj: object, status: int = 200, media_type: str = DICOM_JSON) -> _Payload:
    return _Payload(status, media_type, json.dumps(obj, ensure_ascii=False).encode(), is_json=True)


def _error(status: int, message: str, request: Request) -> _Payload:
    return _json({"HttpError": PHRASES.get(status, "Error"), "HttpStatus": status, "Message": message,
                  "Uri": request.url.path}, status, "application/json")


def _index(data: bytes) -> _Entry:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    ts = UID(ds.file_meta.TransferSyntaxUID)
    native = "Rows" in ds and not ts.is_encapsulated
    vr = ("OW" if int(ds.get("BitsAllocated", 8)) > 8 else "OB") if native else None
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    return _Entry(data, ds, study, series, sop, f"/studies/{study}/series/{series}/instances/{sop}", ts, vr)


def _base(request: Request) -> str:
    """`http://<Host>/dicom-web`, unless an RFC 7239 `Forwarded` header names host/proto (like Orthanc)."""
    fwd = {}
    for item in request.headers.get("forwarded", "").split(",")[0].split(";"):
        key, _, value = item.strip().partition("=")
        fwd[key.lower()] = value.strip('"')
    host = fwd.get("host") or request.headers.get("host", "localhost")
    return f"{fwd.get('proto') or request.url.scheme}://{host}/dicom-web"


_UID_KEYS = {0x0020000D, 0x0020000E, 0x00080018}  # Study, Series, SOP Instance UID


def _tag(key: str) -> int | None:
    key = key.strip()
    return int(key, 16) if re.fullmatch(r"[0-9A-Fa-f]{8}", key) else tag_for_keyword(key)


def _matches(elem: DataElement | None, query: str) -> bool:
    """DICOM matching: universal, UID list, DA/TM/DT range, or wildcards (case-insensitive for PN)."""
    if query == "":
        return True
    if elem is None or elem.VM == 0:
        return False
    raw = list(elem.value) if elem.VM > 1 else [elem.value]
    values = [str(v) for v in raw] + ([c for v in raw for c in v.components] if elem.VR == "PN" else [])
    for alt in re.split(r"[,\\]", query) if elem.VR == "UI" else query.split("\\"):
        if elem.VR in ("DA", "TM", "DT") and "-" in alt:
            lo, _, hi = alt.partition("-")
            hit = any((not lo or v >= lo) and (not hi or v[: len(hi)] <= hi) for v in values)
        elif elem.VR == "UI":
            hit = alt in values
        else:
            rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in alt)
            pattern = re.compile(rx, re.DOTALL | (re.IGNORECASE if elem.VR == "PN" else 0))
            hit = any(pattern.fullmatch(v) for v in values)
        if hit:
            return True
    return False


def _split_multipart(body: bytes, boundary: str) -> list[bytes]:
    """The content of each part (a preamble, e.g. a leading CRLF, is skipped)."""
    delim = b"--" + boundary.encode("latin-1")
    parts: list[bytes] = []
    pos = body.find(delim)
    while pos >= 0:
        pos += len(delim)
        if body[pos : pos + 2] == b"--":
            return parts
        head_end = body.find(b"\r\n\r\n", pos)
        end = body.find(b"\r\n" + delim, head_end + 4) if head_end >= 0 else -1
        parts.append(body[head_end + 4 : end])
        pos = end if end < 0 else end + 2
    raise HTTPException(400, "malformed or truncated multipart body")


def _needs_multipart(request: Request) -> None:
    accept = request.headers.get("accept", "")
    if accept and "multipart/related" not in accept and "*/*" not in accept:
        raise HTTPException(400, "expecting 'Accept: multipart/related' HTTP header")


async def _body(pieces: list[bytes], f: Faults) -> AsyncIterator[bytes]:
    """Yield the body in chunks (each piece, and every 64 KB), applying the body-level faults."""
    chunks: Iterator[bytes] = (p[i : i + CHUNK] for p in pieces for i in range(0, len(p), CHUNK))
    sent, limit, endless = 0, f.reset_after_bytes, f.endless_body
    if f.endless_part:  # after the pieces (the first part's head), its payload goes on and on, at full speed,
        # until the fault is cleared (a client that went away is not always seen here: without this the
        # generator went on in the archive's thread, at full speed, for the rest of the test session)
        chunks = itertools.chain(chunks, iter(lambda: bytes(CHUNK) if f.endless_part else None, None))
    while endless or (chunk := next(chunks, None)) is not None:
        if endless and not f.endless_body:
            return  # the fault was cleared (as above)
        chunk = bytes(CHUNK) if endless else chunk
        assert chunk is not None  # not endless: the loop's condition took a chunk
        if limit is not None and sent + len(chunk) > limit:
            yield chunk[: limit - sent]
            raise ArchiveReset(f"fault injection: connection reset after {limit} bytes")
        if (stall := f.stall_after_bytes) is not None and sent + len(chunk) > stall:
            yield chunk[: stall - sent]
            while f.stall_after_bytes is not None:  # silent, the connection open, until the fault is cleared
                await asyncio.sleep(0.05)
            return
        yield chunk
        sent += len(chunk)
        if f.body_chunk_delay or endless:
            await asyncio.sleep(f.body_chunk_delay or 0.005)
        elif f.endless_part:
            await asyncio.sleep(0)


class SampleArchive:
    """An in-memory DICOMweb origin (QIDO, WADO, STOW) over Part-10 instances, mounted at /dicom-web."""

    def __init__(self, name: str = "SAMPLE", faults: Faults | None = None, single_part: bool = False) -> None:
        self.name = name
        self.faults = faults or Faults()
        # Like dcm4chee: `Accept: application/dicom` on an instance is answered with the Part 10 file itself
        # (single part, Content-Length); off, like Orthanc, such a request is refused.
        self.single_part = single_part
        self.requests: collections.Counter[str] = collections.Counter()
        self.body_bytes: collections.Counter[str] = collections.Counter()  # body bytes sent, by request kind
        self.request_ids: collections.deque[str | None] = collections.deque(maxlen=100)  # X-Request-ID seen
        self.queries: collections.deque[tuple[str, str]] = collections.deque(maxlen=1000)  # (kind, query string)
        # Per-token access (None: everyone sees everything): bearer token → the study UIDs it may see. Then a
        # request without a known token gets 401, a retrieve of another study 403, and searches list only
        # the token's studies, like an archive with per-user ACLs.
        self.access: dict[str, set[str]] | None = None
        self.authorizations: collections.Counter[str | None] = collections.Counter()  # Authorization values seen
        self.header_names: collections.Counter[str] = collections.Counter()  # request header names seen
        # When set, a request whose Authorization this refuses gets 401 (like a secured PACS).
        self.required_authorization: Callable[[str | None], bool] | None = None
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._app: Starlette | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, item: Dataset | bytes) -> str:
        """Store one instance (a dataset or Part-10 bytes); returns its SOP Instance UID."""
        entry = _index(to_part10(item) if isinstance(item, Dataset) else bytes(item))
        with self._lock:
            self._entries[entry.sop] = entry
        return entry.sop

    def extend(self, items: Iterable[Dataset | bytes]) -> int:
        """Store several instances; returns how many."""
        return len([self.add(item) for item in items])

    def _snapshot(self) -> list[_Entry]:
        with self._lock:
            return list(self._entries.values())

    @property
    def app(self) -> Starlette:
        """The ASGI app: `GET /system` and the DICOMweb routes under /dicom-web."""
        if self._app is None:
            ep, inst = self._endpoint, "/studies/{study}/series/{series}/instances/{instance}"
            study, series = ep("qido", self._qido, "study"), ep("qido", self._qido, "series")
            instances = ep("qido", self._qido, "instance")
            routes = [Route("/studies", study), Route("/series", series), Route("/instances", instances),
                      Route("/studies/{study}/series", series),
                      Route("/studies/{study}/instances", instances),
                      Route("/studies/{study}/series/{series}/instances", instances),
                      Route("/studies", ep("stow", self._stow), methods=["POST"]),
                      Route("/studies/{study}", ep("stow", self._stow), methods=["POST"]),
                      Route(inst + "/frames/{frames}", ep("frames", self._frames)),
                      Route(inst + "/frames/{frames}/rendered", ep("rendered", self._frames, True)),
                      Route(inst + "/rendered", ep("rendered", self._frames, True)),
                      Route(inst + "/bulk/{tag}", ep("bulk", self._bulk))]
            for path in ("/studies/{study}", "/studies/{study}/series/{series}", inst):
                routes += [Route(path, ep("retrieve", self._retrieve)),
                           Route(path + "/metadata", ep("metadata", self._metadata))]
            self._app = Starlette(routes=[Route("/system", ep("system", self._system)),
                                          Mount("/dicom-web", routes=routes)])
        return self._app

    def _endpoint(self, kind: str, handler: Callable[..., Awaitable[_Payload]],
                  *args: object) -> Callable[[Request], Awaitable[StreamingResponse]]:
        async def endpoint(request: Request) -> StreamingResponse:
            self.requests[kind] += 1
            self.request_ids.append(request.headers.get("x-request-id"))
            self.queries.append((kind, request.url.query))
            self.authorizations[request.headers.get("authorization")] += 1
            self.header_names.update(request.headers.keys())
            if self.required_authorization is not None and \
                    not self.required_authorization(request.headers.get("authorization")):
                return await self._respond(_error(401, "Unauthorized", request))
            if self.faults.redirect_to is not None:
                return StreamingResponse(iter([b""]), 302, {"Location": self.faults.redirect_to + request.url.path})
            if self.access is not None and kind != "system":
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                allowed = self.access.get(token) if scheme.lower() == "bearer" else None
                if allowed is None:
                    return await self._respond(_error(401, "a known bearer token is required", request))
                request.state.allowed = allowed
                study = request.path_params.get("study")
                if study is not None and study not in allowed and kind not in ("qido", "stow"):
                    return await self._respond(_error(403, "this token may not see this study", request))
            if self.faults.status is not None:
                return await self._respond(_error(self.faults.status, "fault injection", request))
            try:
                return await self._respond(await handler(request, *args), kind)
            except HTTPException as exc:
                return await self._respond(_error(exc.status_code, exc.detail, request))
        return endpoint

    async def _respond(self, p: _Payload, kind: str | None = None) -> StreamingResponse:
        """The one place where a payload becomes a response, with every fault applied (and, for a request
        of `kind`, its body bytes counted as they are sent)."""
        f = self.faults
        if p.parts is not None:
            boundary = f"{uuid.uuid4()}-{uuid.uuid4()}"[:70]
            pieces: list[bytes] = []
            for i, (part_headers, content) in enumerate(p.parts):
                declared = len(content) - (1000 if f.short_part_length and i and len(content) > 1000 else 0)
                length = [] if f.uncounted_parts else [("Content-Length", str(declared))]
                lines = [*part_headers, *length, ("MIME-Version", "1.0")]
                head = "".join(f"{k}: {v}\r\n" for k, v in lines)
                pieces += [(("\r\n" if i else "") + f"--{boundary}\r\n{head}\r\n").encode("latin-1"), content]
            if f.endless_part:
                pieces = [re.sub(r"Content-Length: \d+\r\n", "", pieces[0].decode("latin-1")).encode("latin-1")]
            elif not f.truncate_multipart:
                pieces.append(f"\r\n--{boundary}--\r\n".encode())
            ctype = f"{p.media_type}; boundary={uuid.uuid4() if f.wrong_boundary else boundary}"
        else:
            pieces = [p.body[: len(p.body) // 2] + b'{"' if p.is_json and f.invalid_json else p.body]
            ctype = p.media_type
        headers = {"Content-Type": f.content_type or ctype}
        if not f.endless_body and not f.endless_part:
            headers["Content-Length"] = str(sum(map(len, pieces)))
        if f.huge_headers:
            headers["X-Padding"] = "x" * f.huge_headers
        if f.first_byte_delay:
            await asyncio.sleep(f.first_byte_delay)
        body = _body(pieces, f)
        return StreamingResponse(body if kind is None else self._counted(body, kind), p.status, headers)

    async def _counted(self, body: AsyncIterator[bytes], kind: str) -> AsyncIterator[bytes]:
        async for chunk in body:
            yield chunk
            self.body_bytes[kind] += len(chunk)

    def _select(self, params: dict[str, str]) -> list[_Entry]:
        found = [e for e in self._snapshot() if e.study == params["study"]
                 and params.get("series") in (None, e.series) and params.get("instance") in (None, e.sop)]
        if not found:
            level = "instance" if "instance" in params else "series" if "series" in params else "study"
            raise HTTPException(404, f"Accessing an inexistent {level} with WADO-RS")
        return found

    async def _system(self, request: Request) -> _Payload:
        return _json({"Name": self.name}, media_type="application/json")

    def _computed(self, level: str, members: list[_Entry], base: str) -> dict[int, DataElement]:
        first, c = members[0], {}
        if level == "study":
            mods = [m for m in dict.fromkeys(str(e.ds.get("Modality", "")) for e in members) if m]
            c[0x00080061] = DataElement(0x00080061, "CS", mods)
            c[0x00201206] = DataElement(0x00201206, "IS", len({e.series for e in members}))
            c[0x00201208] = DataElement(0x00201208, "IS", len(members))
        elif level == "series":
            c[0x00201209] = DataElement(0x00201209, "IS", len(members))
        path = {"study": f"/studies/{first.study}", "series": f"/studies/{first.study}/series/{first.series}"}
        c[0x00081190] = DataElement(0x00081190, "UR", base + path.get(level, first.path))
        return c

    async def _qido(self, request: Request, level: str) -> _Payload:
        q, p = request.query_params, request.path_params
        try:
            limit, offset = int(q.get("limit", -1)), int(q.get("offset", 0))
        except ValueError as exc:
            raise HTTPException(400, "limit and offset must be integers") from exc
        if self.faults.max_limit is not None and limit > self.faults.max_limit:
            raise HTTPException(400, f"limit must be between 1 and {self.faults.max_limit}")
        groups: dict[tuple[str, ...], list[_Entry]] = {}
        allowed = getattr(request.state, "allowed", None)
        for e in self._snapshot():
            if allowed is not None and e.study not in allowed:
                continue
            if p.get("study") in (None, e.study) and p.get("series") in (None, e.series):
                key = {"study": (e.study,), "series": (e.study, e.series)}.get(level, (e.sop,))
                groups.setdefault(key, []).append(e)
        filters = [(t, v) for k, v in q.multi_items() if k.lower() not in RESERVED and (t := _tag(k))]
        if self.faults.ignore_uid_filters:
            filters = [(t, v) for t, v in filters if t not in _UID_KEYS]
        names = [n for value in q.getlist("includefield") for n in value.split(",")]
        include = set(DEFAULT_FIELDS[level]) | {t for t, _ in filters} | {t for n in names if (t := _tag(n))}
        everything, base, out = any(n.strip().lower() == "all" for n in names), _base(request), []
        for members in groups.values():
            computed = self._computed(level, members, base)
            if all(_matches(computed[t], v) if t in computed else any(_matches(m.ds.get(t), v) for m in members)
                   for t, v in filters):
                first, ds = members[0].ds, Dataset()
                tags = include | ({int(t) for t in first.keys() if t.group != 2} | set(computed) if everything
                                  else set())
                for t in sorted(tags):
                    if (elem := computed[t] if t in computed else first.get(t)) is not None:
                        ds.add(elem)
                out.append(ds.to_json_dict())
        return _json(out[offset : None if limit < 0 else offset + limit])

    async def _retrieve(self, request: Request) -> _Payload:
        accept = request.headers.get("accept", "")
        if self.single_part and "instance" in request.path_params and accept.split(";")[0].strip() == DICOM:
            found = self._select(request.path_params)
            if not found:
                raise HTTPException(404, "no such instance")
            return _Payload(media_type=DICOM, body=found[0].data)
        _needs_multipart(request)
        parts = [([("Content-Type", "application/dicom")], e.data) for e in self._select(request.path_params)]
        return _Payload(media_type='multipart/related; type="application/dicom"', parts=parts)

    async def _metadata(self, request: Request) -> _Payload:
        base, out = _base(request), []
        for e in self._select(request.path_params):
            url = (self.faults.bulk_uri_base or base) + e.path

            def bulk_uri(el: DataElement, u: str = url) -> str:  # a def: mypy infers no lambda with a default
                return f"{u}/bulk/{el.tag:08x}"

            item = e.ds.to_json_dict(bulk_data_element_handler=bulk_uri)
            item = {k: v for k, v in item.items() if not k.startswith("0002")}
            if e.pixel_vr:
                item["7FE00010"] = {"vr": e.pixel_vr, "BulkDataURI": f"{url}/bulk/7fe00010"}
            out.append(item)
        return _json(out)

    async def _frames(self, request: Request, rendered: bool = False) -> _Payload:
        e = self._select(request.path_params)[0]
        ds = pydicom.dcmread(io.BytesIO(e.data))
        if "PixelData" not in ds:
            raise HTTPException(400, "This instance has no pixel data")
        count = int(ds.get("NumberOfFrames") or 1)
        try:
            numbers = [int(n) for n in request.path_params.get("frames", "1").split(",")]
        except ValueError as exc:
            raise HTTPException(400, "Invalid frame list") from exc
        if any(n < 1 for n in numbers):
            raise HTTPException(400, "Invalid frame number (must be > 0)")
        if any(n > count for n in numbers):
            raise HTTPException(400, "Parameter out of range")
        if rendered:
            return self._render(request, ds, numbers[0] - 1)
        _needs_multipart(request)
        if e.ts.is_encapsulated:
            frames = list(generate_frames(ds.PixelData, number_of_frames=count))
            media = "image/jpeg" if e.ts == JPEGBaseline8Bit else "application/octet-stream"
            ptype = f"{media}; transfer-syntax={e.ts}"
        else:
            size = ds.Rows * ds.Columns * int(ds.get("SamplesPerPixel", 1)) * ds.BitsAllocated // 8
            frames = [ds.PixelData[i * size : (i + 1) * size] for i in range(count)]
            ptype = "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
        url = f"{self.faults.bulk_uri_base or _base(request)}{e.path}/frames/"
        parts = [([("Content-Location", f"{url}{n}"), ("Content-Type", ptype)], frames[n - 1]) for n in numbers]
        return _Payload(media_type=f'multipart/related; type="{ptype}"', parts=parts)

    def _render(self, request: Request, ds: Dataset, index: int) -> _Payload:
        """One frame as JPEG (PNG if asked): rescale, window (query, dataset, or min/max), viewport."""
        a = pixel_array(ds, index=index).astype(np.float64)
        if int(ds.get("SamplesPerPixel", 1)) == 1:
            a = a * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
            window = request.query_params.get("window", "").split(",")
            if len(window) < 2 and "WindowCenter" in ds and "WindowWidth" in ds:
                window = [ds[k].value[0] if ds[k].VM > 1 else ds[k].value for k in ("WindowCenter", "WindowWidth")]
            center, width = (float(window[0]), float(window[1])) if len(window) >= 2 \
                else ((a.max() + a.min()) / 2, a.max() - a.min())
            a = (a - (center - width / 2)) / max(width, 1e-9) * 255
            a = 255 - a if ds.get("PhotometricInterpretation") == "MONOCHROME1" else a
        elif a.max() > 255:
            a = (a - a.min()) / max(a.max() - a.min(), 1e-9) * 255
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        if viewport := request.query_params.get("viewport"):
            w, h = (int(v) for v in viewport.split(",")[:2])
            scale = min(w / img.width, h / img.height)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        fmt, buf = "PNG" if "image/png" in request.headers.get("accept", "") else "JPEG", io.BytesIO()
        img.save(buf, format=fmt)
        return _Payload(media_type=f"image/{fmt.lower()}", body=buf.getvalue())

    async def _bulk(self, request: Request) -> _Payload:
        e = self._select(request.path_params)[0]
        _needs_multipart(request)
        try:
            tag = int(request.path_params["tag"], 16)
        except ValueError as exc:
            raise HTTPException(400, "Invalid tag") from exc
        ds = pydicom.dcmread(io.BytesIO(e.data))
        value = ds.get_item(tag).value if tag in ds else None
        if not isinstance(value, bytes):
            raise HTTPException(404, f"No bulk data for tag {tag:08x} in this instance")
        return _Payload(media_type='multipart/related; type="application/octet-stream"',
                        parts=[([("Content-Type", "application/octet-stream")], value)])

    async def _stow(self, request: Request) -> _Payload:
        msg = Message()
        msg["content-type"] = request.headers.get("content-type", "")
        boundary = msg.get_param("boundary")
        if msg.get_content_type() != "multipart/related" or \
                str(msg.get_param("type") or "").lower() != "application/dicom":
            raise HTTPException(415, 'expecting Content-Type: multipart/related; type="application/dicom"')
        if not isinstance(boundary, str) or not boundary:
            raise HTTPException(400, "multipart Content-Type without a boundary")
        base, want = _base(request), request.path_params.get("study")
        stored, failed, studies = [], [], []
        for part in _split_multipart(await request.body(), boundary):
            try:
                e = _index(part)
            except Exception as exc:
                raise HTTPException(400, "Received a part that is not a DICOM Part-10 instance") from exc
            ref = {"00081150": {"vr": "UI", "Value": [str(e.ds.SOPClassUID)]},
                   "00081155": {"vr": "UI", "Value": [e.sop]}}
            if want is not None and e.study != want:
                failed.append(ref | {"00081197": {"vr": "US", "Value": [0x0110]}})
                continue
            with self._lock:
                self._entries[e.sop] = e
            studies.append(e.study)
            stored.append(ref | {"00081190": {"vr": "UR", "Value": [base + e.path]}})
        result: dict[str, object] = {"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}}
        if study := want or (studies[0] if studies else None):
            result["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study}"]}
        result["00081198"] = {"vr": "SQ", "Value": failed} if failed else {"vr": "SQ"}
        result["00081199"] = {"vr": "SQ", "Value": stored} if stored else {"vr": "SQ"}
        return _json(result, 200 if not failed else 202 if stored else 409)


class ArchiveServer:
    """Runs a SampleArchive with uvicorn in a background thread on 127.0.0.1 (a free port by default)."""

    def __init__(self, archive: SampleArchive, port: int | None = None, tls: dict[str, object] | None = None) -> None:
        """`tls`: uvicorn's ssl_* settings (ssl_certfile, ssl_keyfile, ssl_ca_certs, ssl_cert_reqs) for https."""
        self.archive, self.port, self.tls = archive, port or 0, tls or {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT` (https with `tls`)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root, `http://127.0.0.1:PORT/dicom-web`."""
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 10.0) -> ArchiveServer:
        """Bind 127.0.0.1, run uvicorn in a thread and return once it accepts connections."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.archive.app, log_level="warning", lifespan="off", access_log=False,
                                server_header=False, date_header=False, proxy_headers=False,
                                timeout_graceful_shutdown=1, **self.tls)  # type: ignore[arg-type]
        logging.getLogger("uvicorn.error").addFilter(_not_a_reset)
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name=f"archive-{self.archive.name}-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sample archive {self.archive.name} did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ask uvicorn to exit and join its thread (forcing the exit if it lingers)."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)

    def restart(self, timeout: float = 10.0) -> ArchiveServer:
        """Stop, then start again on the same port (an upstream outage and recovery)."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> ArchiveServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
