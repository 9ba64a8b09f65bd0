"""Serving a built viewer at / (proxy/http/viewer.py): files, the SPA fallback, app-config.js, and the proxy's
own paths, which the viewer never shadows. A small dist/ of our own here; the real OHIF build is
exercised in Chromium by test_viewer_e2e.py."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import httpx
import pytest
from support import ProxyProcess

from proxy.config import ArchiveConfig, ConfigError, Settings, load
from proxy.runtime import create_app

INDEX = "<!doctype html><html><head><script src=\"/app-config.js\"></script></head><body>viewer</body></html>"


@pytest.fixture
def dist(tmp_path):
    d = tmp_path / "dist"
    (d / "assets").mkdir(parents=True)
    (d / "index.html").write_text(INDEX)
    (d / "app.bundle.js").write_text("console.log('app');")
    (d / "ort").mkdir()
    (d / "ort" / "ort-wasm.wasm").write_bytes(b"\0asm\1\0\0\0")
    (d / "assets" / "font.woff2").write_bytes(b"wOF2")
    (d / "app-config.js").write_text("window.config = {dataSources: [{qidoRoot: 'https://elsewhere'}]};")
    (tmp_path / "secret.txt").write_text("outside the viewer")
    return d


class Client:
    """Synchronous requests into the app in-process, through httpx's ASGI transport (peer 127.0.0.1)."""

    def __init__(self, app) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080")

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        return self._loop.run_until_complete(self._client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def head(self, url: str, **kwargs) -> httpx.Response:
        return self.request("HEAD", url, **kwargs)

    def post(self, url: str, **kwargs) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def options(self, url: str, **kwargs) -> httpx.Response:
        return self.request("OPTIONS", url, **kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


def _client(dist, **settings) -> Client:
    s = Settings(archives=[ArchiveConfig("a", "http://127.0.0.1:9/dicom-web")], health_interval=0,
                 viewer_dir=str(dist), **settings)
    return Client(create_app(s))


def config_of(body: str) -> dict:
    """The object `app-config.js` assigns to window.config (it is written as JSON)."""
    match = re.fullmatch(r"window\.config = (.*);\s*", body, re.S)
    assert match, body[:200]
    return json.loads(match.group(1))


def source(config: dict) -> dict:
    [ds] = config["dataSources"]
    assert ds["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    assert config["defaultDataSourceName"] == ds["sourceName"]
    return ds["configuration"]


def test_files_are_served_with_their_media_types(dist):
    with _client(dist) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.text == INDEX
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.headers["cross-origin-embedder-policy"] == "require-corp"
        r = c.get("/app.bundle.js")
        assert r.headers["content-type"] == "text/javascript; charset=utf-8" and r.text == "console.log('app');"
        assert r.headers["cross-origin-embedder-policy"] == "require-corp"  # workers need it on their script
        assert c.get("/ort/ort-wasm.wasm").headers["content-type"] == "application/wasm"
        assert c.get("/assets/font.woff2").headers["content-type"] == "font/woff2"
        assert c.head("/app.bundle.js").status_code == 200


def test_client_side_routes_fall_back_to_index_but_missing_files_are_404(dist):
    with _client(dist) as c:
        for path in ("/viewer?StudyInstanceUIDs=1.2.3", "/viewer/dicomweb", "/segmentation", "/local"):
            r = c.get(path)
            assert r.status_code == 200 and r.text == INDEX, path
        r = c.get("/1234.bundle.deadbeef.js")
        assert r.status_code == 404 and "viewer" not in r.text
        assert c.get("/%2e%2e/secret.txt").status_code == 404
        assert c.get("/..%2fsecret.txt").status_code == 404


def test_app_config_points_the_viewer_at_the_proxy(dist):
    with _client(dist) as c:  # from 127.0.0.1, a trusted hop by default
        r = c.get("/app-config.js")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
        conf = source(config_of(r.text))
        assert conf["qidoRoot"] == conf["wadoRoot"] == conf["wadoUriRoot"] == "http://127.0.0.1:8080/dicomweb"
        assert conf["imageRendering"] == "wadors"
        assert "elsewhere" not in r.text  # the dist's own app-config.js is replaced, not served
        # The base the client used (Host), and a trusted hop's X-Forwarded-*.
        conf = source(config_of(c.get("/app-config.js", headers={"Host": "viewer.test:9000"}).text))
        assert conf["qidoRoot"] == "http://viewer.test:9000/dicomweb"
        conf = source(config_of(c.get("/app-config.js", headers={"X-Forwarded-Host": "imaging.example.org",
                                                                 "X-Forwarded-Proto": "https"}).text))
        assert conf["wadoRoot"] == "https://imaging.example.org/dicomweb"
    with _client(dist, public_url="https://pacs.example.org") as c:
        assert source(config_of(c.get("/app-config.js").text))["qidoRoot"] == "https://pacs.example.org/dicomweb"


def test_the_viewer_never_shadows_the_proxy(dist):
    with _client(dist) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/metrics").headers["content-type"].startswith("text/plain")
        for path in ("/dicomweb/nope", "/dicomweb/studies/1.2/nope", "/upstreams/a/dicomweb/nope",
                     "/admin/nope", "/metrics/x"):
            r = c.get(path)
            assert r.status_code == 404 and r.headers["content-type"].startswith("application/"), path
            assert "viewer" not in r.text, path
        assert c.get("/dicomweb/studies/1.2.3/series/x/metadata").status_code == 400  # still the proxy's route
        assert c.post("/admin/cache").status_code == 405
        assert c.post("/").status_code == 405


def test_without_a_viewer_nothing_is_served_at_root(dist):
    s = Settings(archives=[ArchiveConfig("a", "http://127.0.0.1:9/dicom-web")], health_interval=0)
    with Client(create_app(s)) as c:
        assert c.get("/").status_code == 404
        assert c.get("/app-config.js").status_code == 404


def test_viewer_setting_in_file_env_and_flag(dist, tmp_path):
    f = tmp_path / "edge.toml"
    f.write_text(f"[viewer]\ndir = {json.dumps(str(dist))}\n\n[[archives]]\nname = 'a'\nurl = 'http://127.0.0.1:9/x'\n")
    assert load(f, environ={}).viewer_dir == str(dist)
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.html").write_text(INDEX)
    assert load(f, environ={"DICOMWEB_EDGE_VIEWER_DIR": str(other)}).viewer_dir == str(other)
    with pytest.raises(ConfigError, match="no index.html"):
        load(f, {"viewer_dir": str(tmp_path)}, environ={})
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(f)], capture_output=True, text=True)
    assert out.returncode == 0 and f"[viewer]\ndir = {json.dumps(str(dist))}" in out.stdout


def test_serve_viewer_flag(dist, tmp_path):
    with ProxyProcess({"a": "http://127.0.0.1:9/dicom-web"}, tmp_path / "p", ["--viewer", str(dist)]) as proxy:
        with httpx.Client(base_url=proxy.url, trust_env=False) as c:
            assert c.get("/viewer").text == INDEX
            assert source(config_of(c.get("/app-config.js").text))["qidoRoot"] == proxy.dicomweb_url
    bad = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--upstream", "a=http://127.0.0.1:9/x",
                          "--viewer", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "no index.html" in bad.stderr


def test_cors_for_a_viewer_on_another_origin(dist):
    viewer = "https://viewer.example.org"
    with _client(dist, cors_origins=[viewer]) as c:
        pre = c.options("/dicomweb/studies", headers={"Origin": viewer, "Access-Control-Request-Method": "GET",
                                                      "Access-Control-Request-Headers": "accept, x-request-id"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == viewer
        assert "GET" in pre.headers["access-control-allow-methods"]
        assert {"accept", "x-request-id"} <= set(pre.headers["access-control-allow-headers"].lower().split(", "))
        r = c.get("/healthz", headers={"Origin": viewer})
        assert r.headers["access-control-allow-origin"] == viewer and "origin" in r.headers["vary"].lower()
        assert "warning" in r.headers["access-control-expose-headers"].lower()
        # Any other origin gets no grant: the browser keeps its pages away from the answers.
        r = c.get("/healthz", headers={"Origin": "https://elsewhere.example.org"})
        assert "access-control-allow-origin" not in r.headers
        pre = c.options("/dicomweb/studies", headers={"Origin": "https://elsewhere.example.org",
                                                      "Access-Control-Request-Method": "GET"})
        assert pre.status_code == 400 and "access-control-allow-origin" not in pre.headers
    with _client(dist) as c:  # off unless configured
        assert "access-control-allow-origin" not in c.get("/healthz", headers={"Origin": viewer}).headers


@pytest.mark.parametrize("origin", ["viewer.example.org", "https://viewer.example.org/app", "ftp://x"])
def test_cors_origins_are_validated(origin):
    with pytest.raises(ConfigError, match="cors_origins"):
        load(None, {"cors_origins": [origin], "archives": [{"name": "a", "url": "http://127.0.0.1:9/x"}]},
             environ={})
    s = load(None, {"archives": [{"name": "a", "url": "http://127.0.0.1:9/x"}]},
             environ={"DICOMWEB_EDGE_CORS_ORIGINS": "https://a.example, http://localhost:3000"})
    assert s.cors_origins == ["https://a.example", "http://localhost:3000"]


def test_fetch_script_pins_the_viewer_that_is_served():
    """scripts/fetch-ohif.sh pins a version and its registry integrity; a second run is a no-op that
    prints the directory `demo --viewer` picks."""
    from support import REPO_ROOT, missing

    from proxy.http.viewer import ViewerError, fetched_viewer_dir

    script = REPO_ROOT / "scripts" / "fetch-ohif.sh"
    text = script.read_text()
    version = re.search(r'^OHIF_VERSION="([0-9]+\.[0-9]+\.[0-9]+)"$', text, re.M).group(1)
    assert re.search(r'^OHIF_INTEGRITY="sha512-[A-Za-z0-9+/]{86}=="$', text, re.M)
    try:
        served = fetched_viewer_dir()
    except ViewerError as exc:
        missing(f"{exc} (./scripts/test.sh fetches it)")
    assert served == REPO_ROOT / ".ohif" / version / "dist"
    assert json.loads((served.parent / "package.json").read_text())["version"] == version
    again = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == str(served)
    assert "downloading" not in again.stderr
    bundles = list(served.glob("app.bundle.*.js"))
    assert bundles and all(b.with_name(b.name + ".gz").is_file() for b in bundles)  # precompressed


def test_frames_negotiation_prefers_no_transcoding_among_equals():
    """dicom-microscopy-viewer (OHIF's slide viewport) lists JPEG-LS, JPEG 2000, then `*`, all at q=1:
    the stored transfer syntax (`*`) is chosen, so the archive sends the tiles as stored."""
    from proxy.formats.media import ANY_TS, NotAcceptable, Resource, negotiate

    dmv = ('multipart/related; type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.80, '
           'multipart/related; type="image/jp2"; transfer-syntax=1.2.840.10008.1.2.4.90, '
           'multipart/related; type="application/octet-stream"; transfer-syntax=*, '
           'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50')
    sel = negotiate(dmv, Resource.FRAMES)
    assert (sel.multipart, sel.media_type, sel.transfer_syntax) == (True, "application/octet-stream", ANY_TS)
    # A lower q still loses, and a first choice stays first when nothing equal avoids transcoding.
    lower = dmv.replace("transfer-syntax=*", "transfer-syntax=*; q=0.5")
    assert negotiate(lower, Resource.FRAMES).media_type == "image/jls"
    assert negotiate('multipart/related; type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.80, '
                     'multipart/related; type="image/jpeg"; transfer-syntax=*', Resource.FRAMES).media_type \
        == "image/jls"  # the second is unusable (image/jpeg with *), but the first was fine
    with pytest.raises(NotAcceptable):
        negotiate('multipart/related; type="image/jpeg"; transfer-syntax=*', Resource.FRAMES)


def test_precompressed_files_for_clients_that_take_gzip(dist):
    import gzip
    import os

    body = "console.log('app');" * 200
    (dist / "app.bundle.js").write_text(body)
    (dist / "app.bundle.js.gz").write_bytes(gzip.compress(body.encode()))
    with _client(dist) as c:
        r = c.get("/app.bundle.js", headers={"Accept-Encoding": "gzip, deflate, br"})
        assert r.headers["content-encoding"] == "gzip" and r.headers["vary"] == "Accept-Encoding"
        assert r.headers["content-type"] == "text/javascript; charset=utf-8" and r.text == body
        assert int(r.headers["content-length"]) < len(body)
        for encoding in ("identity", "gzip;q=0", "br"):
            r = c.get("/app.bundle.js", headers={"Accept-Encoding": encoding})
            assert "content-encoding" not in r.headers and r.text == body, encoding
        os.utime(dist / "app.bundle.js.gz", (0, 0))  # older than the file: stale, not served
        r = c.get("/app.bundle.js", headers={"Accept-Encoding": "gzip"})
        assert "content-encoding" not in r.headers and r.text == body
