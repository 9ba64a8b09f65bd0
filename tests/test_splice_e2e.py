"""Payloads relayed archive → client with splice(2) (proxy/upstream/splice.py), without a frame cache.

Against a real Orthanc (its parts carry a Content-Length, so the proxy relays them): what the client
gets is the archive's payloads, under our framing, and the relayed-bytes counter shows they did not
pass through Python. Against the sample archive, for the faults a real one cannot make on demand: an
archive that resets or stalls inside a relayed part cuts the response and is counted, a client that
goes away or stops reading mid-relay frees everything, and none of it leaks descriptors.
"""

from __future__ import annotations

import collections
import re
import socket
import time

import httpx
import pytest
from procstats import children, connections_to, fd_targets
from support import ProxyProcess, instance_path, orthanc_holding, sample_holding, split_multipart

from proxy.demo.archive import ArchiveServer, SampleArchive
from proxy.demo.synth import Patient, Study, ct_series, to_part10
from proxy.upstream.transport import RELAY_WINDOW

STUDY = Study(Patient("DOE^RELAY", "PID610"), accession="ACC610", description="RELAY")
SLICES = 24  # 512x512: ~12 MB a series, more than the socket buffers and the pipe hold together
SERIES_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
IDLE_READ = 1.0
SEND_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def slices():
    return list(ct_series(STUDY, SLICES, seed=610))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, slices):
    yield from orthanc_holding(tmp_path_factory, "RELAY", slices)


@pytest.fixture(scope="module")
def sample(slices):
    yield from sample_holding("RELAYSAMPLE", slices)


@pytest.fixture(scope="module")
def single(slices):
    """A sample archive that answers `Accept: application/dicom` on an instance itself, like dcm4chee."""
    archive = SampleArchive("SINGLEPART", single_part=True)
    archive.extend(slices[:6])
    with ArchiveServer(archive) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(orthanc, sample, single, tmp_path_factory):
    work = tmp_path_factory.mktemp("proxy_relay")
    config = work / "edge.toml"
    timeouts = f"timeouts = {{ connect = 2.0, first_byte = 5.0, idle_read = {IDLE_READ} }}\n"
    config.write_text(
        f"[server]\nworkers = 1\n[limits]\nsend_timeout = {SEND_TIMEOUT}\n[federation]\nhealth_interval = 0\n"
        f'[[archives]]\nname = "orthanc"\nurl = "{orthanc.dicomweb_url}"\n{timeouts}'
        f'[[archives]]\nname = "sample"\nurl = "{sample.dicomweb_url}"\nbreaker_threshold = 100000\n{timeouts}'
        f'[[archives]]\nname = "single"\nurl = "{single.dicomweb_url}"\nprofile = "dcm4chee"\n{timeouts}')
    with ProxyProcess({}, work, extra_args=["--config", str(config)]) as p:
        yield p


def _workers(proxy: ProxyProcess) -> list[int]:
    return children(proxy.pid) or [proxy.pid]  # one worker: uvicorn serves in the process itself


@pytest.fixture
def faults(sample):
    sample.archive.faults.clear()
    yield sample.archive.faults
    sample.archive.faults.clear()


def _base(proxy: ProxyProcess, archive: str) -> str:
    return f"{proxy.url}/upstreams/{archive}/dicomweb"


def _series_path(slices: list) -> str:
    return f"/studies/{slices[0].StudyInstanceUID}/series/{slices[0].SeriesInstanceUID}"


def _metric(proxy: ProxyProcess, name: str, archive: str, kind: str | None = None) -> float:
    text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    labels = f'archive="{archive}"' + (f',kind="{kind}"' if kind else "")
    m = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _relayed(proxy: ProxyProcess, archive: str) -> float:
    return _metric(proxy, "dicomweb_edge_relayed_bytes_total", archive)


def _relayed_since(proxy: ProxyProcess, archive: str, before: float, at_least: float) -> float:
    """Bytes relayed since `before`, polled until they reach `at_least` or 3 s pass (a worker adds its
    counts up and writes them within 50 ms, not at once)."""
    deadline = time.monotonic() + 3
    while (got := _relayed(proxy, archive) - before) < at_least and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def _fds(proxy: ProxyProcess) -> collections.Counter[str]:
    """The worker's open descriptors by kind (socket, pipe, file)."""
    return collections.Counter(t.split(":")[0] if ":[" in t else "file"
                               for pid in _workers(proxy) for t in fd_targets(pid))


def _settled(proxy: ProxyProcess, port: int, baseline: collections.Counter[str], timeout: float = 10.0) -> None:
    """Poll until no connection to the archive is left and the worker's sockets and pipes are back to
    `baseline` (its idle pipe pool may only have shrunk)."""
    deadline = time.monotonic() + timeout
    while True:
        fds = _fds(proxy)
        conns = sum(connections_to(_workers(proxy), port).values())
        if conns == 0 and fds["socket"] <= baseline["socket"] and fds["pipe"] <= baseline["pipe"]:
            return
        assert time.monotonic() < deadline, f"left behind: {conns} archive connections, fds {fds} vs {baseline}"
        time.sleep(0.1)


def _payloads(response: httpx.Response) -> list[bytes]:
    _, parts = split_multipart(response.content, response.headers["content-type"])
    return [content for _, content in parts]


def _read_cut(url: str, accept: str) -> tuple[int, bool, int]:
    """(status, whether the body was cut, bytes read) as a streaming client sees it."""
    got = 0
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        with client.stream("GET", url, headers={"Accept": accept, "Connection": "close"}) as response:
            try:
                for chunk in response.iter_bytes():
                    got += len(chunk)
            except httpx.TransportError:  # the chunked body ended without its last chunk
                return response.status_code, True, got
            return response.status_code, False, got


def test_series_is_relayed_whole_with_truthful_part_headers(proxy, orthanc, slices):
    """Our framing with the payloads spliced: the same instances as Orthanc's own answer, each part labelled
    with its transfer syntax, and nearly all bytes counted as relayed (only each part's first read window,
    which holds its headers and File Meta, passes through Python)."""
    before = _relayed(proxy, "orthanc")
    response = httpx.get(_base(proxy, "orthanc") + _series_path(slices), headers={"Accept": SERIES_ACCEPT},
                         trust_env=False, timeout=60)
    assert response.status_code == 200, response.text
    direct = httpx.get(orthanc.dicomweb_url + _series_path(slices), headers={"Accept": SERIES_ACCEPT},
                       trust_env=False, timeout=60)
    ours = _payloads(response)
    assert sorted(ours) == sorted(_payloads(direct)) and len(ours) == SLICES
    _, parts = split_multipart(response.content, response.headers["content-type"])
    for headers, _ in parts:
        ctype = dict((k.lower(), v) for k, v in headers)["content-type"]
        assert ctype == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1", ctype
    payload = sum(map(len, ours))
    relayed = _relayed_since(proxy, "orthanc", before, 0.9 * payload)
    assert 0.9 * payload <= relayed <= payload, (relayed, payload)


def test_single_frame_is_relayed_under_its_content_length(proxy, orthanc, sample, slices, faults):
    """A one-frame answer keeps its Content-Length (no chunking) when the payload is spliced, and all of
    the payload but the first read window is spliced, even from an archive that sends the whole answer
    at once (Orthanc): the connection of a request to be relayed reads only the start of the body
    (Pool.request `window`), so the frame is not read into Python first and written out again."""
    ds = slices[3]
    for archive in ("orthanc", "sample"):
        faults.body_chunk_delay = 0.01 if archive == "sample" else 0.0
        before = _relayed(proxy, archive)
        response = httpx.get(_base(proxy, archive) + instance_path(ds) + "/frames/1",
                             headers={"Accept": FRAME_ACCEPT}, trust_env=False, timeout=30)
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == len(response.content)
        assert _payloads(response) == [ds.PixelData]
        at_least = len(ds.PixelData) - RELAY_WINDOW
        assert _relayed_since(proxy, archive, before, at_least) >= at_least, archive


def test_single_part_answers_are_relayed_too(proxy, orthanc, sample, single, slices, faults):
    """An instance asked single-part comes whole, both when the proxy unwraps it from a multipart
    answer (Orthanc, the sample archive) and when the archive answers single-part itself (passed through
    with its Content-Length); all of it but the first read window is relayed."""
    ds = slices[5]
    direct = httpx.get(orthanc.dicomweb_url + instance_path(ds), headers={"Accept": SERIES_ACCEPT},
                       trust_env=False, timeout=30)
    (part10,) = _payloads(direct)
    faults.body_chunk_delay = 0.01
    single.archive.faults.body_chunk_delay = 0.01
    try:
        for archive in ("orthanc", "sample", "single"):
            before = _relayed(proxy, archive)
            response = httpx.get(_base(proxy, archive) + instance_path(ds), headers={"Accept": "application/dicom"},
                                 trust_env=False, timeout=30)
            assert response.status_code == 200 and response.headers["content-type"].startswith("application/dicom")
            assert response.content == part10, archive
            at_least = len(part10) - RELAY_WINDOW
            assert _relayed_since(proxy, archive, before, at_least) >= at_least, archive
    finally:
        single.archive.faults.clear()
    own = httpx.get(single.dicomweb_url + instance_path(ds), headers={"Accept": "application/dicom"},
                    trust_env=False, timeout=30)
    assert own.headers["content-type"] == "application/dicom"  # that archive's own single part, passed on


def test_parts_without_a_length_come_whole_and_are_not_relayed(proxy, sample, slices, faults):
    """An archive whose parts declare no Content-Length (their ends found by the boundary): the
    series comes whole under our framing, nothing is relayed, and the window the connection started with
    (a retrieve nothing caches) does not hold the reads to 8 KB at a time (test_transport checks that)."""
    url = _base(proxy, "sample") + _series_path(slices)
    counted = httpx.get(url, headers={"Accept": SERIES_ACCEPT}, trust_env=False, timeout=60)
    faults.uncounted_parts = True
    before = _relayed(proxy, "sample")
    response = httpx.get(url, headers={"Accept": SERIES_ACCEPT}, trust_env=False, timeout=60)
    assert response.status_code == 200
    assert sorted(_payloads(counted)) == sorted(_payloads(response)) == sorted(to_part10(ds) for ds in slices)
    assert _relayed(proxy, "sample") == before


def test_client_that_goes_away_mid_relay_leaks_nothing(proxy, orthanc, slices):
    url_path = "/upstreams/orthanc/dicomweb" + _series_path(slices)
    httpx.get(proxy.url + url_path, headers={"Accept": SERIES_ACCEPT}, trust_env=False, timeout=60)  # warm
    baseline = _fds(proxy)
    for _ in range(8):
        with socket.socket() as s:
            s.connect(("127.0.0.1", proxy.port))
            s.sendall(f"GET {url_path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {SERIES_ACCEPT}\r\n\r\n".encode())
            got = 0
            while got < 2 * 1024 * 1024:
                data = s.recv(256 * 1024)
                assert data, "the proxy closed first"
                got += len(data)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    _settled(proxy, orthanc.port, baseline)
    again = httpx.get(proxy.url + url_path, headers={"Accept": SERIES_ACCEPT}, trust_env=False, timeout=60)
    direct = httpx.get(orthanc.dicomweb_url + _series_path(slices), headers={"Accept": SERIES_ACCEPT},
                       trust_env=False, timeout=60)
    assert again.status_code == 200 and sorted(_payloads(again)) == sorted(_payloads(direct))
    assert len(_payloads(again)) == SLICES


def test_archive_reset_inside_a_relayed_part_cuts_the_response(proxy, sample, slices, faults):
    """The archive drops the connection in the middle of a spliced part: the client's body is cut
    (never complete-looking), the failure is logged and counted, and the next request is whole."""
    url = _base(proxy, "sample") + _series_path(slices)
    ok = httpx.get(url, headers={"Accept": SERIES_ACCEPT}, trust_env=False, timeout=60)
    size = int(ok.headers.get("content-length") or len(ok.content))
    assert _relayed_since(proxy, "sample", 0, 1) > 0, "the sample archive's parts were not relayed"
    baseline = _fds(proxy)
    resets = _metric(proxy, "dicomweb_edge_upstream_errors_total", "sample", "reset")
    faults.reset_after_bytes = size // 2 + 100_000  # inside a part, past its first read window
    status, cut, got = _read_cut(url, SERIES_ACCEPT)
    assert status == 200 and cut and got < size, (status, cut, got)
    assert _metric(proxy, "dicomweb_edge_upstream_errors_total", "sample", "reset") == resets + 1
    assert "response cut mid-stream" in proxy.log_path.read_text()
    faults.clear()
    _settled(proxy, sample.port, baseline)
    again = httpx.get(url, headers={"Accept": SERIES_ACCEPT}, trust_env=False, timeout=60)
    assert sorted(_payloads(again)) == sorted(_payloads(ok)) == sorted(to_part10(ds) for ds in slices)


def test_archive_stall_inside_a_relayed_part_is_cut_after_idle_read(proxy, sample, slices, faults):
    """The archive goes quiet mid-part: the splice waits `idle_read`, no longer, and the response is cut."""
    url = _base(proxy, "sample") + _series_path(slices)
    stalls = _metric(proxy, "dicomweb_edge_upstream_errors_total", "sample", "idle_timeout")
    faults.body_chunk_delay = 0.05  # a slow but live archive: 64 KB every 50 ms
    got, cut, quiet_since = 0, False, None
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        with client.stream("GET", url, headers={"Accept": SERIES_ACCEPT, "Connection": "close"}) as response:
            assert response.status_code == 200
            try:
                for chunk in response.iter_bytes():
                    got += len(chunk)
                    if quiet_since is None and got > 200_000:  # well inside the first part's relay
                        faults.body_chunk_delay = IDLE_READ * 5  # now it goes quiet
                        quiet_since = time.monotonic()
            except httpx.TransportError:
                cut = True
    assert cut and quiet_since is not None
    assert time.monotonic() - quiet_since < IDLE_READ * 4  # cut by the idle-read timeout, not the archive's pace
    assert _metric(proxy, "dicomweb_edge_upstream_errors_total", "sample", "idle_timeout") == stalls + 1


def test_archive_part_longer_than_declared_cuts_the_response(proxy, sample, slices, faults):
    """A part with more bytes than its Content-Length said, found while the server chains relays:
    the response is cut (never complete-looking), as the ordinary path does, not a server error."""
    url = _base(proxy, "sample") + _series_path(slices)
    faults.short_part_length = True
    status, cut, _ = _read_cut(url, SERIES_ACCEPT)
    assert status == 200 and cut
    log = proxy.log_path.read_text()
    assert "longer than its Content-Length" in log and "Exception in ASGI application" not in log


def test_client_that_stops_reading_mid_relay_is_cut_after_send_timeout(proxy, orthanc, slices):
    url_path = "/upstreams/orthanc/dicomweb" + _series_path(slices)
    before = _relayed(proxy, "orthanc")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", proxy.port))
        s.sendall(f"GET {url_path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {SERIES_ACCEPT}\r\n\r\n".encode())
        assert s.recv(1024).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 15  # buffers fill, then send_timeout cuts the response
        while "client read nothing" not in proxy.log_path.read_text():
            assert time.monotonic() < deadline, "a client that stopped reading was never cut"
            time.sleep(0.1)
    assert _relayed_since(proxy, "orthanc", before, 1) > 0  # it was cut inside a relay, not before one
    _settled(proxy, orthanc.port, collections.Counter({"socket": 10**6, "pipe": 10**6}))
