"""Streaming multipart/related: a push parser and a writer (RFC 2046 §5.1, RFC 2387).

The reader is a small state machine fed with chunks of any size; it emits part headers, body
pieces and part ends. Body pieces are slices of the chunks fed in, so a large part passes through
without being re-assembled. The writer frames parts under the proxy's own random boundary with the
exact `Content-Type:` spelling that cornerstone needs (it looks for that prefix case-sensitively).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024
_WINDOW = MAX_HEADER_BYTES + 512


class MultipartError(ValueError):
    """The body is not well-formed multipart (bad boundary, headers too long, truncated)."""


@dataclass
class PartHeaders:
    """The start of a part; header names lower-cased."""

    headers: dict[str, str]


@dataclass
class PartEnd:
    """The end of the current part."""


Event = PartHeaders | bytes | memoryview | PartEnd


class MultipartReader:
    """Incremental multipart parser: `feed()` chunks, iterate the events; `close()` at EOF."""

    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > 200:
            raise MultipartError("missing or oversized boundary")
        self._dash = b"--" + boundary.encode("latin-1")
        self._delim = b"\r\n" + self._dash
        self._data: bytes | memoryview = b""  # the chunk being parsed, or a small tail carried over
        self._pos = 0
        self._left = 0  # bytes still to come of a part with a Content-Length
        self._state = "preamble"
        self.parts = 0
        self.done = False

    def feed(self, chunk: bytes | memoryview) -> Iterator[Event]:
        """Consume one chunk; yield what it completes.

        Body pieces are the chunk itself or memoryview slices of it. A part that declares its
        Content-Length is passed through by count, without scanning its bytes for the boundary;
        other parts are scanned. Only a small tail that straddles two chunks is ever joined.
        """
        if self.done:
            return
        if self._pos < len(self._data):
            self._data = bytes(self._data[self._pos :]) + bytes(chunk)
        else:
            self._data = chunk
        self._pos = 0
        yield from self._drain()

    def counted_left(self) -> int | None:
        """Payload bytes still to come of the current part when it declared its Content-Length and all
        that was fed has been consumed; None otherwise."""
        if self._state == "counted" and self._pos >= len(self._data):
            return self._left
        return None

    @property
    def uncounted(self) -> bool:
        """Inside a part that declared no Content-Length (its end is found by scanning for the boundary)."""
        return self._state == "body"

    def skip(self, n: int) -> None:
        """`n` payload bytes of the current counted part went past the parser (splice.py)."""
        left = self.counted_left()
        if left is None or n > left:
            raise MultipartError("skipped bytes outside a counted part")
        self._left -= n

    def close(self) -> None:
        """Declare EOF; raise if the closing delimiter was never seen."""
        if not self.done:
            raise MultipartError("body ended before the closing boundary")

    def _partial_tail(self, data: bytes, pos: int) -> int:
        """How many trailing bytes of `data[pos:]` could be the start of a delimiter."""
        d = self._delim
        i = data.find(b"\r", max(pos, len(data) - len(d) + 1))
        while i >= 0:
            if d.startswith(data[i:]):
                return len(data) - i
            i = data.find(b"\r", i + 1)
        return 0

    @staticmethod
    def _slice(data: bytes | memoryview, start: int, end: int) -> bytes | memoryview:
        return data if start == 0 and end == len(data) else memoryview(data)[start:end]

    def _drain(self) -> Iterator[Event]:
        data, pos = self._data, self._pos
        try:
            while True:
                if self._state == "counted":
                    avail = len(data) - pos
                    if self._left:
                        if not avail:
                            return
                        n = min(avail, self._left)
                        yield self._slice(data, pos, pos + n)
                        pos += n
                        self._left -= n
                        continue
                    if avail < len(self._delim):
                        return
                    if bytes(data[pos : pos + len(self._delim)]) != self._delim:
                        raise MultipartError("a part is longer than its Content-Length")
                    pos += len(self._delim)
                    yield PartEnd()
                    self._state = "after_delim"
                    continue
                if self._state == "body":
                    if isinstance(data, memoryview):  # scanning needs bytes: copy what is left, once
                        data, pos = bytes(data[pos:]), 0
                    idx = data.find(self._delim, pos)
                    if idx < 0:
                        end = len(data) - self._partial_tail(data, pos)
                        if end > pos:
                            yield self._slice(data, pos, end)
                            pos = end
                        return
                    if idx > pos:
                        yield self._slice(data, pos, idx)
                    pos = idx + len(self._delim)
                    yield PartEnd()
                    self._state = "after_delim"
                    continue
                framed = self._frame(data, pos)
                if framed is None:
                    return
                pos, headers = framed
                if self.done:
                    return
                if headers is not None:
                    yield headers
        finally:
            self._data, self._pos = data, pos


    def _frame(self, data: bytes | memoryview, pos: int) -> tuple[int, PartHeaders | None] | None:
        """One step over a delimiter, the padding after it or a part's headers, in a bounded window (a copy
        of at most ~16 KB): (new position, the part's headers once read), or None until more data comes."""
        win = data if isinstance(data, bytes) else bytes(data[pos : pos + _WINDOW])
        off = 0 if isinstance(data, bytes) else pos  # win[i] is data[i + off]
        at = pos - off
        if self._state == "preamble":
            # The first delimiter may open the body without a leading CRLF (RFC 2046 §5.1.1).
            if win.startswith(self._dash, at):
                idx = at
            else:
                idx = win.find(self._delim, at)
                if idx < 0:
                    if len(data) - pos > MAX_HEADER_BYTES:
                        raise MultipartError("no boundary found where the body should start")
                    return None
                idx += 2
            if len(win) < idx + len(self._dash) + 2:
                return None
            self._state = "after_delim"
            return off + idx + len(self._dash), None
        if self._state == "after_delim":
            if len(win) - at < 2:
                return None
            if win[at : at + 2] == b"--":
                self.done = True
                return len(data), None
            eol = win.find(b"\r\n", at)  # transport padding may follow a delimiter
            if eol < 0:
                if len(data) - pos > 256:
                    raise MultipartError("garbage after boundary")
                return None
            if win[at:eol].strip(b" \t"):
                raise MultipartError("garbage after boundary")
            self._state = "headers"
            return off + eol + 2, None
        if win.startswith(b"\r\n", at):  # headers
            raw, pos = b"", pos + 2
        else:
            end = win.find(b"\r\n\r\n", at)
            if end < 0:
                if len(data) - pos > MAX_HEADER_BYTES:
                    raise MultipartError("part headers too long")
                return None
            raw, pos = win[at:end], off + end + 4
        headers = _parse_headers(raw)
        self.parts += 1
        length = headers.get("content-length", "")
        if length.isdigit():
            self._state, self._left = "counted", int(length)
        else:
            self._state = "body"
        return pos, PartHeaders(headers)


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MultipartError("malformed part header")
        headers[name.strip().lower()] = value.strip()
    return headers


async def read_parts(chunks: AsyncIterator[bytes], boundary: str) -> AsyncIterator[Event]:
    """Parse an async stream of chunks; raises MultipartError if it ends early."""
    reader = MultipartReader(boundary)
    async for chunk in chunks:
        for event in reader.feed(chunk):
            yield event
    reader.close()


def new_boundary() -> str:
    """A random boundary: 32 hex characters, safe unquoted for every client parser we know of."""
    return secrets.token_hex(16)


class MultipartWriter:
    """Frames parts under one boundary. `part()` gives the bytes that open a part, `close()` the end."""

    def __init__(self, boundary: str | None = None) -> None:
        self.boundary = boundary or new_boundary()
        self._first = True

    def content_type(self, part_type: str, transfer_syntax: str | None = None) -> str:
        """The response Content-Type: `multipart/related; type="..."; boundary=...`."""
        ts = f"; transfer-syntax={transfer_syntax}" if transfer_syntax else ""
        return f'multipart/related; type="{part_type}"{ts}; boundary={self.boundary}'

    def part(self, content_type: str, content_location: str | None = None,
             content_length: int | None = None) -> bytes:
        """The delimiter and headers that start a part (the CRLF before a delimiter belongs to it)."""
        lines = [("" if self._first else "\r\n") + "--" + self.boundary, "Content-Type: " + content_type]
        self._first = False
        if content_location:
            lines.append("Content-Location: " + content_location)
        if content_length is not None:
            lines.append(f"Content-Length: {content_length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def close(self) -> bytes:
        """The closing delimiter."""
        if self._first:  # an empty multipart still needs an opening delimiter to be parseable
            return f"--{self.boundary}--\r\n".encode("latin-1")
        return f"\r\n--{self.boundary}--\r\n".encode("latin-1")


def whole(pieces: list[bytes | memoryview]) -> bytes | memoryview:
    """The payload `pieces` make: the buffer itself when `part_payload` received the part whole into one
    (a read-only view of a bytearray of its own), else the pieces joined (a copy: a slice of a receive
    buffer would keep all of that buffer alive)."""
    if len(pieces) == 1:
        only = pieces[0]
        if isinstance(only, memoryview) and only.readonly and isinstance(only.obj, bytearray) \
                and len(only) == len(only.obj):
            return only
    return b"".join(pieces)
