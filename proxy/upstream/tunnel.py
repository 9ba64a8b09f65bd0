"""A CONNECT tunnel through an egress proxy (RFC 9110 §9.3.6): connect to the proxy, ask it for
`CONNECT host:port`, read its answer; the socket then leads to the archive (TLS is started over it by
pool.py). A proxy that is down or refuses is an EgressError naming the cause, never a hang: the whole
step runs within the caller's connect timeout."""

from __future__ import annotations

import asyncio
import re
import socket

from proxy.upstream.egress import Route
from proxy.upstream.transport import TransportError

MAX_ANSWER = 16 * 1024  # bytes of the proxy's answer head read before giving up on it
_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: ([\t -~]*))?\r\n")


class EgressError(TransportError):
    """The egress proxy could not be used: down, or it refused (the message says which, for the 502)."""


async def connect(route: Route) -> socket.socket:
    """A connected, non-blocking socket to the egress proxy, or EgressError("egress proxy unreachable")."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(route.host, route.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise EgressError(f"egress proxy unreachable ({type(exc).__name__})") from None
    last: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise EgressError(f"egress proxy unreachable ({type(last).__name__})")


async def open_tunnel(route: Route, host: str, port: int) -> socket.socket:
    """A socket through the egress proxy to host:port, ready for the TLS handshake."""
    loop = asyncio.get_running_loop()
    sock = await connect(route)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if route.authorization is not None:
            lines.append(f"Proxy-Authorization: {route.authorization}")
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = b""
        while b"\r\n\r\n" not in head:
            piece = await loop.sock_recv(sock, 4096)
            if not piece:
                raise EgressError("egress proxy closed the connection instead of opening the tunnel")
            head += piece
            if len(head) > MAX_ANSWER:
                raise EgressError("egress proxy sent an oversized answer to CONNECT")
        status, reason = _status(head)
        if status // 100 != 2:  # (407: no or wrong credentials; tinyproxy answers wrong ones 401)
            hint = ": proxy credentials missing or wrong" if status in (401, 407) else ""
            raise EgressError(f"egress proxy refused the tunnel ({f'{status} {reason}'.strip()}{hint})")
        if not head.endswith(b"\r\n\r\n"):
            raise EgressError("egress proxy sent data past its answer to CONNECT")
        return sock
    except OSError as exc:
        sock.close()
        raise EgressError(f"egress proxy unreachable ({type(exc).__name__})") from None
    except BaseException:
        sock.close()
        raise


def _status(head: bytes) -> tuple[int, str]:
    m = _STATUS.match(head)
    if m is None:
        raise EgressError("egress proxy sent something that is not an HTTP/1.x answer to CONNECT")
    return int(m.group(1)), (m.group(2) or b"").decode("latin-1").strip()[:80]
