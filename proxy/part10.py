"""Just enough DICOM Part 10 to label a streamed instance: its File Meta Transfer Syntax UID."""

from __future__ import annotations

import struct

NEED_MORE = "need-more"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
MAX_META = 64 * 1024


def transfer_syntax(head: bytes | bytearray) -> str | None:
    """(0002,0010) from the start of a Part 10 file; NEED_MORE if `head` is too short to tell.

    Returns None when the bytes are not a Part 10 file (no preamble and `DICM` prefix) or carry no
    transfer syntax in the File Meta group.
    """
    if len(head) < 132:
        return NEED_MORE
    if head[128:132] != b"DICM":
        return None
    pos = 132
    while True:
        if len(head) < pos + 8:
            return NEED_MORE if len(head) < MAX_META else None
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 2:
            return None
        vr = bytes(head[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if len(head) < pos + 12:
                return NEED_MORE
            (length,) = struct.unpack_from("<I", head, pos + 8)
            value_at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            value_at = pos + 8
        if elem == 0x0010:
            if len(head) < value_at + length:
                return NEED_MORE
            return bytes(head[value_at : value_at + length]).rstrip(b"\x00 ").decode("ascii", "replace")
        pos = value_at + length
