"""The hand-over: a flight's result sent from the leading worker's memory to a sibling that follows it,
over a Unix stream socket (the cross-process half of flights.py hands over what is kept in memory).

Used for frames. Without it, a worker that misses a frame a sibling is bringing (a prefetch, a retrieve,
a frame fetch) waits until the sibling has written it to the shared disk tier, then reads it there:
~0.45 ms of the sibling's CPU to write a 512 KB frame (a file created, the bytes copied into the page
cache) and ~0.26 ms of its own to look it up, map it and check it. Asked here instead, the sibling sends
the bytes it holds in memory (one kernel copy each side), its disk writes keep waiting for a quiet
moment (cache/writer.py), and the asker keeps the frame in its own memory tier. Measured on and off
(benchmarks/RESULTS.md, "Mechanisms"): with 2 workers, the first viewer took 1/0.64 as long without it.

Each worker listens on an abstract Unix stream socket named after the cache directory and its pid
(`dicomweb-edge-give/...`, beside the datagram channel of siblings.py). A request is one line of
tab-separated fields, what names the result for the giver's `find` (for a frame: its study, series, SOP
Instance UID, number, media type and transfer syntax, `*`: any), then how long the giver may wait for a
result still on its way to it; the answer is `NO`, or a line with length, checksum and encoding followed
by the payload. The asker receives the payload straight into a buffer of its own (`_Taker`, no
intermediate copies) and checks it against the checksum. Best effort: any failure is a `None`, and the
asker falls back to the disk tier.

Abstract sockets have no file permissions: a giver answers only processes of its own user (SO_PEERCRED),
who could read the disk tier's files anyway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("dicomweb_edge.handover")
_MAX_LINE = 4096
IDLE_CONNECTIONS = 8  # kept per sibling for the next ask
ASKING = 32  # asks in flight per worker at most (a long frame list asks for each of its frames)
TIMEOUT_SLACK = 5.0  # seconds an answer may take beyond the wait it was given


@dataclass(frozen=True, slots=True)
class Given:
    """A result as the sibling sent it."""

    payload: memoryview  # (read-only, over a buffer of its own: kept as is by the memory tier)
    checksum: int
    media_type: str
    transfer_syntax: str


# What a giver looks a result up with: (the ask's fields, how long it may wait) → (payload, checksum,
# media type, transfer syntax) from this worker's memory, or None.
Find = Callable[[tuple[str, ...], float], Awaitable[tuple[bytes | memoryview, int, str, str] | None]]


class Giver:
    """This worker's side that answers its siblings' asks."""

    def __init__(self, name: str, find: Find) -> None:
        self.name = name
        self.find = find
        self.server: asyncio.AbstractServer | None = None
        self.serving: set[asyncio.Task[None]] = set()

    async def start(self) -> bool:
        """Listen (from the app's lifespan); False where the platform cannot."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind("\0" + self.name)
            sock.listen(64)
            sock.setblocking(False)
            self.server = await asyncio.get_running_loop().create_unix_server(
                lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=_MAX_LINE), self._serve),
                sock=sock)
        except OSError as exc:
            log.info("frame hand-over unavailable (%s): siblings share frames through the disk tier", exc)
            return False
        return True

    async def close(self) -> None:
        """Stop listening, and stop the asks being answered (a giver may be waiting for a frame)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for task in list(self.serving):
            task.cancel()
        if self.serving:
            await asyncio.gather(*self.serving, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.serving.add(task)
            task.add_done_callback(self.serving.discard)
        try:
            sock = writer.get_extra_info("socket")
            if sock is None or not _same_user(sock):
                return
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # a frame in as few writes as can be
            while line := await reader.readline():
                found = None
                try:
                    *fields, wait = line.decode().rstrip("\n").split("\t")
                    found = await self.find(tuple(fields), float(wait))
                except (ValueError, UnicodeDecodeError):
                    return  # not our protocol: hang up
                if found is None:
                    writer.write(b"NO\n")
                else:
                    payload, checksum, mtype, ts = found
                    writer.writelines([f"OK\t{len(payload)}\t{checksum}\t{mtype}\t{ts}\n".encode(), payload])
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:  # a fault here must not take the worker's loop down
            log.exception("frame hand-over failed")
        finally:
            writer.close()


def _same_user(sock: socket.socket) -> bool:
    """Whether the process at the other end runs as this one's user."""
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError):  # (no SO_PEERCRED: not Linux, where the hand-over does not run anyway)
        return False
    return uid == os.getuid()


class _Taker(asyncio.BufferedProtocol):
    """The asking side of one connection: the answer's line, then its payload straight into a buffer
    of exactly its size."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.line = bytearray()
        self.scratch = bytearray(_MAX_LINE)
        self.payload: bytearray | None = None
        self.filled = 0
        self.head: list[str] | None = None
        self.done: asyncio.Future[list[str] | None] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.payload is not None:
            return memoryview(self.payload)[self.filled:]
        return memoryview(self.scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self.payload is not None:
            self.filled += nbytes
        else:
            data = self.scratch[:nbytes]
            end = data.find(b"\n")
            if end < 0:
                self.line += data
                if len(self.line) > _MAX_LINE:
                    self._finish(None)
                return
            self.line += data[:end]
            rest = data[end + 1:]
            fields = self.line.decode("latin-1").split("\t")
            self.line = bytearray()
            if fields[0] != "OK" or len(fields) != 5:
                self._finish(None)
                return
            self.head = fields
            self.payload = bytearray(int(fields[1]))
            self.filled = 0
            if len(rest) > len(self.payload):
                self._finish(None)
                return
            self.payload[: len(rest)] = rest
            self.filled = len(rest)
        if self.payload is not None and self.filled >= len(self.payload):
            self._finish(self.head)

    def _finish(self, head: list[str] | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._finish(None)

    def eof_received(self) -> bool:
        self._finish(None)
        return False


class Taker:
    """This worker's side that asks its siblings, over connections kept per sibling."""

    def __init__(self, check: Callable[[bytes | bytearray], int]) -> None:
        self.idle: dict[str, list[_Taker]] = {}
        self.asking = asyncio.Semaphore(ASKING)
        self.check = check  # a payload's checksum, as the giver computed it

    async def ask(self, sibling: str, fields: tuple[str, ...], wait: float) -> Given | None:
        """The result `fields` name from the sibling `sibling` (its giver name), waiting up to `wait`
        seconds for it to reach that sibling; None when it does not hold it, or on any failure."""
        async with self.asking:
            return await self._ask(sibling, fields, wait)

    async def _ask(self, sibling: str, fields: tuple[str, ...], wait: float) -> Given | None:
        proto = None
        pool = self.idle.setdefault(sibling, [])
        while pool and proto is None:
            candidate = pool.pop()
            if not candidate.lost:
                proto = candidate
        try:
            if proto is None:
                loop = asyncio.get_running_loop()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, "\0" + sibling)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                except OSError:
                    sock.close()
                    return None
                _, proto = await loop.create_unix_connection(_Taker, sock=sock)
            assert proto.transport is not None
            proto.done = asyncio.get_running_loop().create_future()
            proto.payload, proto.head = None, None
            proto.transport.write("\t".join((*fields, f"{wait:.3f}")).encode() + b"\n")
            async with asyncio.timeout(wait + TIMEOUT_SLACK):
                head = await proto.done
        except (OSError, TimeoutError):
            if proto is not None and proto.transport is not None:
                proto.transport.close()
            return None
        except BaseException:  # cancelled mid-answer: the connection is in an unknown state
            if proto is not None and proto.transport is not None:
                proto.transport.close()
            raise
        payload, proto.payload = proto.payload, None
        if head is None or payload is None:  # NO, or a broken answer
            proto.transport.close()
            return None
        if len(pool) < IDLE_CONNECTIONS:
            pool.append(proto)
        else:
            proto.transport.close()
        checksum = int(head[2])
        if self.check(payload) != checksum:
            log.warning("a result a sibling handed over does not match its checksum: dropped")
            return None
        return Given(memoryview(payload).toreadonly(), checksum, head[3], head[4])

    def close(self) -> None:
        for pool in self.idle.values():
            for proto in pool:
                if proto.transport is not None:
                    proto.transport.close()
        self.idle.clear()


def giver_of(channel: str) -> str:
    """The giver socket's name of the worker whose siblings.py channel is `channel`."""
    return channel.replace("dicomweb-edge/", "dicomweb-edge-give/", 1)
