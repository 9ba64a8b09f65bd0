"""A prebuilt OHIF viewer (`@ohif/app`'s `dist/`) served at `/`, same origin as `/dicomweb`.

Files are served as they are, with explicit media types; OHIF's client-side routes (`/viewer`,
`/segmentation`, ...) fall back to `index.html`; `app-config.js` is written per request so that the
viewer's data source points at this proxy's external base URL (dicomweb.target.external_base).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Match, Route
from starlette.types import Scope

from proxy.config import Settings
from proxy.dicomweb.target import DICOMWEB_ROOT, external_base
from proxy.errors import Problem

# Paths the viewer never answers, even with the SPA fallback: they belong to the proxy.
RESERVED = (DICOMWEB_ROOT, "/upstreams", "/healthz", "/readyz", "/metrics", "/admin")
SOURCE_NAME = "dicomweb-edge"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".gif": "image/gif",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".txt": "text/plain; charset=utf-8",
    ".xml": "application/xml",
    ".onnx": "application/octet-stream",
}
# Served from a precompressed `.gz` sibling when there is one (the app bundle is 17 MB, 4 MB gzipped).
COMPRESSIBLE = {".html", ".js", ".mjs", ".css", ".json", ".map", ".wasm", ".svg", ".txt", ".xml"}
# The viewer isolates itself (COOP + COEP) so that Cornerstone can use SharedArrayBuffer; its web
# workers need the same headers on their scripts, and every file may be embedded by the same origin only.
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}


class _ViewerRoute(Route):
    """A route that never matches the proxy's own paths, so their 404s and 405s stay the proxy's."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "")
        if any(path == p or path.startswith(p + "/") for p in RESERVED):
            return Match.NONE, {}
        return super().matches(scope)


class ViewerError(ValueError):
    """The viewer directory is not a built OHIF `dist/`."""


def check_viewer_dir(directory: str | os.PathLike[str]) -> Path:
    """The resolved directory, if it holds a built viewer (an index.html)."""
    path = Path(directory).expanduser().resolve()
    if not (path / "index.html").is_file():
        raise ViewerError(f"{directory}: no index.html (expected a built OHIF dist/ directory; "
                          "./scripts/fetch-ohif.sh fetches one)")
    return path


def app_config(base: str) -> dict[str, Any]:
    """OHIF's `window.config`, with one DICOMweb data source: this proxy, at `base` + /dicomweb."""
    root = base + DICOMWEB_ROOT
    return {
        "name": "dicomweb-edge",
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": True,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "always",
        "defaultDataSourceName": SOURCE_NAME,
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": SOURCE_NAME,
            "configuration": {
                "friendlyName": "dicomweb-edge",
                "name": SOURCE_NAME,
                "qidoRoot": root,
                "wadoRoot": root,
                "wadoUriRoot": root,
                # The proxy answers includefield (merged across archives) and `*` / `?` wildcards;
                # fuzzy matching depends on the archive, so the viewer does not ask for it.
                "qidoSupportsIncludeField": True,
                "supportsFuzzyMatching": False,
                "supportsWildcard": True,
                "imageRendering": "wadors",
                # Thumbnails from /thumbnail: the proxy renders them from /rendered where an archive has none.
                "thumbnailRendering": "thumbnail",
                "thumbnailRequestStrategy": "fetch",
                "enableStudyLazyLoad": True,
                "staticWado": False,
                "singlepart": "bulkdata,video,pdf",
                "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                "omitQuotationForMultipartRequest": True,
            },
        }],
    }


def _file(root: Path, path: str) -> Path | None:
    """The file under `root` a URL path names, or None (never a path outside `root`)."""
    relative = path.lstrip("/")
    if not relative or "\x00" in relative:
        return None
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        return None
    return candidate if candidate.is_file() else None


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding allows gzip (RFC 9110 12.5.3: named, or `*`, with q > 0)."""
    allowed: dict[str, bool] = {}
    for item in accept_encoding.lower().split(","):
        coding, _, params = item.partition(";")
        q = params.replace(" ", "")
        allowed[coding.strip()] = not (q.startswith("q=0") and q.strip("q=0.") == "")
    return allowed.get("gzip", allowed.get("*", False))


def _precompressed(path: Path, accept_encoding: str) -> Path | None:
    """`path`.gz (written by scripts/fetch-ohif.sh, like nginx's gzip_static) when the client takes gzip
    and it is not older than the file itself."""
    if not _accepts_gzip(accept_encoding):
        return None
    gz = path.with_name(path.name + ".gz")
    try:
        return gz if gz.stat().st_mtime >= path.stat().st_mtime else None
    except FileNotFoundError:
        return None


def viewer_routes(directory: str | os.PathLike[str], settings: Settings) -> list[Route]:
    """The routes serving the viewer in `directory`; mount them after every proxy route."""
    root = check_viewer_dir(directory)
    index = root / "index.html"

    async def config_js(request: Request) -> Response:
        body = "window.config = " + json.dumps(app_config(external_base(request, settings)), indent=2) + ";\n"
        return Response(body, media_type="text/javascript; charset=utf-8",
                        headers={"Cache-Control": "no-cache", **ISOLATION})

    async def static(request: Request) -> Response:
        path = request.url.path
        found = _file(root, path)
        if found is None:
            if "." in path.rsplit("/", 1)[-1]:
                raise Problem(404, "no such file")
            found = index  # a client-side route of the viewer
        suffix = found.suffix.lower()
        headers = {"Cache-Control": "no-cache" if suffix == ".html" else "public, max-age=3600", **ISOLATION}
        media_type = MEDIA_TYPES.get(suffix, "application/octet-stream")
        if suffix in COMPRESSIBLE:
            headers["Vary"] = "Accept-Encoding"
            gz = _precompressed(found, request.headers.get("accept-encoding", ""))
            if gz is not None:
                headers["Content-Encoding"] = "gzip"
                return FileResponse(gz, media_type=media_type, headers=headers)
        return FileResponse(found, media_type=media_type, headers=headers)

    methods = ["GET", "HEAD"]
    return [Route("/app-config.js", config_js, methods=methods),
            _ViewerRoute("/{path:path}", static, methods=methods)]


def fetched_viewer_dir() -> Path:
    """The newest viewer `scripts/fetch-ohif.sh` unpacked into this checkout's .ohif/ (it may not exist)."""
    root = Path(__file__).resolve().parents[2] / ".ohif"  # (the repository root: proxy/http/viewer.py)
    found = sorted((p.parent for p in root.glob("*/dist/index.html")),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")])
    if not found:
        raise ViewerError(f"no viewer in {root}: run ./scripts/fetch-ohif.sh first")
    return found[-1]
