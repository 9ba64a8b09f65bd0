"""Responses the proxy sends: short DICOMweb-style errors and bounded-memory streams."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeAlias

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from proxy.errors import ClientGone, StreamAborted
from proxy.upstream.splice import Relay, send_relay

log = logging.getLogger("dicomweb_edge")


def encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Response headers as ASGI (and the server protocol) carry them: lower-case names, latin-1 bytes."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class StreamResponse:
    """An ASGI response fed by an async iterator, with backpressure and clean-up on every exit.

    Unlike Starlette's StreamingResponse it starts no extra task unless asked to watch for a client
    disconnect (`watch_disconnect`, for long multi-part bodies), and it always runs `on_close`, so an
    upstream response is released whether the body ends, fails or the client goes away. A failure
    after the headers went out cuts the connection without the closing chunk, which every HTTP
    client reports as a truncated body.
    """

    def __init__(self, status: int, headers: list[tuple[str, str]], body: AsyncIterator[bytes | memoryview | Relay],
                 on_close: Callable[[], Awaitable[None]] | None = None, watch_disconnect: bool = False) -> None:
        self.status = status
        self.raw_headers = encode_headers(headers)
        self.body = body
        self.on_close = on_close
        self.watch_disconnect = watch_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()
        watcher = None
        if self.watch_disconnect:
            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()
            watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": self.raw_headers})
            try:
                async for chunk in self.body:
                    if gone.is_set():
                        if isinstance(chunk, Relay):
                            chunk.drop()
                        return
                    await _send(send, chunk, True)
            except StreamAborted as exc:
                log.warning("response cut mid-stream: %s", exc)
                return  # the server closes the connection: the client sees a truncated body
            except ClientGone:
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if watcher is not None:
                watcher.cancel()
            aclose = getattr(self.body, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                await self.on_close()


class BuffersResponse:
    """A body already at hand as a few buffers (a cache hit), with Content-Length in `headers`.

    Each buffer is handed to the server as it is (no join, no copy) and the last one ends the response,
    so there is no empty closing write: one write less per hit than a StreamResponse.
    """

    def __init__(self, status: int, headers: list[tuple[str, str]],
                 buffers: list[bytes | memoryview]) -> None:
        self.status = status
        self.raw_headers = encode_headers(headers)
        self.buffers = buffers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_buffers(send, self.status, self.raw_headers, self.buffers)


# What a handler answers: a Starlette Response, or one of the ASGI responses above (not Response subclasses).
AnyResponse: TypeAlias = Response | StreamResponse | BuffersResponse


async def _send(send: Send, payload: bytes | memoryview | Relay, more_body: bool) -> None:
    """One piece of a streamed body: bytes as they are, a Relay as the server's relay message (splice.py)."""
    if isinstance(payload, Relay):
        await send_relay(send, payload, more_body)
    else:
        await send({"type": "http.response.body", "body": payload, "more_body": more_body})


async def send_buffers(send: Send, status: int, raw_headers: list[tuple[bytes, bytes]],
                       buffers: Sequence[bytes | memoryview]) -> None:
    """A response whose body is already at hand as buffers: each handed to the server as it is, the last
    one ending the response (no empty closing write)."""
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    last = len(buffers) - 1
    if last < 0:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    for i, buf in enumerate(buffers):
        await send({"type": "http.response.body", "body": buf, "more_body": i < last})
