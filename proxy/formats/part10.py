"""Just enough DICOM Part 10: label a streamed instance (File Meta transfer syntax and SOP UID), and cut
an instance into its frames for the frame cache (the header walked here, pydicom for the rest)."""

from __future__ import annotations

import struct
from typing import Any, cast

NEED_MORE = "need-more"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
MAX_META = 64 * 1024


def file_meta(head: bytes | bytearray) -> dict[str, str] | str | None:
    """{"ts": (0002,0010), "sop": (0002,0003)} from the start of a Part 10 file.

    NEED_MORE if `head` is too short to tell; None when the bytes are not a Part 10 file (no
    preamble and `DICM` prefix).
    """
    if len(head) < 132:
        return NEED_MORE
    if head[128:132] != b"DICM":
        return None
    pos = 132
    found: dict[str, str] = {}
    while True:
        if len(head) < pos + 8:
            return NEED_MORE if len(head) < MAX_META else found
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 2:
            return found
        vr = bytes(head[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if len(head) < pos + 12:
                return NEED_MORE
            (length,) = struct.unpack_from("<I", head, pos + 8)
            value_at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            value_at = pos + 8
        if elem in (0x0003, 0x0010):
            if len(head) < value_at + length:
                return NEED_MORE
            text = bytes(head[value_at : value_at + length]).rstrip(b"\x00 ").decode("ascii", "replace")
            found["sop" if elem == 0x0003 else "ts"] = text
            if len(found) == 2:
                return found
        pos = value_at + length


_US = {(0x0028, 0x0002): "spp", (0x0028, 0x0010): "rows", (0x0028, 0x0011): "cols", (0x0028, 0x0100): "bits"}
_TEXT = {(0x0008, 0x0018): "sop", (0x0020, 0x000D): "study", (0x0020, 0x000E): "series", (0x0028, 0x0008): "frames"}
_ITEM, _ITEM_END, _SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
UNDEFINED = 0xFFFFFFFF


class Unusual(ValueError):
    """The instance is not laid out the way the fast path reads (the caller falls back to pydicom)."""


def _element(buf: memoryview, pos: int, explicit: bool) -> tuple[tuple[int, int], int, int]:
    """(tag, length, value offset) of the element at `pos` (little endian)."""
    if pos + 8 > len(buf):
        raise Unusual("truncated element")
    group, elem = struct.unpack_from("<HH", buf, pos)
    if group == 0xFFFE or not explicit:
        return (group, elem), struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
    if bytes(buf[pos + 4 : pos + 6]) in _LONG_VRS:
        if pos + 12 > len(buf):
            raise Unusual("truncated element")
        return (group, elem), struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
    return (group, elem), struct.unpack_from("<H", buf, pos + 6)[0], pos + 8


def _only_sequence(buf: memoryview, pos: int, explicit: bool, tag: tuple[int, int]) -> None:
    """An undefined length is walked only as a sequence (SQ, or an item): UN with undefined length holds
    implicit VR content inside explicit VR, which pydicom reads and this walker does not."""
    if explicit and tag[0] != 0xFFFE and bytes(buf[pos + 4 : pos + 6]) != b"SQ":
        raise Unusual("undefined length outside a sequence")


def _skip_undefined(buf: memoryview, pos: int, explicit: bool, end: tuple[int, int], depth: int = 0) -> int:
    """The offset after the delimiter `end` that closes what starts at `pos` (sequences of items)."""
    if depth > 16:
        raise Unusual("sequences nested too deep")
    while True:
        tag, length, at = _element(buf, pos, explicit)
        if tag == end:
            return at
        if length == UNDEFINED:
            _only_sequence(buf, pos, explicit, tag)
            inner = _ITEM_END if tag == _ITEM else _SEQ_END
            pos = _skip_undefined(buf, at, explicit, inner, depth + 1)
        else:
            pos = at + length


def pixel_layout(part10: bytes | memoryview) -> dict[str, object] | None:
    """Where the pixel data of a little-endian Part 10 instance lies, without building a dataset.

    {"ts", "sop", "study", "series", "rows", "cols", "bits", "spp", "frames", "pixels": (offset, length),
    "encapsulated" (when it is)}; the pixel data of an encapsulated instance ends before its delimiter. Read
    from the top-level elements only. None when the instance has no pixel data. Raises Unusual for what
    this walker does not read (big endian, deflate, a malformed or truncated element): the caller then
    parses the whole instance with pydicom, which knows every corner of the standard.
    """
    buf = memoryview(part10)
    meta = file_meta(buf)
    if not isinstance(meta, dict) or "ts" not in meta:
        raise Unusual("no File Meta")
    ts = meta["ts"]
    if ts not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1") and not ts.startswith("1.2.840.10008.1.2.4") \
            and ts != "1.2.840.10008.1.2.5":
        raise Unusual("transfer syntax not read here")
    explicit = ts != "1.2.840.10008.1.2"
    pos = 132
    while True:  # past the File Meta group (always explicit VR little endian)
        tag, length, at = _element(buf, pos, True)
        if tag[0] != 2:
            break
        pos = at + length
    found: dict[str, object] = {"ts": ts, "spp": 1, "frames": 1}
    while pos < len(buf):
        tag, length, at = _element(buf, pos, explicit)
        if tag == (0x7FE0, 0x0010):
            if length == UNDEFINED:  # encapsulated: fragments up to the sequence delimiter
                length = _skip_undefined(buf, at, explicit, _SEQ_END) - 8 - at
                found["encapsulated"] = True
            elif at + length > len(buf):
                raise Unusual("pixel data truncated")
            found["pixels"] = (at, length)
            return found
        if length == UNDEFINED:
            _only_sequence(buf, pos, explicit, tag)
            pos = _skip_undefined(buf, at, explicit, _SEQ_END)
            continue
        if at + length > len(buf):
            raise Unusual("element truncated")
        if tag in _US and length == 2:
            found[_US[tag]] = struct.unpack_from("<H", buf, at)[0]
        elif tag in _TEXT:
            text = bytes(buf[at : at + length]).rstrip(b"\x00 ").decode("ascii", "replace")
            try:
                found[_TEXT[tag]] = (int(text or 1) or 1) if _TEXT[tag] == "frames" else text
            except ValueError:
                raise Unusual("NumberOfFrames is not a number") from None
        pos = at + length
    return None


EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
_MEDIA_BY_TS = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/dicom-rle",
}


Frames = list[tuple[str, int, str, str, bytes]]  # (SOP UID, frame number, media type, transfer syntax, bytes)


def frames_and_place(part10: bytes) -> tuple[Frames, str | None, str | None]:
    """Split a Part 10 instance into (SOP UID, frame number, media type, transfer syntax, bytes), and give
    its own StudyInstanceUID and SeriesInstanceUID (None where absent).

    Native little-endian pixel data is cut by frame size and labelled Explicit VR Little Endian (what
    a frames request with no transfer syntax returns); encapsulated pixel data is cut by fragments and
    the offset table, in its own transfer syntax. Anything else (big endian, no pixel data, odd
    sizes) yields nothing: the frames are then fetched and cached one by one. The header is walked
    by pixel_layout (about a tenth of a pydicom parse), pydicom reads what that walker leaves to it.
    The frame of a single-frame native instance is a memoryview of `part10` (no copy).
    """
    try:
        layout = pixel_layout(part10)
    except Unusual:
        ds = _dataset(part10)
        return (_frames_by_pydicom(part10, ds), str(ds.get("StudyInstanceUID", "")) or None,
                str(ds.get("SeriesInstanceUID", "")) or None)
    if layout is None or not {"rows", "cols", "bits", "sop"} <= layout.keys():
        return [], None, None
    study, series = (str(layout[k]) if layout.get(k) else None for k in ("study", "series"))
    return _cut(part10, layout), study, series


def _cut(part10: bytes, layout: dict[str, object]) -> Frames:
    """The frames of an instance whose pixel data pixel_layout found."""
    from pydicom.encaps import generate_frames

    ts, sop, count = str(layout["ts"]), str(layout["sop"]), int(layout["frames"])  # type: ignore[call-overload]
    at, length = cast(tuple[int, int], layout["pixels"])  # pixel_layout stores (offset, length) there
    data = memoryview(part10)[at : at + length]
    if not layout.get("encapsulated"):
        if ts not in (EXPLICIT_LE, IMPLICIT_LE):
            return []
        rows, cols, spp, bits = (int(layout[k]) for k in ("rows", "cols", "spp", "bits"))  # type: ignore[call-overload]
        size = rows * cols * spp * bits // 8
        if size == 0 or bits % 8 or len(data) < size * count:
            return []
        if count == 1:  # a view: the instance's buffer is (nearly) the frame, no copy
            return [(sop, 1, "application/octet-stream", EXPLICIT_LE, data[:size])]
        # Copies: a view would keep the whole instance alive while the memory tier counts one frame.
        return [(sop, n + 1, "application/octet-stream", EXPLICIT_LE, bytes(data[n * size : (n + 1) * size]))
                for n in range(count)]
    media = _MEDIA_BY_TS.get(ts)
    if media is None:
        return []
    frames = list(generate_frames(bytes(data), number_of_frames=count))
    return [(sop, n + 1, media, ts, f) for n, f in enumerate(frames)]


def _dataset(part10: bytes) -> Any:
    """The whole instance parsed by pydicom (raises on what pydicom cannot read)."""
    import io

    import pydicom

    return pydicom.dcmread(io.BytesIO(part10))


def _frames_by_pydicom(part10: bytes, ds: Any = None) -> list[tuple[str, int, str, str, bytes]]:
    """The frames by a full pydicom parse (what pixel_layout does not read); `ds`: already parsed."""
    from pydicom.encaps import generate_frames

    ds = _dataset(part10) if ds is None else ds
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if "PixelData" not in ds or not {"Rows", "Columns", "BitsAllocated"} <= set(ds.dir()):
        return []
    sop, count = str(ds.SOPInstanceUID), int(ds.get("NumberOfFrames", 1) or 1)
    data = ds.PixelData
    if ts in (EXPLICIT_LE, IMPLICIT_LE):
        size = ds.Rows * ds.Columns * int(ds.get("SamplesPerPixel", 1)) * ds.BitsAllocated // 8
        if size == 0 or ds.BitsAllocated % 8 or len(data) < size * count:
            return []
        return [(sop, n + 1, "application/octet-stream", EXPLICIT_LE, data[n * size : (n + 1) * size])
                for n in range(count)]
    media = _MEDIA_BY_TS.get(ts)
    if media is None or not ds["PixelData"].is_undefined_length:
        return []
    frames = list(generate_frames(data, number_of_frames=count))
    return [(sop, n + 1, media, ts, f) for n, f in enumerate(frames)]
