"""Streaming multipart/related: a push parser and a writer (RFC 2046 §5.1, conformance M-01..M-07).

The reader is a small state machine fed with chunks of any size; it emits part headers, body
pieces and part ends. Body pieces are slices of the chunks fed in, so a large part passes through
without being re-assembled. The writer frames parts under the proxy's own random boundary with the
exact `Content-Type:` spelling that cornerstone needs (M-05).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024


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
        self._buf = bytearray()
        self._state = "preamble"
        self.parts = 0
        self.done = False

    def feed(self, chunk: bytes) -> Iterator[Event]:
        """Consume one chunk; yield what it completes."""
        if self.done:
            return
        if self._state == "body" and self._buf and len(self._buf) < len(self._delim):
            # A possible delimiter start was held back: settle it without copying the new chunk.
            joined = bytes(self._buf) + chunk[: len(self._delim)]
            if joined.find(self._delim) < 0 and len(joined) - self._partial_tail(joined) >= len(self._buf):
                yield bytes(self._buf)
                self._buf.clear()
        if self._state == "body" and not self._buf:
            # Fast path: the common case of a large part arriving in big chunks.
            idx = chunk.find(self._delim)
            if idx < 0:
                keep = self._partial_tail(chunk)
                if keep < len(chunk):
                    yield memoryview(chunk)[: len(chunk) - keep] if keep else chunk
                if keep:
                    self._buf += chunk[len(chunk) - keep :]
                return
        self._buf += chunk
        yield from self._drain()

    def close(self) -> None:
        """Declare EOF; raise if the closing delimiter was never seen."""
        if not self.done:
            raise MultipartError("body ended before the closing boundary")

    def _partial_tail(self, data: bytes | bytearray) -> int:
        """How many trailing bytes of `data` could be the start of a delimiter."""
        d = self._delim
        start = max(0, len(data) - len(d) + 1)
        i = data.find(b"\r", start)
        while i >= 0:
            if d.startswith(data[i:]):
                return len(data) - i
            i = data.find(b"\r", i + 1)
        return 0

    def _drain(self) -> Iterator[Event]:
        buf = self._buf
        while True:
            if self._state == "preamble":
                # The first delimiter may open the body without a leading CRLF (M-03).
                if buf.startswith(self._dash):
                    idx = 0
                else:
                    idx = buf.find(self._delim)
                    if idx < 0:
                        if len(buf) > MAX_HEADER_BYTES:
                            raise MultipartError("no boundary found where the body should start")
                        return
                    idx += 2
                after = idx + len(self._dash)
                if len(buf) < after + 2:
                    return
                del buf[:after]
                self._state = "after_delim"
            elif self._state == "after_delim":
                if len(buf) < 2:
                    return
                if buf[:2] == b"--":
                    self.done = True
                    buf.clear()
                    return
                eol = buf.find(b"\r\n")  # transport padding may follow a delimiter
                if eol < 0:
                    if len(buf) > 256:
                        raise MultipartError("garbage after boundary")
                    return
                if buf[:eol].strip(b" \t"):
                    raise MultipartError("garbage after boundary")
                del buf[: eol + 2]
                self._state = "headers"
            elif self._state == "headers":
                end = buf.find(b"\r\n\r\n")
                if buf.startswith(b"\r\n"):
                    end, raw = 0, b""
                elif end < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise MultipartError("part headers too long")
                    return
                else:
                    raw = bytes(buf[:end])
                del buf[: end + (2 if end == 0 else 4)]
                yield PartHeaders(_parse_headers(raw))
                self.parts += 1
                self._state = "body"
            elif self._state == "body":
                idx = buf.find(self._delim)
                if idx < 0:
                    keep = self._partial_tail(buf)
                    if len(buf) > keep:
                        yield bytes(buf[: len(buf) - keep])
                        del buf[: len(buf) - keep]
                    return
                if idx:
                    yield bytes(buf[:idx])
                del buf[: idx + len(self._delim)]
                yield PartEnd()
                self._state = "after_delim"


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
    """A random boundary: 32 hex characters, safe unquoted for every parser seen (M-02)."""
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
