"""The proxy's own base URL as the client sees it: what every rewritten URL starts with (J-07)."""

from __future__ import annotations

import re

from starlette.requests import Request

from .config import Settings

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
    real-stack.md §6) gets the port the request actually arrived on.
    """
    if settings.public_url:
        return settings.public_url
    headers = request.headers
    scheme = request.url.scheme
    host = headers.get("host", "")
    client = request.client.host if request.client else None
    if client is not None and client in settings.trusted_proxies:
        fwd = _forwarded(headers["forwarded"]) if "forwarded" in headers else {}
        xf_host = headers.get("x-forwarded-host", "").split(",")[0].strip()
        xf_proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if fwd.get("proto", "").lower() in _PROTO:
            scheme = fwd["proto"].lower()
        elif xf_proto in _PROTO:
            scheme = xf_proto
        if _HOST.match(fwd.get("host", "")):
            return f"{scheme}://{fwd['host']}"
        if _HOST.match(xf_host):
            port = headers.get("x-forwarded-port", "")
            if port.isdigit() and ":" not in xf_host.rsplit("]", 1)[-1]:
                xf_host = f"{xf_host}:{port}"
            return f"{scheme}://{xf_host}"
    server = request.scope.get("server")
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
