"""A federated retrieve whose study only a down archive holds is a failure, never "not found" (issue 22).

Two real Orthanc archives; the study is on the second. While that archive is stopped, or its breaker is
open, nobody can say the study is absent: metadata, frames and the series retrieve answer 502/503/504
with a Warning naming the archive, stale metadata where the cache has it, and never 404. The moment the
archive is back the study is served, open breaker or not. 404 is for a study every archive answered it
does not hold.
"""

from __future__ import annotations

import time

import httpx
import pytest
from support import ProxyProcess, first_payload, native_frame, orthanc_file, orthanc_holding

from proxy.demo.synth import Patient, Study, multiframe_native

FRAMES = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
SERIES = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


@pytest.fixture(scope="module")
def held():
    return multiframe_native(Study(Patient("OUTAGE^HELD", "PIDOUT")), n_frames=2, rows=32, cols=32, seed=31)


@pytest.fixture(scope="module")
def elsewhere():
    return multiframe_native(Study(Patient("OUTAGE^OTHER", "PIDOTH")), n_frames=1, rows=16, cols=16, seed=32)


@pytest.fixture(scope="module")
def first(tmp_path_factory, elsewhere):
    yield from orthanc_holding(tmp_path_factory, "OUTAGE_A", [elsewhere])


@pytest.fixture(scope="module")
def second(tmp_path_factory, held):
    yield from orthanc_holding(tmp_path_factory, "OUTAGE_B", [held])


def urls(base, ds):
    series = f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    return {"metadata": (f"{base}/studies/{ds.StudyInstanceUID}/metadata", {}),
            "frames": (f"{series}/instances/{ds.SOPInstanceUID}/frames/2", FRAMES),
            "series": (series, SERIES)}


def test_a_study_held_only_by_a_down_archive_is_unavailable_not_missing(first, second, held, tmp_path):
    (tmp_path / "edge.toml").write_text(
        '[cache]\ndir = "cache"\nprefetch = false\n'
        f'[[archives]]\nname = "a"\nurl = "{first.dicomweb_url}"\n'
        f'[[archives]]\nname = "b"\nurl = "{second.dicomweb_url}"\nbreaker_threshold = 2\nbreaker_cooldown = 600\n')
    with ProxyProcess({}, tmp_path, ["--config", str(tmp_path / "edge.toml")]) as proxy, \
            httpx.Client(timeout=60, trust_env=False) as client:
        second.stop()
        try:
            for _ in range(2):  # the second round with b's breaker open (2 failures, 10 minutes' cool-down)
                for kind, (url, headers) in urls(proxy.dicomweb_url, held).items():
                    r = client.get(url, headers=headers)
                    assert r.status_code in (502, 503, 504), (kind, r.status_code, r.text[:200])
                    assert "archive 'b'" in r.headers.get("warning", ""), (kind, r.headers)
        finally:
            second.start()
        # Back: served at once, although b's breaker is still open for its cool-down.
        expected = {"metadata": lambda r: [m["00080018"]["Value"][0] for m in r.json()] == [held.SOPInstanceUID],
                    "frames": lambda r: first_payload(r) == native_frame(held, 2),
                    "series": lambda r: first_payload(r) == orthanc_file(second, held.SOPInstanceUID)}
        for kind, (url, headers) in urls(proxy.dicomweb_url, held).items():
            r = client.get(url, headers=headers)
            assert r.status_code == 200, (kind, r.status_code, r.text[:200])
            assert expected[kind](r), kind  # the held study itself, not just a 200
        r = client.get(f"{proxy.dicomweb_url}/studies/1.2.3.999.31/metadata")  # nobody holds it, all answered
        assert r.status_code == 404


def test_stale_metadata_stands_in_while_the_only_holder_is_down(first, second, held, tmp_path):
    """Even for a proxy that never learned where the study lives (restarted while the archive is down):
    the last good document, marked stale, instead of a 404."""
    (tmp_path / "edge.toml").write_text(
        '[cache]\ndir = "cache"\nprefetch = false\nmetadata_cache_ttl = 0.5\n'
        f'[[archives]]\nname = "a"\nurl = "{first.dicomweb_url}"\n'
        f'[[archives]]\nname = "b"\nurl = "{second.dicomweb_url}"\n')
    args = ["--config", str(tmp_path / "edge.toml")]
    with ProxyProcess({}, tmp_path, args) as proxy, httpx.Client(timeout=60, trust_env=False) as client:
        url = urls(proxy.dicomweb_url, held)["metadata"][0]
        fresh = client.get(url)
        assert fresh.status_code == 200 and fresh.headers["x-cache"] == "MISS"
        assert [m["00080018"]["Value"][0] for m in fresh.json()] == [held.SOPInstanceUID]
        port = proxy.port  # (the same address again: metadata documents are kept per base URL)
    second.stop()
    try:
        time.sleep(0.6)  # past metadata_cache_ttl: the document is stale now
        with ProxyProcess({}, tmp_path, args, port=port) as proxy, \
                httpx.Client(timeout=60, trust_env=False) as client:
            r = client.get(urls(proxy.dicomweb_url, held)["metadata"][0])
            assert (r.status_code, r.headers.get("x-cache")) == (200, "STALE") and r.content == fresh.content
    finally:
        second.start()
