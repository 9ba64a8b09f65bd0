"""Just enough DICOM Part 10 to label a streamed instance: its File Meta transfer syntax and SOP UID."""

from __future__ import annotations

import struct

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
