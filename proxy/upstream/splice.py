"""Payloads relayed from the archive's socket to the client's with splice(2), never through Python.

Without a cache to feed, the payload of a part is bytes the proxy only passes on: reading them into
Python and writing them out again costs two copies and the interpreter's time per piece (a series
retrieve ran at 0.45–0.6x the archive's own rate). When the part's length is known (Orthanc and
dcm4chee send a Content-Length in every part), the re-framer writes our part headers itself and
hands the payload over as a `Relay`: the server protocol (`install`) moves it from the archive's
socket into a pipe and from the pipe into the client's socket, page references rather than copies.

Who does what: `reframe.Reframer` decides (a counted part, nothing to tee into the cache, a plain TCP
archive connection, a server that advertises `EXTENSION`); `upstream.UpstreamResponse.relay` stops
the archive connection's protocol reading and gives the bytes it had already received; the protocol
side (`serve`) writes those, then splices the rest, with the archive's idle-read timeout and the
client's send timeout, and leaves the response's framing (chunk size line, Content-Length) right.

Measured (benchmarks/RESULTS.md, "Issue 2 targets: status"): a 105 MB series through the proxy costs
the worker 60–80 ms of CPU instead of 130–145 ms, and runs 5–10 % faster at c=1, 15–40 % at c=4.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from starlette.types import Message, Scope, Send

log = logging.getLogger("dicomweb_edge")

EXTENSION = "dicomweb_edge.relay"
MESSAGE = "dicomweb_edge.relay"
MIN_RELAY = 64 * 1024  # a smaller remainder of a part is not worth a pipe: read it the ordinary way
PIPE_SIZE = 1024 * 1024  # asked of the kernel (fs.pipe-max-size is 1 MiB by default); it may give less
MAX_IDLE_PIPES = 8
MAX_PIPES = 32  # relays in flight per worker (each holds a pipe); beyond, payloads take the ordinary path
AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_CLIENT_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)


class Relay:
    """`count` payload bytes of a part: `head` already received, the rest still in the archive's socket.

    Made by `UpstreamResponse.relay` with a pipe of its own (or by the relay before it, sharing that
    one's); sent as one `MESSAGE` and moved by `serve`. Afterwards `moved` is `count`, or `failure` says
    why not, in a few words, and `fault` whose fault it was.
    """

    __slots__ = ("count", "payload", "head", "fd", "pipe", "owns", "idle", "account", "finish", "moved", "failure",
                 "fault", "follow", "next", "settled")

    def __init__(self, count: int, head: list[memoryview], fd: int, pipe: Pipe, idle: float,
                 account: Callable[[int], None], finish: Callable[[bool], None]) -> None:
        self.count = count  # bytes the message sends
        self.payload = count  # of which payload bytes from the archive (the parser skips them)
        self.head: list[bytes | memoryview] = list(head)
        self.fd = fd
        self.pipe = pipe  # taken for it (`Pipes.take`); chained relays share their first one's
        self.owns = False  # the pipe was taken for this relay and no mover has it yet
        self.idle = idle  # the archive's idle-read timeout
        self.account = account  # called with each number of bytes taken from the archive's socket
        self.finish = finish  # called once, with True when the archive closed the connection
        self.moved = 0
        self.failure: str | None = None
        self.fault = ""  # with `failure`: "client" (gone or not reading), "stalled" or "reset" (the archive)
        # Called once this relay was sent whole: the relay of the next part, when it can be made at once
        # (reframe.Reframer.chained); the server sends it in the same message and links it as `next`.
        self.follow: Callable[[Relay], Relay | None] | None = None
        self.next: Relay | None = None
        self.settled = False  # the parser has skipped this relay's payload

    def __len__(self) -> int:
        return self.count

    def prepend(self, pieces: list[bytes | memoryview], size: int) -> None:
        """Send `pieces` (`size` bytes already at hand: a part header, payload already parsed) first."""
        self.head[:0] = pieces
        self.count += size

    @property
    def client(self) -> bool:
        """It failed on the client's side."""
        return self.fault == "client"

    def abandon(self, reason: str, fault: str) -> None:
        """Not (wholly) sent: remember why and whose fault (`fault`), and give the archive connection back
        to its protocol."""
        if self.failure is None:
            self.failure, self.fault = reason, fault
        self._finish(False)

    def drop(self) -> None:
        """Never sent at all (the response was not there to take it): give its pipe back too."""
        self.abandon("the client went away", fault="client")
        if self.owns:
            self.owns = False
            self.pipe.give()

    def __del__(self) -> None:
        if self.owns:  # made but never sent (the response ended first)
            self.owns = False
            self.pipe.give()

    def _finish(self, eof: bool) -> None:
        finish, self.finish = self.finish, _nothing
        finish(eof)


def _nothing(eof: bool) -> None:
    return None


class Pipe:
    """A pipe for relaying, from a worker's pool (`Pipes`); `give` puts it back (once)."""

    __slots__ = ("r", "w", "size", "clean", "held", "pool")

    def __init__(self, r: int, w: int, size: int, pool: Pipes) -> None:
        self.r, self.w, self.size = r, w, size
        self.clean = True  # empty: it may be used again
        self.held = False
        self.pool = pool  # the one it came from, and goes back to

    def give(self) -> None:
        if not self.held:
            return
        self.held = False
        pool = self.pool
        pool.taken -= 1
        if self.clean and len(pool.idle) < MAX_IDLE_PIPES:
            pool.idle.append(self)
        else:
            os.close(self.r)
            os.close(self.w)


class Pipes:
    """A worker's pipes for relaying: the empty ones kept for the next relays (MAX_IDLE_PIPES at most), and
    how many relays hold one now (MAX_PIPES at most). One a worker, made by the composition root and
    shared by its archives."""

    def __init__(self) -> None:
        self.idle: list[Pipe] = []
        self.taken = 0

    def take(self) -> Pipe | None:
        """An empty pipe for a relay, or None when the worker has MAX_PIPES out or cannot make one (out of
        descriptors): the payload then goes the ordinary way."""
        if self.taken >= MAX_PIPES:
            return None
        if self.idle:
            pipe = self.idle.pop()
        else:
            try:
                r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:  # over the user's pipe quota: the size it got still works
                size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
            pipe = Pipe(r, w, size, self)
        pipe.held = True
        self.taken += 1
        return pipe


def offered(scope: Scope) -> bool:
    """Whether the server under this request moves relays (plain TCP, our protocol; a GET: a HEAD has
    no body to relay into)."""
    return scope.get("method") == "GET" and EXTENSION in (scope.get("extensions") or ())


async def send_relay(send: Send, relay: Relay, more_body: bool) -> None:
    """The application's side: hand the relay to the server."""
    await send({"type": MESSAGE, "relay": relay, "count": relay.count, "more_body": more_body})


def install(cycle: Any, transport: Any, scope: Any, send_timeout: float) -> None:
    """Give the server's response cycle the relay message, and advertise it in the scope."""
    if not AVAILABLE:
        return
    plain = cycle.send

    async def send(message: Message) -> None:
        if message["type"] == MESSAGE:
            await serve(cycle, transport, plain, message, send_timeout)
        else:
            await plain(message)

    cycle.send = send
    scope.setdefault("extensions", {})[EXTENSION] = {}


async def serve(cycle: Any, transport: Any, plain: Send, message: Message, send_timeout: float) -> None:
    """The protocol's side: the relay's bytes into the response, then those of the relays it leads to
    (`Relay.follow`), each framed as the response is (a chunk of its own, or counted against the
    Content-Length). `message["count"]` ends up as the bytes sent; completion is left to the server's
    own send."""
    relay: Relay | None = message["relay"]
    more_body = message.get("more_body", False)
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    sock = transport.get_extra_info("socket")
    if cycle.disconnected or transport.is_closing() or sock is None or cycle.scope["method"] == "HEAD":
        message["relay"].drop()
        return
    chunked = cycle.chunked_encoding
    sent = 0
    crlf = b""
    mover = _Mover(transport, sock.fileno(), send_timeout, message["relay"].pipe)
    message["relay"].owns = False
    try:
        while relay is not None:
            pieces = relay.head
            if chunked:
                pieces = [b"%s%x\r\n" % (crlf, relay.count), *pieces]
                crlf = b"\r\n"
            else:
                if relay.count > cycle.expected_content_length:
                    relay.abandon("response longer than its Content-Length", fault="reset")
                    raise RuntimeError("Response content longer than Content-Length")
                cycle.expected_content_length -= relay.count
            try:
                await mover.move(relay, pieces)
            except _ClientStalled:
                log.warning("client read nothing for %gs: response cut", send_timeout)
                relay.abandon("the client stopped reading", fault="client")
                transport.abort()
                return
            if relay.failure is not None:
                if relay.client:
                    transport.abort()
                message["count"] = sent + relay.moved
                return
            sent += relay.count
            relay.next = relay.follow(relay) if relay.follow is not None else None
            relay = relay.next
    finally:
        mover.close()
    message["count"] = sent
    if crlf and not transport.is_closing():  # (a client gone meanwhile: nothing to end, and no transport)
        transport.write(crlf)
    if not more_body:
        await plain({"type": "http.response.body", "body": b"", "more_body": False})


class _ClientStalled(Exception):
    pass


class _Mover:
    """Moves relays into one client socket: the bytes at hand written with writev, the rest spliced from
    the archive's socket through a pipe. Nothing goes through the client's transport meanwhile (its
    buffer is empty once the first move starts), so the order of the bytes is ours to keep."""

    def __init__(self, transport: Any, client_fd: int, send_timeout: float, pipe: Pipe) -> None:
        self.transport = transport
        self.dst = client_fd
        self.send_timeout = send_timeout
        self.watched = _Watched(asyncio.get_running_loop())
        self.pipe = pipe

    def close(self) -> None:
        self.pipe.give()
        self.watched.close()

    async def move(self, relay: Relay, pieces: list[bytes | memoryview]) -> None:
        """Write `pieces` (framing and the relay's head), then splice the rest of the relay."""
        dst, watched, pipe = self.dst, self.watched, self.pipe
        r, w, size = pipe.r, pipe.w, pipe.size
        src = relay.fd
        left = relay.count - sum(len(p) for p in relay.head)
        views = [memoryview(p) for p in pieces if len(p)]
        inflight = 0
        pipe.clean = False
        try:
            # What the response already wrote through the transport (its start) goes first.
            while self.transport.get_write_buffer_size():
                if self.transport.is_closing():
                    relay.abandon("the client went away", fault="client")
                    return
                await watched.ready(None, dst, self.send_timeout, "client")
                await asyncio.sleep(0)  # the transport flushes on the same readiness
            while views or left or inflight:
                progressed = False
                if left and inflight < size:
                    try:
                        n = os.splice(src, w, min(left, size - inflight), flags=_FLAGS)
                    except BlockingIOError:
                        n = -1
                    except OSError as exc:
                        relay.abandon(f"connection lost ({errno.errorcode.get(exc.errno or 0, 'error')})",
                                      fault="reset")
                        return
                    if n == 0:
                        relay.failure = "connection closed inside a part"
                        relay._finish(True)
                        return
                    if n > 0:
                        left -= n
                        inflight += n
                        relay.account(n)
                        progressed = True
                if views or inflight:
                    try:
                        if views:
                            m = os.writev(dst, views[:64])
                            views = _advance(views, m)
                        else:
                            m = os.splice(r, dst, inflight, flags=_FLAGS)
                            inflight -= m
                    except BlockingIOError:
                        m = 0
                    except OSError as exc:
                        if exc.errno in _CLIENT_GONE:
                            relay.abandon("the client went away", fault="client")
                            return
                        raise
                    if m:
                        relay.moved += m
                        progressed = True
                if not progressed:
                    want_src = src if left and inflight < size else None
                    if views or inflight:
                        await watched.ready(want_src, dst,
                                            max(self.send_timeout, relay.idle) if want_src else self.send_timeout,
                                            "client")
                    elif not await watched.ready(want_src, None, relay.idle, "archive"):
                        relay.abandon(f"stalled for {relay.idle:g}s mid-body", fault="stalled")
                        return
            pipe.clean = True
            relay._finish(False)
        except BaseException:
            relay.abandon("cancelled", fault="client")
            raise


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """`views` without their first `n` bytes."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n and rest:
        rest[0] = rest[0][n:]
    return rest


class _Watched:
    """Readiness waits on sockets that belong to transports: the event loop watches duplicates of their
    descriptors (made on the first wait, closed with `close`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dups: dict[int, int] = {}

    def _dup(self, fd: int) -> int:
        if fd not in self.dups:
            self.dups[fd] = os.dup(fd)
        return self.dups[fd]

    async def ready(self, readable: int | None, writable: int | None, timeout: float, blame: str) -> bool:
        """Wait until `readable` can be read or `writable` written; False when the archive was waited
        for in vain, _ClientStalled when the client was."""
        fut = self.loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        rfd = None if readable is None else self._dup(readable)
        wfd = None if writable is None else self._dup(writable)
        if rfd is not None:
            self.loop.add_reader(rfd, wake)
        if wfd is not None:
            self.loop.add_writer(wfd, wake)
        try:
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            if blame == "client":
                raise _ClientStalled() from None
            return False
        finally:
            if rfd is not None:
                self.loop.remove_reader(rfd)
            if wfd is not None:
                self.loop.remove_writer(wfd)

    def close(self) -> None:
        for fd in self.dups.values():
            os.close(fd)
        self.dups.clear()


def body_size(message: Message) -> int:
    """Bytes a body message carries (a relay message names them)."""
    if message["type"] != "http.response.body":
        return int(message.get("count", 0))
    return len(message.get("body", b""))
