"""Cache hits sent from the disk tier's files with sendfile(2): no copy of the frame through Python.

A large frame in the disk tier is a file of its own (diskcache keeps values over 32 KB in files). The
memory tier then remembers where it is (`FileRef`) instead of holding its bytes, and a hit opens the
file (`FileRef.open`, which also proves it is still there and whole) and hands the open file to the
server in a `dicomweb_edge.sendfile` message. The protocol (`protocol.EdgeHttpProtocol`) advertises the
extension in `scope["extensions"]` and answers it with sendfile from the page cache to the socket; any
other server, or TLS, gets the same bytes read with pread() into an ordinary body message.

Measured (benchmarks/RESULTS.md, `python benchmarks/cache.py --sendfile` against the same without):
on this machine's loopback, sendfile served cached 512 KB frames about 15 % slower than one write()
from the memory tier (pinning page-cache pages costs more than the copy it saves, and a hit adds an
open/fstat/close), so it is off by default (`[cache] sendfile`). What it buys is memory: the page
cache is shared by every worker, while each worker's memory tier holds its own copy of a frame.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from starlette.types import Message, Scope, Send

from proxy.upstream.splice import Relay, send_relay

EXTENSION = "dicomweb_edge.sendfile"
MESSAGE = "dicomweb_edge.sendfile"
REF_COST = 256  # what a FileRef counts for in the memory tier's byte bound


Identity = tuple[int, int, int, int]  # device, inode, size, mtime (ns) of a file


def identity(st: os.stat_result) -> Identity:
    """What tells a file from any other, and from itself once written to: diskcache never writes a value's
    file again (a new value is a new file), so a file whose identity changed was damaged or replaced."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class FileRef:
    """Where a verified payload lies in a disk-tier file: `length` bytes from `offset`, in the file that had
    `checked` as its identity when its bytes were checked."""

    path: str
    offset: int
    length: int
    checked: Identity

    def __len__(self) -> int:
        return self.length

    def open(self) -> OpenPayload | None:
        """The payload, open; None when the file is gone or is not the file that was checked (evicted,
        purged, truncated, written to, replaced): the entry is then read and checked again."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        opened = OpenPayload(fd, self.offset, self.length)  # closes the fd when dropped, sent or not
        try:
            if identity(os.fstat(fd)) != self.checked:
                return None
        except OSError:
            return None
        return opened


class OpenPayload:
    """A payload in an open file: what a hit hands the response. The descriptor keeps the bytes
    readable even if the entry is evicted meanwhile; it is closed when sent or dropped."""

    __slots__ = ("fd", "offset", "length")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length

    def read(self) -> bytes:
        """The bytes themselves (where sendfile cannot be used)."""
        return os.pread(self.fd, self.length, self.offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


async def send_payload(scope: Scope, send: Send, payload: Any, more_body: bool) -> None:
    """Send one body piece: bytes as they are, an OpenPayload with sendfile when the server offers it
    (it may be sent again: a frame asked twice in one list; its owner closes it)."""
    if isinstance(payload, Relay):
        await send_relay(send, payload, more_body)
    elif not isinstance(payload, OpenPayload):
        await send({"type": "http.response.body", "body": payload, "more_body": more_body})
    elif EXTENSION in (scope.get("extensions") or ()):
        await send({"type": MESSAGE, "fd": payload.fd, "offset": payload.offset, "count": payload.length,
                    "more_body": more_body})
    else:
        await send({"type": "http.response.body", "body": payload.read(), "more_body": more_body})


def body_size(message: Message) -> int:
    """Bytes a body message carries (a sendfile or relay message names them)."""
    if message["type"] != "http.response.body":
        return int(message.get("count", 0))
    return len(message.get("body", b""))


def install(cycle: Any, transport: Any, scope: Any) -> None:
    """Give the server's response cycle the sendfile message, and advertise it in the scope."""
    plain = cycle.send

    async def send(message: Message) -> None:
        if message["type"] == MESSAGE:
            await serve(cycle, transport, plain, message)
        else:
            await plain(message)

    cycle.send = send
    scope.setdefault("extensions", {})[EXTENSION] = {}


async def serve(cycle: Any, transport: Any, plain: Send, message: Message) -> None:
    """The protocol's side: write `count` bytes of the file at `offset` to the client.

    sendfile(2) straight to the socket while the transport has nothing queued (so the order of the
    bytes is kept); whatever the socket does not take at once is read and queued on the transport as
    usual (a copy only of that remainder). Completion (Content-Length, keep-alive) is left to the
    server's own send, with an empty body.
    """
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return
    fd, offset, count = message["fd"], message["offset"], message["count"]
    if cycle.chunked_encoding:  # a stream (no Content-Length): framed by the server, as ordinary bytes
        await plain({"type": "http.response.body", "body": os.pread(fd, count, offset),
                     "more_body": message.get("more_body", False)})
        return
    if cycle.scope["method"] != "HEAD":
        if count > cycle.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        cycle.expected_content_length -= count
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_write_buffer_size() == 0:
            try:
                sent = os.sendfile(sock.fileno(), fd, offset, count)
            except (BlockingIOError, InterruptedError):
                sent = 0
            offset += sent
            count -= sent
        if count:
            transport.write(os.pread(fd, count, offset))
    await plain({"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)})
