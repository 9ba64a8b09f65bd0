"""The upstream HTTP/1.1 client's receiving side: a protocol that reads straight into our buffers, and
responses whose bodies are read from it (Content-Length, chunked, close-delimited). Connections, the
pool and request writing are in pool.py.

Why not aiohttp or httpx: reading a 512 KB frame from Orthanc costs about 1.5 ms of CPU in aiohttp
and more in httpx's default transport (benchmarks/upstream_clients.py, 6 reads in flight: httpx's
default transport 188 frames/s, aiohttp 513; docs/archive-behaviour.md), against about 0.5 ms for
a protocol that lets the kernel copy into a buffer we own. Body pieces are memoryview slices of
those buffers: a buffer is never reused once a slice of it has been handed out, so slices stay
valid wherever they travel (the client socket's write queue included).

Supported: Content-Length, chunked and close-delimited bodies; request bodies as bytes or as an
async iterator (sent chunked unless a Content-Length header is given); http and https.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol, overload


class ConnectionHome(Protocol):
    """Where a response returns its connection when the body is done (pool.py's Pool)."""

    def put(self, conn: Connection) -> None: ...

    def discard(self) -> None: ...


BUFFER_SIZE = 256 * 1024
MAX_HEADER_BYTES = 64 * 1024
HIGH_WATER = 1024 * 1024  # received but not yet consumed: stop reading from the archive above this
LOW_WATER = 256 * 1024
MAX_SPARES = 16  # receive buffers kept for reuse (enough for HIGH_WATER plus what is being written)
RELAY_WINDOW = 8 * 1024  # read-ahead once a response is being relayed: a part's headers, not its payload
_EMPTY = bytearray()
_UNREFERENCED = 2  # sys.getrefcount of a spare nobody else holds: the list and the call's argument


class TransportError(Exception):
    """The connection failed or the peer sent something that is not HTTP/1.x."""


class ConnectTimeout(TransportError):
    """No connection within the connect timeout."""


class FirstByteTimeout(TransportError):
    """Connected and sent, but no response headers within the first-byte timeout."""


class PoolBusy(TransportError):
    """Every connection slot to the origin stayed in use for the whole queue timeout."""


class Headers:
    """Response headers: case-insensitive, repeatable."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items
        self._map = {k.lower(): v for k, v in items}

    @overload
    def get(self, name: str, default: None = None) -> str | None: ...

    @overload
    def get(self, name: str, default: str) -> str: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        """The last value of `name`."""
        return self._map.get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._map[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map

    def getall(self, name: str, default: list[str] | None = None) -> list[str]:
        """Every value of `name`, in order."""
        n = name.lower()
        found = [v for k, v in self.items if k.lower() == n]
        return found or (default if default is not None else [])


class _Protocol(asyncio.BufferedProtocol):
    """Receives into fresh buffers; the reader side pulls `memoryview` pieces from a queue."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pieces: deque[memoryview] = deque()
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._buf = bytearray(BUFFER_SIZE)
        self._spare: list[bytearray] = []
        self._used = 0
        self.buffered = 0
        self.paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.window = 0  # when set: read at most this much, then pause (the rest is relayed, splice.py)
        self.target: memoryview | None = None  # when set: receive straight into it (Response.read_into)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.target is not None:
            return self.target
        if BUFFER_SIZE - self._used < 16 * 1024:
            self._next_buffer()
        if self.window:
            return memoryview(self._buf)[self._used : self._used + self.window]
        return memoryview(self._buf)[self._used :]

    def _next_buffer(self) -> None:
        """Switch to a buffer no slice refers to any more (a spare), else to a new one.

        A spare is reusable once its reference count shows that no memoryview slice of it is alive
        (they keep it referenced); this saves allocating and zero-filling a buffer per read.
        """
        self._spare.append(self._buf)
        self._buf = _EMPTY
        for i in range(len(self._spare)):
            if sys.getrefcount(self._spare[i]) <= _UNREFERENCED:
                self._buf = self._spare.pop(i)
                break
        else:
            self._buf = bytearray(BUFFER_SIZE)
            if len(self._spare) > MAX_SPARES:
                del self._spare[0]
        self._used = 0

    def buffer_updated(self, nbytes: int) -> None:
        if self.target is not None:
            self.target = self.target[nbytes:] if nbytes < len(self.target) else None
            if self.target is None:
                self._wake()  # (the reader wakes once, when it is full)
            return
        self.pieces.append(memoryview(self._buf)[self._used : self._used + nbytes])
        self._used += nbytes
        self.buffered += nbytes
        if (self.buffered > HIGH_WATER or self.window) and self.transport is not None and not self.paused:
            self.transport.pause_reading()  # backpressure: the consumer is slower than the archive
            self.paused = True
        self._wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport wants more of a request body."""
        while self.write_paused:
            if self.error is not None or self.eof:
                raise TransportError("connection lost while sending the body")
            self.drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            self.error = exc
        self._wake()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next_piece(self) -> memoryview | None:
        """The next received piece; None at EOF."""
        while not self.pieces:
            if self.error is not None:
                raise TransportError(f"connection lost ({type(self.error).__name__})")
            if self.eof:
                return None
            if self.paused and self.transport is not None:
                self.transport.resume_reading()  # (relaying reads the next window only when it is wanted)
                self.paused = False
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        piece = self.pieces.popleft()
        self.buffered -= len(piece)
        if self.paused and self.buffered < LOW_WATER and self.transport is not None and not self.window:
            self.transport.resume_reading()
            self.paused = False
        return piece

    def read_now(self, fd: int) -> bool:
        """Relaying (`window` set, reading paused): read the next window from `fd` at once if it is there,
        without a trip through the event loop; else let the transport read it when it comes."""
        try:
            n = os.readv(fd, [self.get_buffer(-1)])
        except OSError:  # nothing there yet (EAGAIN), or a failure the transport finds out itself once reading
            n = -1
        if n > 0:
            self.buffer_updated(n)
            return True
        if self.paused and self.transport is not None:
            self.transport.resume_reading()
            self.paused = False
        return False

    def unread(self, piece: memoryview) -> None:
        """Put back what belongs to the next message (or is left of this one)."""
        if len(piece):
            self.pieces.appendleft(piece)
            self.buffered += len(piece)


class Connection:
    """One keep-alive connection to an origin."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self.transport = transport
        self.protocol = protocol
        self.idle_since = time.monotonic()
        self.reusable = True
        self.server_keepalive: float | None = None  # the idle time the origin announced (Keep-Alive: timeout=)

    @property
    def alive(self) -> bool:
        """Still open and with nothing unexpected waiting."""
        p = self.protocol
        return not self.transport.is_closing() and not p.eof and not p.pieces and p.error is None

    def close(self) -> None:
        """Close the socket."""
        self.reusable = False
        self.transport.close()


class Response:
    """Status and headers; the body is read with `iter_body()` exactly once."""

    def __init__(self, pool: ConnectionHome, conn: Connection, status: int, headers: Headers, method: str) -> None:
        self._pool = pool
        self._conn = conn
        self.status = status
        self.headers = headers
        te = (headers.get("transfer-encoding") or "").lower()
        cl = headers.get("content-length")
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            self._mode, self._left = "length", 0
        elif "chunked" in te:
            self._mode, self._left = "chunked", 0
        elif cl is not None and cl.strip().isdigit():
            self._mode, self._left = "length", int(cl)
        else:
            self._mode, self._left = "eof", 0
            conn.reusable = False
        if (headers.get("connection") or "").lower() == "close":
            conn.reusable = False
        if (hint := _keepalive_hint(headers.get("keep-alive"))) is not None:
            conn.server_keepalive = hint
        self.complete = False
        self._released = False
        self._fd: int | None = None  # the socket's descriptor for relaying; -1: not to be read past the protocol

    async def iter_body(self) -> AsyncIterator[memoryview]:
        """The body, as the pieces received (no copy); TransportError if it ends early."""
        proto = self._conn.protocol
        if self._mode == "length":
            while self._left > 0:
                piece = await proto.next_piece()
                if piece is None:
                    raise TransportError("connection closed before the end of the body")
                if len(piece) > self._left:
                    proto.unread(piece[self._left :])
                    piece = piece[: self._left]
                self._left -= len(piece)
                yield piece
        elif self._mode == "eof":
            while (piece := await proto.next_piece()) is not None:
                yield piece
        else:
            async for piece in self._chunked(proto):
                yield piece
        self.complete = True

    async def _chunked(self, proto: _Protocol) -> AsyncIterator[memoryview]:
        view = memoryview(b"")
        while True:
            line, view = await _line(proto, view)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise TransportError("malformed chunk size") from None
            if size == 0:
                while True:  # trailers, up to an empty line
                    line, view = await _line(proto, view)
                    if not line:
                        proto.unread(view)
                        return
            while size > 0:
                if not view:
                    view = await _more(proto)
                take = view[:size]
                size -= len(take)
                view = view[len(take) :]
                yield take
            line, view = await _line(proto, view)
            if line:
                raise TransportError("missing CRLF after a chunk")

    def ready(self) -> bool:
        """Whether `iter_body` yields its next piece (or ends) without waiting for the connection."""
        if self._mode == "chunked":
            return False  # a chunk's size line may need more than what is at hand
        proto = self._conn.protocol
        return bool(proto.pieces) or proto.eof or proto.error is not None or \
            (self._mode == "length" and self._left <= 0)

    def raw_fd(self) -> int | None:
        """The socket to read the rest of the body from past the protocol (splice.py), or None: over TLS,
        for a chunked body (its framing must be parsed), or once the connection is gone."""
        transport = self._conn.transport
        if self._mode == "chunked" or self._released or transport.is_closing():
            return None
        if self._fd is None:
            sock = transport.get_extra_info("socket")
            plain = sock is not None and transport.get_extra_info("sslcontext") is None
            self._fd = sock.fileno() if plain else -1
        return self._fd if self._fd >= 0 else None

    def hold(self, limit: int) -> list[memoryview]:
        """Stop the protocol reading (the caller reads the socket itself now) and hand over the body bytes
        it had already received, up to `limit`; what lies beyond stays queued for the ordinary reads."""
        proto = self._conn.protocol
        proto.window = RELAY_WINDOW  # from now on the protocol reads only up to the next part's payload
        if not proto.paused and proto.transport is not None:
            proto.transport.pause_reading()
            proto.paused = True
        return self._queued(limit)

    def _queued(self, limit: int) -> list[memoryview]:
        """Up to `limit` body bytes the protocol has received already, taken off its queue (counted)."""
        proto = self._conn.protocol
        taken: list[memoryview] = []
        while proto.pieces and limit > 0:
            piece = proto.pieces.popleft()
            proto.buffered -= len(piece)
            if len(piece) > limit:
                proto.unread(piece[limit:])
                piece = piece[:limit]
            limit -= len(piece)
            taken.append(piece)
        self.consumed(sum(len(p) for p in taken))
        return taken

    def take_ready(self) -> list[memoryview]:
        """The body bytes already received, without waiting for more."""
        return self.hold(self._left if self._mode == "length" else sys.maxsize)

    def unwindow(self) -> None:
        """Stop reading `window` bytes at a time (a relay sets it again when it holds the connection)."""
        self._conn.protocol.window = 0

    def can_read_into(self) -> bool:
        """Whether `read_into` may be used now."""
        return self._mode != "chunked" and not self._released and not self._conn.protocol.window

    async def read_into(self, view: memoryview, idle: float | None = None) -> None:
        """Fill `view` with the next body bytes: what is queued is copied, the rest the kernel copies
        straight into `view` (no receive buffer, no join: a part collected whole, e.g. by a prefetch).
        Not for a chunked body (its framing must be parsed). TransportError if the connection ends
        first, TimeoutError if nothing arrives for `idle` s."""
        proto = self._conn.protocol
        if not self.can_read_into() or (self._mode == "length" and len(view) > self._left):
            raise ValueError("read_into needs an unchunked body, not relayed, with that many bytes left")
        got = 0
        for piece in self._queued(len(view)):
            view[got : got + len(piece)] = piece
            got += len(piece)
        if got == len(view):
            return
        proto.target = view[got:]
        try:
            if proto.paused and proto.transport is not None:
                proto.transport.resume_reading()
                proto.paused = False
            while proto.target is not None:
                if proto.error is not None:
                    raise TransportError(f"connection lost ({type(proto.error).__name__})")
                if proto.eof:
                    raise TransportError("connection closed before the end of the body")
                left = len(proto.target)
                proto.waiter = asyncio.get_running_loop().create_future()
                try:
                    async with asyncio.timeout(idle):
                        await proto.waiter
                except TimeoutError:
                    if proto.target is not None and len(proto.target) == left:
                        raise  # nothing at all for `idle` s
                finally:
                    proto.waiter = None
                self.consumed(left - (len(proto.target) if proto.target is not None else 0))
        finally:
            if proto.target is not None:  # failed or cancelled: the connection cannot be reused
                proto.target = None
                self._conn.reusable = False

    def consumed(self, n: int) -> None:
        """`n` body bytes were read past the protocol."""
        if self._mode == "length":
            self._left -= n

    def unhold(self, eof: bool = False) -> None:
        """Let the protocol read again (`eof`: the caller found the connection closed)."""
        proto = self._conn.protocol
        if eof:
            proto.eof = True
            self._conn.reusable = False
        if eof or proto.transport is None:
            return
        fd = self.raw_fd()
        if fd is not None and not proto.pieces:
            proto.read_now(fd)  # the next part's headers, read now rather than on the loop's next turn

    def release(self) -> None:
        """Give the connection back to the pool if the body was read through, else close it."""
        if self._released:
            return
        self._released = True
        proto = self._conn.protocol
        proto.window = 0
        if proto.paused and not proto.pieces and proto.transport is not None:
            proto.transport.resume_reading()  # an idle connection must see the archive close it
            proto.paused = False
        if self.complete and self._conn.reusable:
            self._pool.put(self._conn)
        else:
            self._conn.close()
            self._pool.discard()


def _keepalive_hint(value: str | None) -> float | None:
    """The seconds of `Keep-Alive: timeout=N, max=M` (RFC 2068 §19.7.1, sent by nginx, Apache), or None."""
    for param in (value or "").split(","):
        name, _, number = param.strip().partition("=")
        if name.strip().lower() == "timeout" and number.strip().isdigit():
            return float(number.strip())
    return None


async def _more(proto: _Protocol) -> memoryview:
    piece = await proto.next_piece()
    if piece is None:
        raise TransportError("connection closed inside a chunked body")
    return piece


async def _line(proto: _Protocol, view: memoryview) -> tuple[bytes, memoryview]:
    """A CRLF-terminated line (without the CRLF) and what follows it; copies only the line."""
    acc = b""
    while True:
        if not view:
            view = await _more(proto)
        head = bytes(view[:256])
        joined = acc + head
        idx = joined.find(b"\r\n", max(0, len(acc) - 1))
        if idx >= 0:
            return joined[:idx], view[idx + 2 - len(acc) :]
        acc, view = joined, view[len(head) :]
        if len(acc) > 4096:
            raise TransportError("malformed chunk header")
