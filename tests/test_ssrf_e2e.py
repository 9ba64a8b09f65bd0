"""No open proxy (issue 7 point 4): the proxy only ever fetches under its archives' configured base URLs.

A sample archive is made to point BulkDataURIs and redirects at another local server that counts every
connection it gets; that server must get none. Forged bulk data tokens, traversal in the path (plain and
percent-encoded) and line breaks in the query never reach the archive as such.
"""

from __future__ import annotations

import socket
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
from support import ProxyProcess, instance_path, sample_holding, split_multipart

from proxy.config import ArchiveConfig
from proxy.demo.synth import Patient, Study, ct_series
from proxy.formats.dicomjson import encode_token
from proxy.upstream.archive import Archive, UnsafeTarget

STUDY = Study(Patient("DOE^SSRF", "PID-SSRF"), accession="ACC-SSRF", description="SSRF")

KEY = b"ssrf-test-deployment-key"  # the proxy under test signs its bulk data tokens with it


class CountingServer:
    """Accepts connections on 127.0.0.1 and counts them, answering each with a 200 that names itself."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            with conn:
                conn.settimeout(1)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                 b"Content-Length: 9\r\nConnection: close\r\n\r\nELSEWHERE")
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def elsewhere():
    server = CountingServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def slices():
    return list(ct_series(STUDY, 2, rows=64, cols=64))


@pytest.fixture(scope="module")
def sample(slices):
    yield from sample_holding("SSRF", slices)


@pytest.fixture(scope="module")
def proxy(sample, tmp_path_factory):
    with ProxyProcess({"a": sample.dicomweb_url}, tmp_path_factory.mktemp("proxy_ssrf"),
                      extra_args=["--log-level", "debug"], env={"DICOMWEB_EDGE_BULK_TOKEN_KEY": KEY.decode()}) as p:
        yield p


@pytest.fixture
def faults(sample):
    sample.archive.faults.clear()
    yield sample.archive.faults
    sample.archive.faults.clear()


def test_bulk_data_uris_pointing_elsewhere_are_removed_and_never_fetched(proxy, sample, faults, elsewhere, slices):
    faults.bulk_uri_base = elsewhere.url + "/dicom-web"
    ds = slices[0]
    before = elsewhere.hits
    series = f"{proxy.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    meta = httpx.get(series + "/metadata", headers={"Cache-Control": "no-cache"}, trust_env=False)
    assert meta.status_code == 200, meta.text
    assert f":{elsewhere.port}" not in meta.text and "BulkDataURI" not in meta.text
    pixel = meta.json()[0]["7FE00010"]
    assert pixel == {"vr": "OW"}, pixel  # the element stays, without the URI that leads elsewhere
    # Composed resources read BulkDataURIs from metadata: nothing may be fetched from the other server.
    for suffix in ("/bulkdata", "/pixeldata"):
        r = httpx.get(f"{proxy.dicomweb_url}{instance_path(ds)}{suffix}", trust_env=False)
        assert r.status_code in (200, 404), (suffix, r.status_code, r.text)
        assert b"ELSEWHERE" not in r.content
    assert elsewhere.hits == before
    log = proxy.log_path.read_text()
    assert "point outside its base URL" in log and f":{elsewhere.port}" not in log


def test_content_locations_pointing_elsewhere_are_not_passed_on(proxy, faults, elsewhere, slices):
    faults.bulk_uri_base = elsewhere.url + "/dicom-web"
    ds = slices[0]
    r = httpx.get(f"{proxy.dicomweb_url}{instance_path(ds)}/frames/1", trust_env=False,
                  headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    assert r.status_code == 200, r.text
    _, parts = split_multipart(r.content, r.headers["content-type"])
    (headers, payload), = parts
    assert dict(headers)["Content-Location"] == f"{proxy.dicomweb_url}{instance_path(ds)}/frames/1"
    assert payload == ds.PixelData  # the archive's frame, whatever its Content-Location said
    assert f":{elsewhere.port}" not in r.content.decode("latin-1")


def test_bulk_data_uris_of_the_archive_are_minted_and_served(proxy, slices):
    ds = slices[0]
    meta = httpx.get(f"{proxy.dicomweb_url}{instance_path(ds)}/metadata", headers={"Cache-Control": "no-cache"},
                     trust_env=False).json()
    uri = meta[0]["7FE00010"]["BulkDataURI"]
    assert uri.startswith(proxy.dicomweb_url + "/"), uri
    r = httpx.get(uri, headers={"Accept": 'multipart/related; type="application/octet-stream"'}, trust_env=False)
    assert r.status_code == 200, r.text
    (headers, payload), = split_multipart(r.content, r.headers["content-type"])[1]
    assert payload == ds.PixelData and dict(headers)["Content-Location"] == uri


def test_redirects_from_the_archive_are_not_followed(proxy, faults, elsewhere, slices):
    faults.redirect_to = elsewhere.url
    before = elsewhere.hits
    ds = slices[0]
    for url in (f"{proxy.dicomweb_url}{instance_path(ds)}", f"{proxy.dicomweb_url}{instance_path(ds)}/metadata",
                f"{proxy.dicomweb_url}/studies?PatientID=PID-SSRF"):
        r = httpx.get(url, headers={"Cache-Control": "no-cache"}, trust_env=False)
        assert r.status_code in (502, 503), (url, r.status_code, r.text)
        assert "location" not in r.headers and str(elsewhere.port) not in r.text
    stow = httpx.post(f"{proxy.dicomweb_url}/studies", content=b"--b\r\n\r\n--b--\r\n",
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
                      trust_env=False)
    assert stow.status_code == 502 and "location" not in stow.headers, stow.text
    assert elsewhere.hits == before


@pytest.mark.parametrize("remainder", ["/../../system", "/studies/%2e%2e/%2E%2E/system", "/studies/..%2f..%2fsystem",
                                       "/x/%2fsystem", "/a\\..\\b"])
def test_forged_bulk_tokens_are_refused_before_the_archive(proxy, sample, remainder):
    """Even a token signed with the deployment's key never leaves the archive's base URL."""
    before = sum(sample.archive.requests.values())
    r = httpx.get(f"{proxy.dicomweb_url}/bulk/a/{encode_token(remainder, KEY, 'a')}", trust_env=False)
    assert r.status_code == 400 and r.json()["reason"] == "malformed bulk data token", r.text
    assert sum(sample.archive.requests.values()) == before


def test_bulk_tokens_the_proxy_did_not_mint_are_refused_before_the_archive(proxy, sample, slices):
    """A token that stays under the archive's base URL but was not signed with this deployment's key (forged,
    or altered after minting) is a 400 and reaches no archive; the same path signed with the key is served."""
    path = instance_path(slices[0]) + "/bulk/7fe00010"
    before = sum(sample.archive.requests.values())
    minted = encode_token(path, KEY, "a")
    body, mac = minted.split(".")
    altered = encode_token(path.replace("7fe00010", "00100010"), KEY, "a").split(".")[0] + "." + mac
    for token in (encode_token(path, b"another deployment's key", "a"), altered, body):
        r = httpx.get(f"{proxy.dicomweb_url}/bulk/a/{token}", trust_env=False)
        assert r.status_code == 400, (token, r.text)
    assert sum(sample.archive.requests.values()) == before
    r = httpx.get(f"{proxy.dicomweb_url}/bulk/a/{minted}", headers={"Accept": "application/octet-stream"},
                  trust_env=False)
    assert r.status_code == 200 and sum(sample.archive.requests.values()) == before + 1


def test_tokens_only_resolve_under_their_own_archive(proxy, sample):
    before = sum(sample.archive.requests.values())
    for url in (f"{proxy.dicomweb_url}/bulk/other/{encode_token('/studies/1.2', KEY, 'a')}",
                f"{proxy.dicomweb_url}/bulk/other/{encode_token('/studies/1.2', KEY, 'other')}",
                f"{proxy.dicomweb_url}/bulk/a/not+base64!"):
        r = httpx.get(url, trust_env=False)
        assert r.status_code in (400, 404), (url, r.status_code)
    assert sum(sample.archive.requests.values()) == before


@pytest.fixture(scope="module")
def counted():
    """A proxy whose only archive is a server that counts every connection, whatever the path: what the
    proxy forwards, it sees."""
    server = CountingServer()
    with ProxyProcess({"bare": server.url + "/dicom-web"}, Path(tempfile.mkdtemp(prefix="ssrf-bare-"))) as p:
        yield p, server
    server.close()


@pytest.mark.parametrize("path", ["/studies/%2e%2e/series", "/studies/1.2/series/..%2f..%2fsystem/metadata",
                                  "/studies/1.2/series/3/instances/4/bulk/..%2F..%2Fsystem",
                                  "/studies/1.2%0d%0aX-Injected:%20yes/metadata",
                                  "/studies/1.2/series/3/instances/4/frames/1%2c..%2f2"])
def test_traversal_in_the_path_is_refused(counted, path):
    """Refused by the proxy itself (400, or 404 for a path its routes do not know once decoded): the
    archive sees no connection at all (a sample archive counts only the requests it can route, so it
    could not tell a refusal from a forwarded request it answered 404)."""
    proxy, archive = counted
    before = archive.hits
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:  # raw: no client normalises the path
        s.sendall(f"GET /dicomweb{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(65536).split(b"\r\n", 1)[0]
    assert head.split()[1] in (b"400", b"404"), head
    assert archive.hits == before


def test_line_breaks_in_the_query_do_not_reach_the_archive_as_headers(proxy, sample):
    r = httpx.get(f"{proxy.dicomweb_url}/studies?PatientID=PID%0d%0aX-Injected:%20yes", trust_env=False)
    assert r.status_code == 400, r.text
    r = httpx.get(f"{proxy.dicomweb_url}/studies/1.2/rendered?viewport=1%0d%0aX-Injected:%20yes", trust_env=False)
    assert r.status_code == 400
    assert "x-injected" not in sample.archive.header_names


@pytest.mark.parametrize("path", ["/../system", "/studies/%2e%2e/system", "/studies/..%2fsystem", "/a/%2Fb",
                                  "/studies/1 HTTP/1.1", "/studies/1\r\nX: y", "/studies/\u00e9", "/a\\b"])
def test_every_upstream_url_stays_under_the_base_url(path):
    """The one check in Archive.open: whatever a caller builds, nothing outside the base URL is sent."""
    archive = Archive(ArchiveConfig("a", "http://127.0.0.1:9/dicom-web"))
    with pytest.raises(UnsafeTarget):
        archive.target(path)
    assert archive.target("/studies/1.2/series/3", "limit=1") == "/dicom-web/studies/1.2/series/3?limit=1"
