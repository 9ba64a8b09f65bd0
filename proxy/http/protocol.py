"""The HTTP/1.1 server protocol: uvicorn's httptools protocol with the limits only a protocol can
enforce, and the cache phase run before there is an ASGI request at all.

Limits: a bound on request header size and count (431) and on the time the headers may take to arrive
(408), and a send timeout that cuts a client that stopped reading its response.

The cache phase: a GET that the frame cache answers whole (hitlane.py) is written to the
socket from `on_headers_complete`, in one writev, with the request id, access record and metrics of
the edge layer (edge.py), and no task, no ASGI messages, no middleware. It takes only what needs none
of those: HTTP/1.1, no request body, no other request of the connection in progress, a client that
keeps up with its responses. With `cors_origins` set it adds the headers the CORS layer would (cors.py).
Everything else goes the ordinary way.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from typing import Any, cast

from starlette.applications import Starlette
from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from proxy.config import SETTINGS_ENV, Settings
from proxy.dicomweb.target import DICOMWEB_ROOT
from proxy.http.edge import account, request_id
from proxy.http.hitlane import Lane
from proxy.http.limits import STALLED
from proxy.upstream import splice

log = logging.getLogger("dicomweb_edge")
_STUDIES = (DICOMWEB_ROOT + "/studies/").encode()
_NOT_IN_LANE = frozenset((b"content-length", b"transfer-encoding", b"expect", b"upgrade"))


def lane_of(app: Any) -> Lane | None:
    """The cache phase of the application under uvicorn's wrappers, if it has one."""
    for _ in range(8):
        if isinstance(app, Starlette):
            return getattr(app.state, "lane", None)
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


@functools.cache
def _protocol_limits() -> tuple[int, int, float, float, frozenset[str]]:
    """(max header bytes, max header count, header timeout, send timeout, optimisations switched off) of the
    settings the server runs with."""
    raw: dict[str, Any] = json.loads(os.environ.get(SETTINGS_ENV, "{}"))
    d = Settings()
    return (int(raw.get("max_header_bytes", d.max_header_bytes)), int(raw.get("max_header_count", d.max_header_count)),
            float(raw.get("header_timeout", d.header_timeout)), float(raw.get("send_timeout", d.send_timeout)),
            frozenset(raw.get("disable", ())))


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing oversized header blocks (431) and slow ones (408), and
    cutting a client that reads nothing of its response for `send_timeout` s (nginx's send_timeout).

    Without this, httptools accepts headers of any size, a client may take forever to send them, and a
    client that stops reading holds its response (and the archive connection feeding it) for ever. The
    send timeout costs nothing per write: a timer is armed only when the transport's buffer is full
    (pause_writing) and cancelled when the client drains it (resume_writing). Cutting the connection
    makes the server report a disconnect to the application, which releases what the response held.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_bytes, self._max_count, self._header_timeout, self._send_timeout, self._off = _protocol_limits()
        self._send_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._refused: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._lane = lane_of(self.app)
        self._answered = False  # the request being parsed was answered by the cache phase

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._unwatch_send()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self._send_timeout, self._send_stalled)

    def resume_writing(self) -> None:
        self._unwatch_send()
        super().resume_writing()

    def _unwatch_send(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_stalled(self) -> None:
        self._send_timer = None
        if not self.transport.is_closing():
            log.warning("client read nothing for %gs: response cut", self._send_timeout)
            if self.cycle is not None:
                self.cycle.scope[STALLED] = True  # type: ignore[literal-required]
            self.transport.abort()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._send_status(408, "the request headers took too long")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._answered = False
        # A request pipelined behind one the cache phase answered: the keep-alive timer that answer
        # armed must not run while this one is being answered.
        self._unset_keepalive_if_required()
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if len(self.headers) >= self._max_count:
            self._refused = (431, "too many request headers")
            raise ValueError("too many request headers")
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self._max_bytes:
            self._refused = (431, "request headers too large")
            raise ValueError("request headers too large")

    def on_headers_complete(self) -> None:
        self._disarm()
        if self._lane is not None and self._from_cache(self._lane):
            self._answered = True
            return
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle.scope is not self.scope:
            return
        if self.transport.get_extra_info("sslcontext") is None:  # (TLS: the bytes pass through the encryption)
            if "splice" not in self._off:
                splice.install(cycle, self.transport, self.scope, self._send_timeout)

    def on_body(self, body: bytes) -> None:
        if not self._answered:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._answered:
            super().on_message_complete()

    def _from_cache(self, lane: Lane) -> bool:
        """The cache phase: answer the request now if the memory tier holds all of it (see the module doc)."""
        parser = self.parser
        cycle = self.cycle
        if (parser.get_method() != b"GET" or parser.get_http_version() != "1.1" or self.pipeline
                or self.flow.write_paused or self.root_path or (cycle is not None and not cycle.response_complete)):
            return False
        url = self.url
        if not url.startswith(_STUDIES) or b"?" in url or b"%" in url or b"#" in url:
            return False
        origin = None
        for k, v in self.headers:
            if k in _NOT_IN_LANE:
                return False  # a body or an upgrade: the ASGI layers answer it
            if k == b"origin" and origin is None:
                origin = v
        started = time.perf_counter()
        scope = self.scope
        try:
            scope["path"] = url.decode("ascii")
        except UnicodeDecodeError:
            return False
        scope["method"] = "GET"
        scope["raw_path"] = url
        scope["query_string"] = b""
        try:
            # cast: uvicorn's HTTPScope TypedDict describes a plain dict, which the ASGI layers use as Starlette's Scope
            answer = lane.answer(cast(Scope, scope))
        except Exception:  # a fault here must not become the parser's 400: the routed path answers
            log.exception("cache phase failed; the request is routed")
            return False
        if answer is None:
            return False
        rid = request_id(self.headers)
        keep_alive = parser.should_keep_alive()
        head = [STATUS_LINE[answer.status]]
        headers = answer.headers if lane.cors is None else lane.cors.apply(answer.headers, origin)
        for k, v in (*self.server_state.default_headers, *headers):
            head += [k, b": ", v, b"\r\n"]
        head += [b"x-request-id: ", rid.encode(), b"\r\n" if keep_alive else b"\r\nconnection: close\r\n", b"\r\n"]
        self.transport.writelines([b"".join(head), *answer.body])
        self.server_state.total_requests += 1
        if keep_alive:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)
        else:
            self.transport.close()
        elapsed = time.perf_counter() - started
        account("frames", "GET", answer.status, elapsed, elapsed, answer.size, 0, {"request_id": rid, "cache": "hit"},
                scope["path"] if lane.ctx.settings.log_patient_data else None, activity=lane.ctx.activity)
        return True

    def send_400_response(self, msg: str) -> None:
        if self._refused is not None:
            self._send_status(*self._refused)
        else:
            super().send_400_response(msg)

    def _send_status(self, status: int, msg: str) -> None:
        body = json.dumps({"status": status, "reason": msg}).encode()
        head = [STATUS_LINE[status], b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
