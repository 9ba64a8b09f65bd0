"""Retrieve Capabilities (PS3.18 §8.9, Annex H): `OPTIONS` on the service base URL.

The answer describes what this proxy serves (every route of routes.py, with its methods and media types),
at the proxy's external base URL, as WADL (`application/vnd.sun.wadl+xml`, the default) or as JSON for
older clients. A CORS preflight is also an `OPTIONS`: it carries `Access-Control-Request-Method`, is
answered by the CORS layer when cross-origin access is configured, and is refused here otherwise.
"""

from __future__ import annotations

import json
from functools import cache
from xml.sax.saxutils import quoteattr

from starlette.requests import Request
from starlette.responses import Response

from proxy.errors import Problem

WADL = "application/vnd.sun.wadl+xml"
_SEARCH = ("application/dicom+json", "application/json")
_RETRIEVE = ('multipart/related; type="application/dicom"', 'multipart/related; type="application/octet-stream"',
             "application/dicom")
_FRAMES = ('multipart/related; type="application/octet-stream"', 'multipart/related; type="image/jpeg"',
           'multipart/related; type="image/jls"', 'multipart/related; type="image/jp2"')
_RENDERED = ("image/jpeg", "image/png", "image/gif")


def _produces(path: str, method: str) -> tuple[str, ...]:
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if method == "POST" or last == "metadata":
        return ("application/dicom+json",)
    if last in ("studies", "series", "instances"):
        return _SEARCH
    if last in ("rendered", "thumbnail"):
        return _RENDERED
    if "{frames}" in path:
        return _FRAMES
    if "bulk" in path or last in ("bulkdata", "pixeldata"):
        return ('multipart/related; type="application/octet-stream"', "application/octet-stream")
    return _RETRIEVE


@cache
def _resources(routes: tuple[tuple[str, tuple[str, ...]], ...]) -> list[dict[str, object]]:
    merged: dict[str, set[str]] = {}
    for path, methods in routes:
        merged.setdefault(path, set()).update(m for m in methods if m != "HEAD")
    return [{"path": path.lstrip("/"), "methods": [{"name": m, "produces": list(_produces(path, m)),
                                                    **({"consumes": ['multipart/related; type="application/dicom"']}
                                                       if m == "POST" else {})}
                                                   for m in sorted(methods)]}
            for path, methods in merged.items() if path != "/"]


def _wadl(base: str, resources: list[dict[str, object]]) -> str:
    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<application xmlns="http://wadl.dev.java.net/2009/02">',
           f"  <resources base={quoteattr(base + '/')}>"]
    for res in resources:
        out.append(f"    <resource path={quoteattr(str(res['path']))}>")
        for m in res["methods"]:  # type: ignore[attr-defined]
            out.append(f"      <method name={quoteattr(m['name'])}>")
            if "consumes" in m:
                out.append("        <request>" + "".join(f"<representation mediaType={quoteattr(t)}/>"
                                                         for t in m["consumes"]) + "</request>")
            out.append("        <response>" + "".join(f"<representation mediaType={quoteattr(t)}/>"
                                                      for t in m["produces"]) + "</response>")
            out.append("      </method>")
        out.append("    </resource>")
    out += ["  </resources>", "</application>", ""]
    return "\n".join(out)


def capabilities_response(request: Request, base: str, routes: tuple[tuple[str, tuple[str, ...]], ...]) -> Response:
    """The Retrieve Capabilities answer for `OPTIONS` on the service base URL; `routes` are (path, methods)."""
    if "access-control-request-method" in request.headers:
        raise Problem(403, "cross-origin requests are not enabled on this proxy (server.cors_origins)")
    accept = request.headers.get("accept", "").lower()
    resources = _resources(routes)
    headers = {"Allow": "GET, POST, OPTIONS", "Vary": "Accept"}
    if not accept or "wadl" in accept or "*/*" in accept or "application/*" in accept:
        return Response(_wadl(base, resources), media_type=WADL, headers=headers)
    if "application/json" in accept:
        return Response(json.dumps({"base": base + "/", "resources": resources}, separators=(",", ":")),
                        media_type="application/json", headers=headers)
    raise Problem(406, f"capabilities are available as {WADL} or application/json")
