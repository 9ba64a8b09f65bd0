"""The request model: the UIDs and frames a WADO-RS URL names (`Target`), what the client accepts
(`select`), the one media range to ask the archive for (`upstream_accept`), and the proxy's own base URL as
the client sees it, what every rewritten URL starts with (`dicomweb_base`)."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import Scope

from proxy.config import Settings
from proxy.errors import Problem
from proxy.formats.media import BadAccept, NotAcceptable, Resource, Selection, negotiate
from proxy.upstream.archive import Archive

VARY = ("Vary", "Accept")
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
FRAMES = re.compile(r"^[0-9]+(,[0-9]+)*$")


@dataclass(frozen=True)
class Target:
    """The UIDs (and frame numbers) a WADO-RS URL names."""

    study: str
    series: str | None = None
    instance: str | None = None
    frames: tuple[int, ...] | None = None

    def path(self) -> str:
        """The DICOMweb path of the resource, relative to a service base URL."""
        p = f"/studies/{self.study}"
        if self.series:
            p += f"/series/{self.series}"
        if self.instance:
            p += f"/instances/{self.instance}"
        if self.frames:
            p += "/frames/" + ",".join(map(str, self.frames))
        return p


def client_accept(request: Request) -> str | None:
    """The `accept` query parameter wins over the Accept header (PS3.18 §8.7.8.1)."""
    if b"accept" in request.scope["query_string"]:  # parse the query only when it may hold `accept`
        value = request.query_params.get("accept")
        if value:
            return value
    return request.headers.get("accept")


def checked_uid(value: str, what: str) -> str:
    """`value` if it is a well-formed UID, else Problem(400)."""
    if len(value) > 64 or not UID.match(value):
        raise Problem(400, f"malformed {what} UID")
    return value


def target_of(p: Mapping[str, str]) -> Target:
    """`target` from the path parameters themselves (study, series, instance, frames): Problem(400) if bad."""
    frames = None
    if "frames" in p:
        raw = p["frames"].replace("%2C", ",").replace("%2c", ",")
        if not FRAMES.match(raw):
            raise Problem(400, "frame list must be comma-separated frame numbers")
        frames = tuple(int(n) for n in raw.split(","))
        if any(n < 1 for n in frames):
            raise Problem(400, "frame numbers start at 1")
        if len(frames) > 10000:
            raise Problem(400, "too many frames in one request")
    return Target(
        checked_uid(p["study"], "study"),
        checked_uid(p["series"], "series") if "series" in p else None,
        checked_uid(p["instance"], "instance") if "instance" in p else None,
        frames,
    )


def select(request: Request, resource: Resource, single_item: bool) -> Selection:
    """Negotiate, turning failures into 400/406 Problems."""
    try:
        return negotiate(client_accept(request), resource, single_item)
    except BadAccept as exc:
        raise Problem(400, f"malformed Accept: {exc}") from None
    except NotAcceptable as exc:
        raise Problem(406, str(exc)) from None


def upstream_accept(sel: Selection, resource: Resource, archive: Archive) -> tuple[str, bool]:
    """The one media range to send the archive, and whether to unwrap a single part from it."""
    if not sel.multipart and sel.media_type in ("application/dicom+json", "image/jpeg", "image/png", "image/gif"):
        return sel.media_type, False
    prof = archive.profile
    single_native = (resource is Resource.INSTANCE and prof.single_part_instance) or (
        resource is Resource.FRAMES and prof.single_part_frame)
    if not sel.multipart and single_native:
        return f"{sel.media_type}; transfer-syntax={sel.transfer_syntax}", False
    q = '"' if prof.quote_type else ""
    ts = f"; transfer-syntax={sel.transfer_syntax}" if sel.transfer_syntax else ""
    return f"multipart/related; type={q}{sel.media_type}{q}{ts}", not sel.multipart


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
    trusted = client is not None and client[0] in settings.trusted
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
