"""The soak benchmark's logic, CI-sized (benchmarks/soak.py; the 60 s run with 500 clients is not a test).

A few seconds of the viewer mix with wrk through a two-worker caching proxy in front of the sample
archive: statuses counted, RSS/fds sampled, and 5xx attributed to the archive when the proxy counted an
archive failure behind them, to the proxy otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support import ProxyProcess, require_binary

from proxy.demo.archive import ArchiveServer, SampleArchive
from proxy.demo.synth import Patient, Study, ct_series

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from soak import soak, viewer_mix  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_binary("wrk")
    slices = list(ct_series(Study(Patient("BENCH^SOAK", "PID909")), 6, rows=32, cols=32))
    archive = SampleArchive("SOAK")
    archive.extend(slices)
    with ArchiveServer(archive) as server:
        work = tmp_path_factory.mktemp("proxy_soak")
        extra = ["--workers", "2", "--cache-dir", str(work / "cache")]
        with ProxyProcess({"soak": server.dicomweb_url}, work, extra_args=extra,
                          env={"PROMETHEUS_MULTIPROC_DIR": str(work)}) as proxy:
            ds = slices[0]
            yield proxy, server, viewer_mix(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                            [str(s.SOPInstanceUID) for s in slices])


def test_soak_counts_statuses_and_samples(setup):
    proxy, _, mix = setup
    r = soak(proxy.url, proxy.pid, mix, connections=16, duration=2, log=proxy.log_path)
    assert r["requests"] > 0 and sum(r["statuses"].values()) == r["requests"]
    assert set(r["statuses"]) <= {200, 204}, r["statuses"]
    assert r["fivexx"] == r["proxy_caused_5xx"] == 0 and r["unhandled_exceptions"] == 0
    assert {"frames", "metadata", "qido"} <= set(r["by_service"])
    assert r["samples"] and all(rss > 0 and fds > 0 for _, rss, fds in r["samples"])


def test_archive_failures_are_not_blamed_on_the_proxy(setup):
    proxy, server, _ = setup
    server.archive.faults.status = 503
    try:
        # Searches nobody made before (what was answered is cached, or served stale: that would hide the 503s).
        fresh = [(1, "/dicomweb/studies?PatientID=PID909&limit=3", "application/dicom+json"),
                 (1, "/dicomweb/series?Modality=CT&limit=3", "application/dicom+json")]
        r = soak(proxy.url, proxy.pid, fresh, connections=8, duration=1)
    finally:
        server.archive.faults.clear()
    assert r["statuses"].get(503, 0) > 0 and r["upstream_errors"].get("http_5xx", 0) > 0
    assert r["archive_caused_5xx"] == r["fivexx"] and r["proxy_caused_5xx"] == 0
