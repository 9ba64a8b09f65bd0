"""Operations endpoints and the composed /bulkdata and /pixeldata resources, against real Orthanc."""

import os
import signal
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ProxyProcess, free_port

from proxy.formats.multipart import MultipartReader, PartEnd, PartHeaders


def _parts(resp):
    reader = MultipartReader(resp.headers["content-type"].rsplit("boundary=", 1)[1])
    parts, cur = [], None
    for ev in reader.feed(resp.content):
        if isinstance(ev, PartHeaders):
            cur = [ev.headers, b""]
        elif isinstance(ev, PartEnd):
            parts.append(tuple(cur))
        else:
            cur[1] += bytes(ev)
    reader.close()
    return parts


def test_healthz_readyz_metrics(proxy_a):
    with httpx.Client(trust_env=False) as c:
        assert c.get(f"{proxy_a.url}/healthz").status_code == 200
        r = c.get(f"{proxy_a.url}/readyz")
        assert r.status_code == 200 and r.json()["archives"] == {"a": {"up": True, "breaker": "closed"}}
        c.get(f"{proxy_a.dicomweb_url}/studies")
        c.get(f"{proxy_a.dicomweb_url}/studies/1.2.3.4/metadata")
        text = c.get(f"{proxy_a.url}/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("dicomweb_edge_requests_total", (("service", "qido"), ("status", "200")))] >= 1
    assert samples[("dicomweb_edge_requests_total", (("service", "metadata"), ("status", "404")))] >= 1
    assert any(n == "dicomweb_edge_upstream_requests_total" and dict(lbl).get("archive") == "a"
               for n, lbl in samples)
    assert "1.2.3.4" not in text  # no UIDs in labels


def _ready_once(proxy, check):
    """`/readyz` once the health loop has probed every archive (bounded): (status, body)."""
    deadline = time.monotonic() + 15
    while True:
        r = httpx.get(f"{proxy.url}/readyz", trust_env=False)
        if check(r.json()) or time.monotonic() > deadline:
            return r.status_code, r.json()
        time.sleep(0.05)


def test_readyz_is_503_only_when_nothing_can_be_served(tmp_path):
    """No cache and no archive answering: nothing to serve, 503 (the archive found down by the health loop;
    `/readyz` itself asks no archive)."""
    with ProxyProcess({"gone": f"http://127.0.0.1:{free_port()}/dicom-web"}, tmp_path,
                      env={"DICOMWEB_EDGE_HEALTH_INTERVAL": "0.2"}) as proxy:
        status, body = _ready_once(proxy, lambda b: b["archives"]["gone"]["up"] is False)
    assert status == 503 and body["archives"]["gone"]["up"] is False


def test_an_archive_outage_leaves_the_edge_ready_and_serving_its_cache(tmp_path_factory, tmp_path):
    """Every archive down: `/readyz` stays 200 (a readiness probe keeps the replica in the Service) with
    each archive marked down, and the frames in the cache are still served; `/readyz` sends no request
    to an archive (its answers come from the health loop: none counted while it is polled)."""
    from support import orthanc_holding, split_multipart

    from proxy.demo.synth import Patient, Study, multiframe_native

    ds = multiframe_native(Study(Patient("READY^EDGE", "PIDRE")), n_frames=2, rows=32, cols=32, seed=71)
    holding = orthanc_holding(tmp_path_factory, "READY", [ds])  # (kept: closing it stops Orthanc)
    orthanc = next(holding)
    accept = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
    frame = (f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
             "/frames/1")
    try:
        with ProxyProcess({"pacs": orthanc.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")],
                          env={"DICOMWEB_EDGE_HEALTH_INTERVAL": "0.2"}) as proxy:
            assert httpx.get(proxy.dicomweb_url + frame, headers=accept, trust_env=False).status_code == 200
            status, body = _ready_once(proxy, lambda b: b["archives"]["pacs"]["up"] is True)
            assert status == 200 and body["archives"]["pacs"] == {"up": True, "breaker": "closed"}
            probes = _probes(proxy)
            for _ in range(5):
                httpx.get(f"{proxy.url}/readyz", trust_env=False)
            assert _probes(proxy) - probes <= 2  # the health loop's own (every 0.2 s), not five more
            orthanc.stop()
            status, body = _ready_once(proxy, lambda b: b["archives"]["pacs"]["up"] is False)
            assert status == 200 and body["archives"]["pacs"]["up"] is False and body["cache"] == "on"
            r = httpx.get(proxy.dicomweb_url + frame, headers=accept, trust_env=False)
            assert r.status_code == 200 and r.headers["x-cache"] == "HIT"
            (_, payload), = split_multipart(r.content, r.headers["content-type"])[1]
            assert payload == ds.PixelData[: 32 * 32 * 2]
    finally:
        holding.close()


def _probes(proxy):
    text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "dicomweb_edge_upstream_requests_total" and s.labels.get("service") == "probe")


def test_series_pixeldata_is_every_slice(proxy_a, demo_data):
    """Annex H pixeldata, composed: one part per instance, each Content-Location at the proxy."""
    ct = [ds for ds in demo_data.archive_a if ds.StudyInstanceUID == demo_data.uids["ct_study"]]
    url = f"{proxy_a.dicomweb_url}/studies/{ct[0].StudyInstanceUID}/series/{ct[0].SeriesInstanceUID}/pixeldata"
    r = httpx.get(url, trust_env=False, timeout=30)
    assert r.status_code == 200
    parts = _parts(r)
    assert sorted(p[1] for p in parts) == sorted(ds.PixelData for ds in ct)
    assert all(h["content-location"].startswith(proxy_a.dicomweb_url) and
               h["content-location"].endswith("/pixeldata") for h, _ in parts)


def test_compressed_pixeldata_is_its_frames(proxy_a, demo_data):
    slide = next(ds for ds in demo_data.archive_a if ds.StudyInstanceUID == demo_data.uids["slide_study"])
    from pydicom.encaps import generate_frames

    frames = list(generate_frames(slide.PixelData, number_of_frames=slide.NumberOfFrames))
    r = httpx.get(f"{proxy_a.dicomweb_url}/studies/{slide.StudyInstanceUID}/pixeldata", trust_env=False)
    parts = _parts(r)
    assert [p[1] for p in parts] == frames
    assert parts[0][0]["content-type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
    assert parts[1][0]["content-location"].endswith("/frames/2")


def test_instance_bulkdata_matches_metadata_uris(proxy_a, demo_data):
    ds = demo_data.archive_a[0]
    base = (f"{proxy_a.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")
    md = httpx.get(base + "/metadata", trust_env=False).json()[0]
    r = httpx.get(base + "/bulkdata", trust_env=False)
    parts = _parts(r)
    assert [h["content-location"] for h, _ in parts] == [md["7FE00010"]["BulkDataURI"]]
    assert parts[0][1] == ds.PixelData


@pytest.mark.parametrize("accept", ["application/dicom", 'multipart/related; type="application/dicom"'])
def test_bulkdata_resource_rejects_non_bulk_types(proxy_a, demo_data, accept):
    ds = demo_data.archive_a[0]
    r = httpx.get(f"{proxy_a.dicomweb_url}/studies/{ds.StudyInstanceUID}/bulkdata", headers={"Accept": accept},
                  trust_env=False)
    assert r.status_code == 406


def test_two_workers_serve_and_metrics_count_both(orthanc_a, tmp_path):
    """--workers 2: both processes answer, and /metrics (multiprocess mode) adds up every worker."""
    with ProxyProcess({"a": orthanc_a.dicomweb_url}, tmp_path, extra_args=["--workers", "2"]) as proxy:
        with httpx.Client(trust_env=False) as c:
            for _ in range(40):  # new connections, so the kernel spreads them over both workers
                r = c.get(f"{proxy.dicomweb_url}/studies?limit=1", headers={"Connection": "close"})
                assert r.status_code == 200
            # Each worker writes its added-up counts every metrics.FLUSH_INTERVAL (50 ms): a scrape right
            # after the burst may see the other worker's last requests one interval later, never lose them.
            deadline = time.monotonic() + 5
            while True:
                text = c.get(f"{proxy.url}/metrics").text
                total = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                            if s.name == "dicomweb_edge_requests_total"
                            and s.labels == {"service": "qido", "status": "200"})
                if total >= 40 or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
    assert total >= 40


def _workers(proxy):
    """The supervisor's worker processes (multiprocessing's spawned children; not its resource tracker)."""
    with open(f"/proc/{proxy.pid}/task/{proxy.pid}/children") as listing:
        children = [int(pid) for pid in listing.read().split()]
    workers = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                workers += [pid] if b"spawn_main" in cmdline.read() else []
        except FileNotFoundError:
            continue  # ended meanwhile
    return sorted(workers)


def _scrape(client, proxy):
    families = {f.name: f for f in text_string_to_metric_families(client.get(f"{proxy.url}/metrics").text)}
    up = [s.value for s in families["dicomweb_edge_archive_up"].samples if s.labels["archive"] == "a"] \
        if "dicomweb_edge_archive_up" in families else []
    pids = sorted(int(s.labels["pid"]) for s in families["process_resident_memory_bytes"].samples)
    return up, pids


def _until(condition, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not (got := condition()):
        assert time.monotonic() < deadline, f"not seen in {timeout} s: {what}"
        time.sleep(0.05)
    return got


def test_a_dead_workers_values_leave_metrics(tmp_path):
    """Two workers; one is killed (the supervisor starts another), then the archive goes down. /metrics must
    say so: the dead worker's last "archive up" must not outvote the live workers (it did with the gauge in
    `max` mode and no worker marked dead), and `process_*` are the live workers', each under its pid."""
    from proxy.demo.orthanc import OrthancServer

    archive = OrthancServer(tmp_path / "orthanc", "WORKERS").start()
    try:
        with ProxyProcess({"a": archive.dicomweb_url}, tmp_path / "proxy", extra_args=["--workers", "2"],
                          env={"DICOMWEB_EDGE_HEALTH_INTERVAL": "0.2"}) as proxy, \
                httpx.Client(trust_env=False, timeout=10) as c:
            first = _until(lambda: len(w := _workers(proxy)) == 2 and w, "two workers")
            _until(lambda: _scrape(c, proxy) == ([1.0], first), "archive up, process metrics of both workers")
            os.kill(first[0], signal.SIGKILL)
            now = _until(lambda: len(w := _workers(proxy)) == 2 and first[0] not in w and w, "a new worker")
            _until(lambda: _scrape(c, proxy)[1] == now, "process metrics of the live workers only")
            archive.stop()
            _until(lambda: _scrape(c, proxy)[0] == [0.0], "archive_up 0 once the live workers see the outage")
    finally:
        archive.stop()


def _probes_sent(client, proxy):
    text = client.get(f"{proxy.url}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "dicomweb_edge_upstream_requests_total" and s.labels.get("service") == "probe")


def test_two_workers_probe_each_archive_once_per_interval(orthanc_a, tmp_path):
    """One worker probes for both: 20 probes at a 0.1 s interval span at least 19 intervals (two probing
    workers send them in half the time); both workers report what the probes found."""
    interval = 0.1
    with ProxyProcess({"a": orthanc_a.dicomweb_url}, tmp_path, extra_args=["--workers", "2"],
                      env={"DICOMWEB_EDGE_HEALTH_INTERVAL": str(interval)}) as proxy, \
            httpx.Client(trust_env=False, timeout=10) as c:
        start = _until(lambda: _probes_sent(c, proxy), "a first probe")
        began = time.monotonic()
        _until(lambda: _probes_sent(c, proxy) >= start + 20, "20 more probes")
        assert time.monotonic() - began >= 0.9 * 19 * interval
        answers = [c.get(f"{proxy.url}/readyz", headers={"Connection": "close"}) for _ in range(20)]
    assert {r.status_code for r in answers} == {200}
    assert all(r.json()["archives"]["a"]["up"] is True for r in answers), [r.text for r in answers]
