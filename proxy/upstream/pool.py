"""Keep-alive connections to one origin: connecting (plain or TLS), the slots a connection may take,
writing a request (a body as bytes or as an async iterator, sent chunked unless a Content-Length is
given) and reading the response head. The body is read from the Response (transport.py)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

from proxy.upstream import tunnel
from proxy.upstream.egress import Route, client_context
from proxy.upstream.transport import (
    MAX_HEADER_BYTES,
    Connection,
    ConnectTimeout,
    FirstByteTimeout,
    Headers,
    PoolBusy,
    Response,
    TransportError,
    _Protocol,
)


def _parse_head(raw: bytes) -> tuple[int, Headers]:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise TransportError("not an HTTP/1.x response")
    items = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise TransportError("malformed response header")
        items.append((name, value.strip()))
    return int(parts[1]), Headers(items)


# A connection is not reused this close to the idle timeout the archive announced: 1 s, or a quarter of a
# shorter timeout (Orthanc announces `timeout=1`: its connections are reused for 0.75 s).
ANNOUNCED_MARGIN = 1.0


class Pool:
    """Keep-alive connections to one origin (scheme, host, port)."""

    def __init__(self, scheme: str, host: str, port: int, max_connections: int = 64,
                 keepalive: float = 0.75, ssl_context: ssl.SSLContext | None = None,
                 queue_timeout: float | None = None, route: Route | None = None) -> None:
        self.host, self.port = host, port
        # Through an egress proxy (egress.py): https by a CONNECT tunnel (TLS runs end to end over it, so the
        # socket carries ciphertext and is never relayed by splice), plain http in absolute form (what squid
        # and tinyproxy allow by default; both refuse CONNECT to port 80 out of the box).
        self.route = route
        self._absolute = route is not None and scheme != "https"
        self.ssl: ssl.SSLContext | None = None
        if scheme == "https":  # verified against the system CAs unless the caller brings its own context
            self.ssl = ssl_context or client_context()
        self.queue_timeout = queue_timeout
        # Seconds an idle connection is kept (the archive's keepalive, or its profile's default); shorter
        # when the archive announces a shorter idle timeout of its own (Keep-Alive: timeout=N).
        self.keepalive = keepalive
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self.opened = 0

    def put(self, conn: Connection) -> None:
        """An idle connection, ready for the next request."""
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._slots.release()

    def discard(self) -> None:
        """A connection was closed instead of put back: its slot is free again."""
        self._slots.release()

    def _reuse(self) -> Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.alive and now - conn.idle_since < self._kept(conn):
                return conn
            conn.close()
        return None

    def _kept(self, conn: Connection) -> float:
        announced = conn.server_keepalive
        if announced is None:
            return self.keepalive
        return min(self.keepalive, announced - min(ANNOUNCED_MARGIN, announced / 4))

    async def _connect(self, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                if self.route is None:
                    transport, protocol = await loop.create_connection(_Protocol, self.host, self.port, ssl=self.ssl)
                elif self._absolute:
                    sock = await tunnel.connect(self.route)
                    transport, protocol = await loop.create_connection(_Protocol, sock=sock)
                else:
                    sock = await tunnel.open_tunnel(self.route, self.host, self.port)
                    transport, protocol = await loop.create_connection(_Protocol, sock=sock, ssl=self.ssl,
                                                                       server_hostname=self.host)
        except TimeoutError:
            raise ConnectTimeout(f"no connection within {timeout:g}s") from None
        self.opened += 1
        return Connection(transport, protocol)

    async def request(self, method: str, target: str, headers: dict[str, str], body: Any = None,
                      connect_timeout: float = 5.0, first_byte_timeout: float = 30.0, window: int = 0) -> Response:
        """Send a request and return once the response headers have arrived.

        `window`: read no more than this much at a time from the start of the response, because its body
        is to be relayed past Python (splice.py): what the protocol has not read, the kernel moves to the
        client without a copy. Dropped once the headers show a body that cannot be relayed.

        Raises ConnectTimeout, FirstByteTimeout, PoolBusy, TransportError, or OSError (refused, unreachable).
        Redirects are not followed: a 3xx is returned like any other status.
        """
        try:
            if self._slots.locked():  # (a timer only when there is something to wait for)
                async with asyncio.timeout(self.queue_timeout):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()
        except TimeoutError:
            raise PoolBusy(f"no free connection within {self.queue_timeout:g}s") from None
        try:
            reused = self._reuse() if method in ("GET", "HEAD") else None
            conn = reused or await self._connect(connect_timeout)
            try:
                return await self._exchange(conn, method, target, headers, body, first_byte_timeout, window)
            except (TransportError, OSError) as exc:
                conn.close()
                if reused is None or isinstance(exc, FirstByteTimeout):
                    raise
            except BaseException:
                conn.close()  # cancelled, or the request body failed (too large, client gone): never reused
                raise
            # A kept-alive connection the origin had just closed: once more on a fresh one.
            conn = await self._connect(connect_timeout)
            try:
                return await self._exchange(conn, method, target, headers, body, first_byte_timeout, window)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            self._slots.release()
            raise

    async def close(self) -> None:
        """Close idle connections."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def _exchange(self, conn: Connection, method: str, target: str, headers: dict[str, str],
                        body: Any, first_byte_timeout: float, window: int = 0) -> Response:
        host = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
        if self._absolute and self.route is not None:  # through the egress proxy: http://host:port/path
            lines[0] = f"{method} http://{host}{target} HTTP/1.1"
            if self.route.authorization is not None:
                lines.append(f"Proxy-Authorization: {self.route.authorization}")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        chunked = body is not None and not isinstance(body, bytes | bytearray | memoryview) and not any(
            k.lower() == "content-length" for k in headers)
        if isinstance(body, bytes | bytearray | memoryview):
            lines.append(f"Content-Length: {len(body)}")
        elif chunked:
            lines.append("Transfer-Encoding: chunked")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        transport = conn.transport
        conn.protocol.window = window
        if isinstance(body, bytes | bytearray | memoryview):
            transport.write(head + bytes(body))
        else:
            transport.write(head)
            if body is not None:
                await self._send_stream(conn, body, chunked)
        try:
            async with asyncio.timeout(first_byte_timeout):
                resp = await self._read_head(conn, method)
        except TimeoutError:
            raise FirstByteTimeout(f"no response within {first_byte_timeout:g}s") from None
        if self._absolute and resp.status == 407:  # (only a proxy answers 407)
            raise tunnel.EgressError("egress proxy refused the request (407 Proxy Authentication Required)")
        return resp

    async def _send_stream(self, conn: Connection, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = conn.transport
        async for chunk in body:
            if conn.protocol.error is not None or transport.is_closing():
                raise TransportError("connection lost while sending the body")
            if chunked:
                transport.writelines([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
            else:
                transport.write(chunk)
            if conn.protocol.write_paused:
                await conn.protocol.drain()
        if chunked:
            transport.write(b"0\r\n\r\n")

    async def _read_head(self, conn: Connection, method: str) -> Response:
        proto = conn.protocol
        buf = b""
        while True:
            piece = await proto.next_piece()
            if piece is None:
                raise TransportError("connection closed before a response")
            probe = 4096  # look at the start of the piece only: the rest is body, left uncopied
            while True:
                candidate = buf + bytes(piece[:probe])
                end = candidate.find(b"\r\n\r\n", max(0, len(buf) - 3))
                if end >= 0 or probe >= len(piece):
                    break
                probe *= 4
            if end >= 0:
                break
            buf = candidate
            if len(buf) > MAX_HEADER_BYTES:
                raise TransportError("response headers too large")
        if end > MAX_HEADER_BYTES:
            raise TransportError("response headers too large")
        status, headers = _parse_head(candidate[:end])
        proto.unread(piece[end + 4 - len(buf) :])
        if status == 100:
            return await self._read_head(conn, method)
        resp = Response(self, conn, status, headers, method)
        if proto.window and (status >= 300 or resp.raw_fd() is None):
            proto.window = 0  # nothing to relay (an error, a chunked body, TLS): read it as usual
        return resp
