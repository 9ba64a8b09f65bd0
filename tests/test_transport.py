"""The upstream HTTP/1.1 client (proxy/upstream/transport.py) against raw loopback servers with exact bytes.

A real archive cannot be made to send chunked bodies, stale keep-alive connections or oversized
headers on demand, so these tests script the bytes on a socket.
"""

import asyncio
import contextlib

import pytest

from proxy.config import ArchiveConfig
from proxy.formats.multipart import PartEnd, PartHeaders
from proxy.upstream.archive import Archive
from proxy.upstream.parts import PartEvents
from proxy.upstream.pool import Pool
from proxy.upstream.transport import RELAY_WINDOW, FirstByteTimeout, TransportError


async def serve(handler):
    """A loopback server running `handler(reader, writer)` per connection; returns (server, port)."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_request(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length) if length else b""
    if b"transfer-encoding: chunked" in head.lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                break
    return head, body


async def _until(condition, timeout: float = 5.0) -> None:
    """Let the event loop run until `condition()` holds (or `timeout` s pass)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.001)


def each_request(answer):
    """A connection handler for `serve`: `answer(head, writer)` for every request on the connection until
    the client closes it; an answer that returns True has closed the connection itself."""
    async def handler(reader, writer):
        while True:
            try:
                head, _ = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            if await answer(head, writer):
                return
            await writer.drain()
    return handler


async def body_of(resp):
    return b"".join([bytes(p) async for p in resp.iter_body()])


async def test_content_length_chunked_and_eof_bodies():
    payload = bytes(range(256)) * 3000

    async def answer(head, writer):
        if b"/chunked" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(payload), 70000):
                piece = payload[i : i + 70000]
                writer.write(b"%x;ext=1\r\n" % len(piece) + piece + b"\r\n")
            writer.write(b"0\r\nX-Trailer: 1\r\n\r\n")
        elif b"/eof" in head:
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + payload)
            await writer.drain()
            writer.close()
            return True
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-A: 1\r\nx-a: 2\r\n\r\n" % len(payload)
                         + payload)
        return False

    server, port = await serve(each_request(answer))
    async with server:
        pool = Pool("http", "127.0.0.1", port)
        for path in ("/length", "/chunked", "/length", "/eof", "/chunked"):
            resp = await pool.request("GET", path, {})
            assert await body_of(resp) == payload, path
            if path == "/length":
                assert resp.headers.getall("x-a") == ["1", "2"]
            resp.release()
        assert pool.opened == 2  # kept alive across length and chunked bodies; EOF bodies close it
        await pool.close()


async def test_a_window_reads_only_the_start_of_a_body_to_be_relayed():
    """`window` (a body to be relayed, splice.py): the connection reads at most that much and stops, so the
    rest stays in the socket for the kernel to move; a body that cannot be relayed (chunked, an error
    status) is read as usual, and the next request on the connection reads without a window."""
    payload = bytes(range(256)) * 3000

    async def answer(head, writer):
        if b"/chunked" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(payload)
                         + payload + b"\r\n0\r\n\r\n")
        else:
            status = b"404 Not Found" if b"/missing" in head else b"200 OK"
            writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n" % (status, len(payload)) + payload)
        return False

    server, port = await serve(each_request(answer))
    async with server:
        pool = Pool("http", "127.0.0.1", port)
        resp = await pool.request("GET", "/length", {}, window=8192)
        proto = resp._conn.protocol
        await _until(lambda: proto.paused or proto.buffered > 8192)
        assert proto.window == 8192 and proto.paused and proto.buffered <= 8192
        assert await body_of(resp) == payload  # (read on in windows: still whole)
        resp.release()
        for path in ("/chunked", "/missing"):
            resp = await pool.request("GET", path, {}, window=8192)
            assert resp._conn.protocol.window == 0, path
            assert await body_of(resp) == payload, path
            resp.release()
        resp = await pool.request("GET", "/length", {})
        proto = resp._conn.protocol
        await _until(lambda: proto.buffered >= len(payload))
        assert proto.window == 0 and proto.buffered == len(payload)
        assert await body_of(resp) == payload
        resp.release()
        assert pool.opened == 1
        await pool.close()


async def test_a_part_without_a_length_drops_the_window():
    """A part that declares no Content-Length cannot be relayed (its end is found by scanning for the
    boundary): once the parser is inside one, the connection reads as it comes instead of 8 KB a time,
    and the payloads come out whole."""
    payloads = [bytes([i]) * 300_000 for i in (1, 2)]
    body = b"".join(b"%s--b0und\r\nContent-Type: application/octet-stream\r\n\r\n%s" % (b"\r\n" if i else b"", p)
                    for i, p in enumerate(payloads)) + b"\r\n--b0und--\r\n"

    async def answer(head, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: multipart/related; boundary=b0und\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return False

    server, port = await serve(each_request(answer))
    async with server:
        archive = Archive(ArchiveConfig("a", f"http://127.0.0.1:{port}/dicom-web"))
        async with archive.open("GET", "/studies/1.2/series/3.4", relay=True) as resp:
            proto = resp._resp._conn.protocol
            assert proto.window == RELAY_WINDOW  # asked to relay: only the start is read
            events = PartEvents(resp)
            got: list[bytes] = []
            windows = []
            while (ev := await events.next()) is not None:
                if isinstance(ev, PartHeaders):
                    got.append(b"")
                elif not isinstance(ev, PartEnd):
                    got[-1] += bytes(ev)
                    windows.append(proto.window)
        assert got == payloads
        assert windows[-1] == 0 and proto.window == 0
        await archive.close()


async def test_unreleased_slots_never_leak():
    """Closed (not reusable) connections give their slot back, or the pool would stall."""
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\nConnection: close\r\n\r\nnope!")
        await writer.drain()
        writer.close()

    server, port = await serve(handler)
    async with server:
        pool = Pool("http", "127.0.0.1", port, max_connections=2)
        async with asyncio.timeout(5):
            for _ in range(10):
                resp = await pool.request("GET", "/x", {})
                assert resp.status == 404
                resp.release()  # body not read: closed, and its slot freed


async def test_stale_keepalive_connection_is_retried_once():
    """An origin that closes a kept-alive connection when the next request arrives on it (its keep-alive
    timeout racing the request): that GET is sent once more on a fresh connection, and succeeds."""
    seen = {"connections": 0, "dropped": 0}

    async def handler(reader, writer):
        seen["connections"] += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # keep-alive, as far as it says
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError):  # (EOF: the pool closed it, idle)
            await read_request(reader)  # the next request on this connection: closed unanswered
            seen["dropped"] += 1
        writer.close()

    server, port = await serve(handler)
    async with server:
        pool = Pool("http", "127.0.0.1", port, keepalive=60)
        for _ in range(3):
            resp = await pool.request("GET", "/", {})
            assert await body_of(resp) == b"ok"
            resp.release()
        await pool.close()
    assert seen == {"connections": 3, "dropped": 2}  # requests 2 and 3 each met a stale connection, then a fresh one


async def test_streamed_request_body_is_sent_chunked():
    got = {}

    async def handler(reader, writer):
        head, body = await read_request(reader)
        got["head"], got["body"] = head, body
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def chunks():
        for i in range(50):
            yield bytes([i]) * 100_000

    server, port = await serve(handler)
    async with server:
        pool = Pool("http", "127.0.0.1", port)
        resp = await pool.request("POST", "/studies", {"Content-Type": "a/b"}, chunks())
        await body_of(resp)
        resp.release()
    assert b"transfer-encoding: chunked" in got["head"].lower()
    assert got["body"].replace(b"\r\n", b"")[:10] != b""  # sanity
    assert len([c for c in got["body"].split(b"\r\n") if len(c) == 100_000]) == 50


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
], ids=["huge-headers", "not-http", "short-body"])
async def test_garbage_is_a_transport_error(response):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(response)
        await writer.drain()
        writer.close()

    server, port = await serve(handler)
    async with server:
        pool = Pool("http", "127.0.0.1", port)
        with pytest.raises(TransportError):
            resp = await pool.request("GET", "/", {})
            await body_of(resp)


async def test_first_byte_timeout():
    async def handler(reader, writer):
        await read_request(reader)
        await asyncio.sleep(5)

    server, port = await serve(handler)
    async with server:
        pool = Pool("http", "127.0.0.1", port)
        with pytest.raises(FirstByteTimeout):
            await pool.request("GET", "/", {}, first_byte_timeout=0.2)


def test_receive_buffers_are_reused_only_when_no_slice_is_alive():
    """Reusing a buffer a slice still points at would corrupt that slice: never; else reuse it."""
    from proxy.upstream.transport import BUFFER_SIZE, _Protocol

    proto = _Protocol()
    kept = []
    for _ in range(6):  # fill six buffers, keeping a slice of each one alive
        view = proto.get_buffer(-1)
        view[:4] = b"KEEP"
        proto.buffer_updated(BUFFER_SIZE)
        kept.append(proto.pieces.popleft()[:4])
    assert all(bytes(k) == b"KEEP" for k in kept)
    first = proto._buf
    proto.get_buffer(-1)
    assert proto._buf is not first and all(bytes(k) == b"KEEP" for k in kept)
    kept.clear()  # every slice released: the next rotation takes a spare instead of allocating
    spare_ids = {id(b) for b in proto._spare}  # ids only: holding them would keep them referenced
    proto.buffer_updated(BUFFER_SIZE)
    proto.pieces.clear()
    proto.get_buffer(-1)
    assert id(proto._buf) in spare_ids


async def test_read_into_fills_a_buffer_straight_from_the_socket():
    """read_into (a prefetch collecting a part whole): what was queued is copied, the rest is received
    into the caller's buffer; the body goes on from the right byte, and a counted body's connection is
    reused. The same for a close-delimited body (Orthanc's series retrieve); a chunked one is refused."""
    payload = bytes(range(256)) * 8000  # 2 MB: several reads

    async def answer(head, writer):
        framing = b"" if b"/eof" in head else b"Content-Length: %d\r\n" % len(payload)
        if b"/chunked" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            return False
        writer.write(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n")
        for i in range(0, len(payload), 100_000):  # in pieces, so part of it is queued, part still coming
            writer.write(payload[i : i + 100_000])
            await writer.drain()
            await asyncio.sleep(0.001)
        if not framing:
            writer.close()
            return True
        return False

    server, port = await serve(each_request(answer))
    async with server:
        pool = Pool("http", "127.0.0.1", port)
        for path in ("/length", "/length", "/eof"):
            resp = await pool.request("GET", path, {})
            first = bytearray(1_000_000)
            await resp.read_into(memoryview(first))
            rest = await body_of(resp)
            assert bytes(first) + rest == payload, path
            resp.release()
        assert pool.opened == 1  # read through: the connection went on to the next request each time
        resp = await pool.request("GET", "/chunked", {})
        with pytest.raises(ValueError):
            await resp.read_into(memoryview(bytearray(3)))
        resp.release()
        assert pool.opened == 2  # (the close-delimited body ended the first connection)
        await pool.close()


async def test_read_into_a_stalled_or_broken_body():
    """Nothing for `idle` s: TimeoutError; the connection closing first: TransportError. Neither
    connection is reused."""
    async def handler(reader, writer):
        head, _ = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        if b"/stall" in head:
            await asyncio.sleep(5)
        writer.close()

    server, port = await serve(handler)
    async with server:
        pool = Pool("http", "127.0.0.1", port)
        resp = await pool.request("GET", "/stall", {})
        with pytest.raises(TimeoutError):
            await resp.read_into(memoryview(bytearray(500_000)), idle=0.2)
        resp.release()
        resp = await pool.request("GET", "/close", {})
        with pytest.raises(TransportError):
            await resp.read_into(memoryview(bytearray(500_000)), idle=5)
        resp.release()
        assert pool.opened == 2
        await pool.close()


class Clock:
    """pool.py's monotonic clock, moved by the test (idle times without waiting for them)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("announced", "idle", "connections"), [
    (None, 29.0, 1),  # within the pool's own keep-alive (30 s): reused
    (None, 31.0, 2),  # past it: a new connection
    (b"Keep-Alive: timeout=5, max=100\r\n", 3.5, 1),  # within what the origin announced, less a margin
    (b"Keep-Alive: timeout=5, max=100\r\n", 4.5, 2),  # the origin would be about to close it: not reused
    (b"Keep-Alive: timeout=1\r\n", 0.7, 1),  # Orthanc's: reused within 0.75 s
    (b"Keep-Alive: timeout=1\r\n", 0.8, 2),
])
async def test_idle_connections_are_kept_as_long_as_the_archive_keeps_them(monkeypatch, announced, idle, connections):
    clock = Clock()
    monkeypatch.setattr("proxy.upstream.pool.time.monotonic", clock)
    monkeypatch.setattr("proxy.upstream.transport.time.monotonic", clock)
    opened = []

    async def answer(head, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + (announced or b"") + b"\r\nok")
        return False

    async def handler(reader, writer):
        opened.append(writer)
        await each_request(answer)(reader, writer)

    server, port = await serve(handler)
    async with server:
        pool = Pool("http", "127.0.0.1", port, keepalive=30)
        for pause in (0.0, idle):
            clock.now += pause
            resp = await pool.request("GET", "/", {})
            assert await body_of(resp) == b"ok"
            resp.release()
        await pool.close()
    assert len(opened) == connections


@pytest.mark.parametrize(("profile", "keepalive", "kept"), [
    ("orthanc", None, 0.75), ("google", None, 300.0), ("azure", None, 200.0), ("generic", None, 4.0),
    ("google", 12.0, 12.0), ("orthanc", 0.0, 0.0),
])
async def test_each_archive_keeps_connections_for_its_own_time(profile, keepalive, kept):
    archive = Archive(ArchiveConfig("a", "http://127.0.0.1:1/dicom-web", profile=profile, keepalive=keepalive))
    assert archive.pool.keepalive == kept
    await archive.close()
