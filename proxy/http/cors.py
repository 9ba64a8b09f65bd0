"""CORS for a viewer served from another origin (`[server] cors_origins`): one policy, two places.

The ASGI layer is Starlette's CORSMiddleware (preflights, and the headers of every routed answer). The
cache phase (protocol.py) answers frame hits before any ASGI layer runs, so it adds the same headers
itself (`LaneCors`): a viewer on another origin sends `Origin` with every frame request, and those hits
took the ASGI path at 0.6-0.7x the rate of the others (benchmarks/RESULTS.md). What the middleware does
for a simple (non-preflight) request, and so what the cache phase does:

- every answer varies on `Origin` (`Vary: ..., Origin`), whether or not the request carried one;
- with an `Origin`: `Access-Control-Expose-Headers`, and `Access-Control-Allow-Origin`: `*` when any
  origin is allowed, the origin itself when it is one of the allowed ones, nothing otherwise.

No credentials mode: the proxy's clients authenticate with bearer tokens, not cookies.
"""

from __future__ import annotations

from starlette.applications import Starlette

# Response headers a cross-origin viewer may read (Content-Type and Content-Length always are).
EXPOSED = ["Content-Location", "Location", "Warning", "Retry-After", "X-Request-Id", "X-Cache"]
METHODS = ["GET", "HEAD", "POST"]
MAX_AGE = 600  # seconds a browser may keep a preflight's answer


def install(app: Starlette, origins: list[str]) -> None:
    """Add the CORS layer (outside everything but the edge layer, so that 401s, 429s and 5xx carry it)."""
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=METHODS, allow_headers=["*"],
                       expose_headers=EXPOSED, max_age=MAX_AGE)


class LaneCors:
    """The headers CORSMiddleware would add to an answer, for answers written without it."""

    def __init__(self, origins: list[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.encode("latin-1") for o in origins)
        self._expose = (b"access-control-expose-headers", ", ".join(EXPOSED).encode("latin-1"))

    def apply(self, headers: list[tuple[bytes, bytes]], origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """`headers` (lower-case names) as the CORS layer would send them to a request from `origin` (None: the
        request had no Origin header)."""
        out = [(k, v + b", Origin" if k == b"vary" else v) for k, v in headers]
        if not any(k == b"vary" for k, _ in headers):
            out.append((b"vary", b"Origin"))
        if origin is None:
            return out
        if self.any:
            return [*out, (b"access-control-allow-origin", b"*"), self._expose]
        if origin in self.origins:
            return [*out, self._expose, (b"access-control-allow-origin", origin)]
        return [*out, self._expose]
