"""The proxy's own base URL as the client sees it: what every rewritten URL starts with."""

from __future__ import annotations

import functools
import re

from starlette.requests import Request
from starlette.types import Scope

from proxy.config import Settings

DICOMWEB_ROOT = "/dicomweb"
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_PROTO = ("http", "https")


def _forwarded(value: str) -> dict[str, str]:
    """The first element of an RFC 7239 Forwarded header."""
    out: dict[str, str] = {}
    for pair in value.split(",")[0].split(";"):
        k, _, v = pair.strip().partition("=")
        if k:
            out[k.lower()] = v.strip().strip('"')
    return out


def external_base(request: Request, settings: Settings) -> str:
    """`scheme://host[:port]` the client used to reach us.

    Order: the configured public URL; `Forwarded` / `X-Forwarded-*` from a trusted hop; the Host
    header. A Host without a port on a non-default port (dicomweb-client sends `Host: 127.0.0.1`,
    docs/archive-behaviour.md) gets the port the request actually arrived on.
    """
    return base_of(request.scope, settings)


def base_of(scope: Scope, settings: Settings) -> str:
    """`external_base` from the ASGI scope itself (for the cache phase, which builds no Request)."""
    if settings.public_url:
        return settings.public_url
    wanted: dict[bytes, str] = {}
    for k, v in scope["headers"]:  # one pass over the raw headers: this runs on every cache hit
        if k in _WANTED:
            wanted.setdefault(k, v.decode("latin-1"))
    client = scope.get("client")
    trusted = client is not None and client[0] in settings.trusted_proxies
    server = scope.get("server")
    return _base(scope.get("scheme", "http"), wanted.get(b"host", ""), tuple(server) if server else None,
                 wanted.get(b"forwarded") if trusted else None,
                 wanted.get(b"x-forwarded-host", "") if trusted else "",
                 wanted.get(b"x-forwarded-proto", "") if trusted else "",
                 wanted.get(b"x-forwarded-port", "") if trusted else "")


_WANTED = frozenset((b"host", b"forwarded", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-port"))


@functools.lru_cache(maxsize=256)
def _base(scheme: str, host: str, server: tuple[str, int] | None, forwarded: str | None, xf_host: str,
          xf_proto: str, xf_port: str) -> str:
    """The pure part of `external_base`, memoised: clients send the same few headers again and again."""
    if forwarded is not None or xf_host or xf_proto:
        fwd = _forwarded(forwarded) if forwarded else {}
        xf_host = xf_host.split(",")[0].strip()
        xf_proto = xf_proto.split(",")[0].strip().lower()
        if fwd.get("proto", "").lower() in _PROTO:
            scheme = fwd["proto"].lower()
        elif xf_proto in _PROTO:
            scheme = xf_proto
        if _HOST.match(fwd.get("host", "")):
            return f"{scheme}://{fwd['host']}"
        if _HOST.match(xf_host):
            if xf_port.isdigit() and ":" not in xf_host.rsplit("]", 1)[-1]:
                xf_host = f"{xf_host}:{xf_port}"
            return f"{scheme}://{xf_host}"
    if not _HOST.match(host):
        if server is None:
            return f"{scheme}://localhost"
        host = f"{server[0]}:{server[1]}"
    elif ":" not in host.rsplit("]", 1)[-1] and server is not None:
        default = 443 if scheme == "https" else 80
        if server[1] and server[1] != default:
            host = f"{host}:{server[1]}"
    return f"{scheme}://{host}"


def dicomweb_base(request: Request, settings: Settings, root: str = DICOMWEB_ROOT) -> str:
    """The base URL of the proxy's DICOMweb service (or of one archive's, under /upstreams/{name})."""
    return external_base(request, settings) + root
