"""Limits (issue 7 point 6) and browser-facing behaviour (point 5: CORS on errors, preflight vs capabilities).

One proxy with small limits in front of two sample archives; the test client comes from 127.0.0.1, a
trusted hop, so each test names its own client with X-Forwarded-For and gets its own buckets.
"""

from __future__ import annotations

import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support import ProxyProcess, instance_path

from proxy.demo.archive import ArchiveServer, SampleArchive
from proxy.demo.synth import Patient, Study, ct_series

ORIGIN = "http://viewer.example"
STOW_LIMIT = 4096
DICOM_STOW = 'multipart/related; type="application/dicom"; boundary=b'


@pytest.fixture(scope="module")
def slices():
    """One 512x512 CT slice (525 KB of pixel data)."""
    return list(ct_series(Study(Patient("DOE^LIMITS", "PID-LIM"), accession="ACC-LIM"), 1))


@pytest.fixture(scope="module")
def archives(slices):
    a, slow = SampleArchive("A"), SampleArchive("SLOW")
    a.extend(slices)
    slow.extend(slices)
    with ArchiveServer(a) as sa, ArchiveServer(slow) as ss:
        yield sa, ss


@pytest.fixture(scope="module")
def proxy(archives, tmp_path_factory):
    a, slow = archives
    workdir = tmp_path_factory.mktemp("proxy_limits")
    config = workdir / "edge.toml"
    config.write_text(
        f'[server]\ncors_origins = ["{ORIGIN}"]\n\n'
        f"[limits]\nmax_stow_bytes = {STOW_LIMIT}\nclient_request_rate = 0.5\nclient_request_burst = 3\n"
        "client_byte_rate = 1000.0\nclient_byte_burst = 200000\nmax_header_bytes = 4096\nmax_header_count = 30\n"
        "header_timeout = 1.0\nsend_timeout = 1.0\nqueue_timeout = 0.5\nkeepalive_timeout = 1.0\n\n"
        "[federation]\nhealth_interval = 0\n\n"
        f'[[archives]]\nname = "a"\nurl = "{a.dicomweb_url}"\n\n'
        f'[[archives]]\nname = "slow"\nurl = "{slow.dicomweb_url}"\nstores = false\nmax_connections = 1\n')
    with ProxyProcess({}, workdir, extra_args=["--config", str(config)]) as p:
        yield p


@pytest.fixture
def slow_faults(archives):
    faults = archives[1].archive.faults
    faults.clear()
    yield faults
    faults.clear()


def _client(n: int) -> dict[str, str]:
    return {"X-Forwarded-For": f"198.51.100.{n}", "Origin": ORIGIN}


def test_request_rate_per_client_429_with_retry_after_and_cors(proxy):
    url = f"{proxy.dicomweb_url}/studies?PatientID=PID-LIM"
    statuses = [httpx.get(url, headers=_client(1), trust_env=False).status_code for _ in range(3)]
    assert statuses == [200] * 3
    r = httpx.get(url, headers=_client(1), trust_env=False)
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1 and r.json()["status"] == 429
    assert r.headers["access-control-allow-origin"] == ORIGIN  # a browser can read the 429
    assert httpx.get(url, headers=_client(2), trust_env=False).status_code == 200  # another client: own bucket
    assert httpx.get(f"{proxy.url}/healthz", headers=_client(1), trust_env=False).status_code == 200  # probes pass


def test_byte_rate_per_client(proxy, slices):
    url = f"{proxy.dicomweb_url}{instance_path(slices[0])}"
    r = httpx.get(url, headers=_client(3), trust_env=False)
    assert r.status_code == 200 and len(r.content) > 200000
    r = httpx.get(url, headers=_client(3), trust_env=False)
    assert r.status_code == 429, r.status_code
    assert int(r.headers["retry-after"]) >= 300  # the 325 KB over the burst, at 1000 bytes/s


def test_oversized_headers_get_431(proxy):
    r = httpx.get(f"{proxy.url}/healthz", headers={"X-Padding": "x" * 5000}, trust_env=False)
    assert r.status_code == 431 and r.json()["status"] == 431
    many = {f"X-H{i}": "1" for i in range(40)}
    r = httpx.get(f"{proxy.url}/healthz", headers=many, trust_env=False)
    assert r.status_code == 431
    assert httpx.get(f"{proxy.url}/healthz", headers={"X-Padding": "x" * 2000}, trust_env=False).status_code == 200


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"])
def test_slow_headers_get_408_and_the_connection_closed(proxy, sent):
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(sent)
        s.settimeout(10)
        data = b""
        while chunk := s.recv(4096):  # the server answers and closes: recv returns b"" at the end
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:100]


@pytest.mark.parametrize("chunked", [False, True])
def test_stow_over_the_limit_is_413_and_nothing_is_stored(proxy, archives, chunked):
    stored = len(archives[0].archive)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + bytes(3 * STOW_LIMIT) + b"\r\n--b--\r\n"
    content = (body[i : i + 1000] for i in range(0, len(body), 1000)) if chunked else body
    r = httpx.post(f"{proxy.dicomweb_url}/studies", content=content, trust_env=False,
                   headers={"Content-Type": DICOM_STOW, **_client(10 + chunked)})
    assert r.status_code == 413, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert len(archives[0].archive) == stored


def test_in_flight_cap_per_archive_503_with_retry_after(proxy, slow_faults):
    slow_faults.first_byte_delay = 2.0
    url = f"{proxy.url}/upstreams/slow/dicomweb/studies"
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda n: httpx.get(url, headers=_client(n), trust_env=False, timeout=10),
                                (20, 21)))
    assert sorted(r.status_code for r in answers) == [200, 503], [r.text for r in answers]
    busy = next(r for r in answers if r.status_code == 503)
    assert int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["reason"]


def _upstream_in_flight(proxy) -> float:
    text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    m = re.search(r'^dicomweb_edge_upstream_in_flight\{archive="slow"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_client_that_stops_reading_does_not_pin_the_archive_connection(proxy, slow_faults, slices):
    slow_faults.endless_body = True  # the archive would stream forever; the client reads 1 KB and stalls
    path = f"/upstreams/slow/dicomweb{instance_path(slices[0])}/rendered"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", proxy.port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: 198.51.100.30\r\n\r\n".encode())
        assert s.recv(1024).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 10
        while _upstream_in_flight(proxy) != 1:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.05)
        deadline = time.monotonic() + 15  # buffers fill, then send_timeout (1 s) cuts the response
        while _upstream_in_flight(proxy) != 0:
            assert time.monotonic() < deadline, "a stalled client still holds the archive connection"
            time.sleep(0.1)
    assert "client read nothing" in proxy.log_path.read_text()


def test_cors_on_error_responses(proxy):
    for url, status in ((f"{proxy.dicomweb_url}/studies/1.2.3/metadata", 404),
                        (f"{proxy.dicomweb_url}/studies/not-a-uid/metadata", 400)):
        r = httpx.get(url, headers=_client(40), trust_env=False)
        assert r.status_code == status and r.headers["access-control-allow-origin"] == ORIGIN, (url, r.status_code)


def test_preflight_is_told_apart_from_the_capabilities_request(proxy):
    """OPTIONS on the service is the Retrieve Capabilities transaction (PS3.18 §8.9); only an OPTIONS with
    Access-Control-Request-Method is a CORS preflight."""
    pre = httpx.options(f"{proxy.dicomweb_url}/studies", trust_env=False,
                        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert pre.status_code == 200 and "GET" in pre.headers["access-control-allow-methods"]
    caps = httpx.options(f"{proxy.dicomweb_url}/", trust_env=False,
                         headers={"Origin": ORIGIN, "Accept": "application/vnd.sun.wadl+xml"})
    assert "access-control-allow-methods" not in caps.headers  # not answered as a preflight
    assert caps.headers.get("access-control-allow-origin") == ORIGIN  # but an ordinary CORS response
    assert caps.status_code == 200 and caps.headers["content-type"].startswith("application/vnd.sun.wadl+xml")


def test_a_client_that_stops_sending_its_body_gets_408_and_frees_the_archive(proxy, archives):
    """A STOW body that stalls half way: the archive connection it opened is closed after send_timeout."""
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {DICOM_STOW}\r\n"
                  f"Content-Length: {STOW_LIMIT - 100}\r\nX-Forwarded-For: 198.51.100.50\r\n\r\n".encode()
                  + b"--b\r\nContent-Type: application/dicom\r\n\r\n" + bytes(100))
        s.settimeout(10)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    assert re.search(r'^dicomweb_edge_upstream_in_flight\{archive="a"\} 0\.0$', text, re.M)


def test_an_idle_keep_alive_connection_is_closed(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.settimeout(10)
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()
        started = time.monotonic()
        while s.recv(4096):  # nothing more is sent; after keepalive_timeout the server closes (b"")
            pass
        assert time.monotonic() - started < 4  # keepalive_timeout = 1 s (uvicorn alone would wait 5 s)
