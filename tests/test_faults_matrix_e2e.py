"""Faults are answers (issue 7 point 7): every archive fault × every request kind, through a caching proxy.

One proxy (`--workers 2`, a cache directory, short timeouts) in front of the in-process sample archive
(`proxy.demo.archive`); each case switches one fault on, makes one request, switches it off. For every
case: the answer is a 502/503/504 with a short reason, or a 200 whose body is cut so that the client sees
an error (never a complete-looking wrong body), within a deadline computed from the configured
timeouts; the worker PIDs are the same afterwards (uvicorn's supervisor would have replaced a dead
one); nothing the fault produced is served from the cache afterwards; and the proxy's open fds and its
connections to the archive return to their baseline (polled).

What "within its deadline" means for an endless body: a JSON body (metadata, search) is refused past
`max_json_bytes` (502); a multipart body that never shows its boundary is refused after the preamble
limit (502); frame and instance payloads stream to the client, which decides how long to read.
Already covered elsewhere, not repeated: federation with a faulty archive (test_federation_faults_e2e),
the stall/reset/503 basics without a cache (test_errors_e2e).
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
from procstats import children, connections_to, fd_targets, peak_rss_bytes, tree
from support import ProxyProcess, instance_path, split_multipart

from proxy.demo.archive import CHUNK, ArchiveServer, Faults, SampleArchive
from proxy.demo.synth import Patient, Study, ct_series

CONNECT, FIRST_BYTE, IDLE_READ = 1.0, 1.0, 1.0
MAX_JSON = 1024 * 1024
SLACK = 2.5  # scheduling on a busy 2-core CI machine
DEADLINE = CONNECT + FIRST_BYTE + IDLE_READ + SLACK
SLICES = 40  # per series: series metadata and instance searches are > 64 KB, so a slow body stalls mid-body
STUDY = Study(Patient("DOE^MATRIX", "PID907"), accession="ACC907", description="FAULT MATRIX")
FRAMES_ACCEPT = "multipart/related; type=application/octet-stream"
INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"'
JSON_KINDS, BINARY_KINDS = ("metadata", "qido"), ("frames", "instance")


@dataclass(frozen=True)
class Fault:
    """How to switch a fault on (given the healthy body size) and what answers are right."""

    name: str
    switch: Callable[[Faults, int], None]
    statuses: tuple[int, ...]  # acceptable error statuses before the body starts
    cut_ok: bool  # a 200 whose body is cut (client-side error) is also right
    kinds: tuple[str, ...] = JSON_KINDS + BINARY_KINDS
    deadline: float = DEADLINE


def _set(**values: object) -> Callable[[Faults, int], None]:
    def switch(faults: Faults, size: int) -> None:
        for k, v in values.items():
            setattr(faults, k, v)
    return switch


def _reset_half(faults: Faults, size: int) -> None:
    faults.reset_after_bytes = size // 2


FAULTS = [
    Fault("slow_first_byte", _set(first_byte_delay=FIRST_BYTE * 3), (504,), False,
          deadline=CONNECT + FIRST_BYTE + SLACK),
    Fault("slow_body", _set(body_chunk_delay=IDLE_READ * 3), (504,), True),
    Fault("reset_mid_stream", _reset_half, (502,), True),
    Fault("truncated_multipart", _set(truncate_multipart=True), (502,), True, BINARY_KINDS),
    Fault("wrong_boundary", _set(wrong_boundary=True), (502,), False, BINARY_KINDS),
    Fault("status_500", _set(status=500), (502,), False, JSON_KINDS),  # binary: Orthanc's 500 can mean 406
    Fault("status_502", _set(status=502), (502,), False),
    Fault("status_503", _set(status=503), (503,), False),
    Fault("invalid_json", _set(invalid_json=True), (502,), False, JSON_KINDS),
    Fault("wrong_content_type", _set(content_type="text/html; charset=utf-8"), (502,), False),
    Fault("endless_body", _set(endless_body=True), (502,), False),
    Fault("huge_headers", _set(huge_headers=256 * 1024), (502,), False),
]
CASES = [pytest.param(f, k, id=f"{f.name}-{k}") for f in FAULTS for k in f.kinds]


@pytest.fixture(scope="module")
def series():
    """One series per fault (so that no case sees what another case cached): 40 tiny CT slices each."""
    return {name: list(ct_series(STUDY, SLICES, rows=16, cols=16, series_number=i + 1, seed=i))
            for i, name in enumerate(["warm_up", *(f.name for f in FAULTS)])}


@pytest.fixture(scope="module")
def archive(series):
    sample = SampleArchive("MATRIX")
    for datasets in series.values():
        sample.extend(datasets)
    with ArchiveServer(sample) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(archive, tmp_path_factory):
    work = tmp_path_factory.mktemp("proxy_matrix")
    config = work / "edge.toml"
    config.write_text(
        "[server]\nworkers = 2\n"
        f'[cache]\ndir = "{work / "cache"}"\nmetadata_cache_ttl = 600\nprefetch = false\n'
        f"[limits]\nmax_json_bytes = {MAX_JSON}\n"
        "[federation]\nhealth_interval = 0\n"
        f'[[archives]]\nname = "matrix"\nurl = "{archive.dicomweb_url}"\nbreaker_threshold = 100000\n'
        f"timeouts = {{ connect = {CONNECT}, first_byte = {FIRST_BYTE}, idle_read = {IDLE_READ} }}\n")
    with ProxyProcess({}, work, extra_args=["--config", str(config)]) as p:
        deadline = time.monotonic() + 30
        while len(children(p.pid)) < 2:  # /healthz answers once one worker is up
            assert time.monotonic() < deadline, "the proxy did not start two workers"
            time.sleep(0.05)
        yield p


def _get(proxy: ProxyProcess, path: str, accept: str, **headers: str) -> httpx.Response:
    """One request on its own connection (`Connection: close`: no idle client socket is left behind)."""
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        return client.get(proxy.dicomweb_url + path, headers={"Accept": accept, "Connection": "close", **headers})


def _request(kind: str, datasets: list) -> tuple[str, str]:
    first = datasets[0]
    study, series_uid = first.StudyInstanceUID, first.SeriesInstanceUID
    return {
        "metadata": (f"/studies/{study}/series/{series_uid}/metadata", "application/dicom+json"),
        "qido": (f"/studies/{study}/series/{series_uid}/instances?includefield=all", "application/dicom+json"),
        "frames": (instance_path(datasets[0]) + "/frames/1", FRAMES_ACCEPT),
        "instance": (instance_path(datasets[1]), INSTANCE_ACCEPT),
    }[kind]


def _fds(proxy: ProxyProcess) -> collections.Counter[str]:
    """Open fds of master + workers by kind (socket, pipe, file...), except the cache's own database files:
    diskcache opens them once per thread of a worker's thread pool (bounded, kept for the thread's life)."""
    cache = str(proxy.workdir / "cache")
    return collections.Counter(t.split(":")[0] if ":[" in t else "file" for p in tree(proxy.pid)
                               for t in fd_targets(p) if not t.startswith(cache))


def _resources(proxy: ProxyProcess, port: int) -> tuple[list[int], collections.Counter[str], dict[int, int]]:
    """(worker PIDs, fds of master + workers by kind, connections to the archive per worker)."""
    workers = children(proxy.pid)
    return workers, _fds(proxy), connections_to(workers, port)


@pytest.fixture(scope="module")
def baseline(proxy, archive, series):
    """Warm both workers up (thread pools, cache handles, pooled connections), then measure."""
    import concurrent.futures

    warm = series["warm_up"]  # its instances only: the faults' series stay uncached
    paths = [(f"/studies/{warm[0].StudyInstanceUID}/series/{warm[0].SeriesInstanceUID}/metadata",
              "application/dicom+json"), ("/studies?PatientID=PID907", "application/dicom+json")]
    paths += [(instance_path(ds) + "/frames/1", FRAMES_ACCEPT) for ds in warm[2:22]]
    for path, accept in paths[:2]:
        assert _get(proxy, path, accept).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # both workers, every thread of their pools
        for _ in range(3):
            for r in pool.map(lambda pa: _get(proxy, *pa), paths[2:] * 2):
                assert r.status_code == 200, r.text
    time.sleep(0.5)  # let the cache writes of the warm-up land (the measure below is a floor, not a wait)
    return _resources(proxy, archive.port)


@pytest.fixture
def faults(archive):
    archive.archive.faults.clear()
    yield archive.archive.faults
    archive.archive.faults.clear()


def _healthy(kind: str, response: httpx.Response, datasets: list) -> None:
    """The answer is right for the (fault-free) archive's content."""
    assert response.status_code == 200, response.text
    if kind in JSON_KINDS:
        sops = {r["00080018"]["Value"][0] for r in json.loads(response.content)}
        assert sops == {str(ds.SOPInstanceUID) for ds in datasets}
    elif kind == "frames":
        _, parts = split_multipart(response.content, response.headers["content-type"])
        assert [content for _, content in parts] == [datasets[0].PixelData]
    else:
        _, parts = split_multipart(response.content, response.headers["content-type"])
        assert len(parts) == 1 and datasets[1].PixelData in parts[0][1]


def _outcome(proxy: ProxyProcess, path: str, accept: str) -> tuple[int, bool, bytes]:
    """(status, whether the body was cut, body) for one request, read as a streaming client does."""
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        with client.stream("GET", proxy.dicomweb_url + path,
                           headers={"Accept": accept, "Connection": "close"}) as response:
            try:
                return response.status_code, False, response.read()
            except httpx.TransportError:  # RemoteProtocolError: chunked body ended without its last chunk
                return response.status_code, True, b""


def _poll(what: str, check: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found is True:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not return to the baseline: {found}")
        time.sleep(0.05)


@pytest.mark.parametrize("fault,kind", CASES)
def test_fault_is_answered(proxy, archive, series, baseline, faults, fault, kind):
    workers, fds, conns = baseline
    datasets = series[fault.name]
    path, accept = _request(kind, datasets)
    size = 0
    if fault.name in ("reset_mid_stream", "slow_body"):  # the healthy size, asked of the archive itself
        size = len(httpx.get(archive.dicomweb_url + path, headers={"Accept": accept}, trust_env=False).content)
        assert fault.name != "slow_body" or kind not in JSON_KINDS or size > CHUNK  # the stall is mid-body
    fault.switch(faults, size)
    started = time.monotonic()
    status, cut, body = _outcome(proxy, path, accept)
    elapsed = time.monotonic() - started
    faults.clear()

    if status == 200:
        assert fault.cut_ok and cut, f"{fault.name}/{kind}: a complete-looking 200 ({len(body)} bytes)"
    else:
        assert status in fault.statuses, (status, body[:200])
        problem = json.loads(body)
        assert problem["status"] == status and "'matrix'" in problem["reason"] and len(problem["reason"]) < 200
        assert str(datasets[0].StudyInstanceUID) not in problem["reason"]
    assert elapsed < fault.deadline, f"answered after {elapsed:.1f}s (deadline {fault.deadline:.1f}s)"

    # No worker died: the same two processes serve (a dead one would have been replaced under a new PID).
    assert children(proxy.pid) == workers
    # Nothing the fault produced entered the cache: the next answer comes from the archive, and is right.
    again = _get(proxy, path, accept)
    _healthy(kind, again, datasets)
    cached = again.headers.get("x-cache")
    if fault.name == "truncated_multipart" and kind == "frames":
        # The frame's part arrived whole (Content-Length, every byte) before the missing close delimiter:
        # keeping it is right, and the bytes just compared equal to the archive's.
        assert cached in ("MISS", "HIT")
    else:
        assert cached in (None, "MISS"), f"X-Cache: {cached} after {fault.name}"
    if kind == "instance":  # an instance retrieve teaches its frames to the cache; a broken one must not
        frame = _get(proxy, instance_path(datasets[1]) + "/frames/1", FRAMES_ACCEPT)
        _, parts = split_multipart(frame.content, frame.headers["content-type"])
        assert [c for _, c in parts] == [datasets[1].PixelData]
    # Open fds and connections to the archive return to the baseline: each sequential request needs at most
    # one pooled connection per worker, and anything a fault left half-open is closed.
    def fds_back() -> bool | str:
        now = _fds(proxy)
        return now.total() <= fds.total() or f"{dict(now)}, baseline {dict(fds)}"

    def connections_back() -> bool | str:
        now = _resources(proxy, archive.port)[2]
        return all(n <= max(conns.get(w, 0), 1) for w, n in now.items()) or f"{now}, baseline {conns}"

    _poll("open fds", fds_back)
    _poll("archive connections", connections_back)


def test_endless_frame_is_streamed_not_held(proxy, archive, series, baseline, faults):
    """A frame part that never ends (no Content-Length, no boundary ever) streams to the client, which
    decides when to stop; the proxy does not hold it for the cache beyond a cache entry's largest size
    (64 MiB): the workers' peak RSS grows far less than what passed through, and nothing is cached."""
    workers, fds, conns = baseline
    ds = series["warm_up"][30]  # not asked during the warm-up: a miss
    path = instance_path(ds) + "/frames/1"
    peaks = {w: peak_rss_bytes(w) for w in workers}
    faults.endless_part = True
    read = 0
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        with client.stream("GET", proxy.dicomweb_url + path,
                           headers={"Accept": FRAMES_ACCEPT, "Connection": "close"}) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                read += len(chunk)
                if read > 160 * 2**20:
                    break
    faults.clear()
    grown = max(peak_rss_bytes(w) - peaks[w] for w in workers)
    assert grown < 100 * 2**20, f"a worker's peak RSS grew by {grown / 2**20:.0f} MiB while 160 MiB passed"
    assert children(proxy.pid) == workers
    again = _get(proxy, path, FRAMES_ACCEPT)
    assert again.headers.get("x-cache") == "MISS"
    _, parts = split_multipart(again.content, again.headers["content-type"])
    assert [c for _, c in parts] == [ds.PixelData]
    _poll("archive connections", lambda: all(n <= max(conns.get(w, 0), 1) for w, n in
                                             connections_to(workers, archive.port).items()))


def test_no_unhandled_exception_in_the_log(proxy):
    """Runs after the matrix: no fault reached uvicorn as an unhandled exception (a 500 or a dropped
    connection with a traceback in the log)."""
    log = proxy.log_path.read_text(errors="replace")
    assert "Exception in ASGI application" not in log
    assert "Traceback" not in log
