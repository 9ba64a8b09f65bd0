"""Stale if error (issue 7 point 8): while an archive is down or failing, what the cache holds is still served.

Metadata past its TTL is kept for `stale_if_error` seconds and served with `Warning: 110 - "Response is
Stale"` and `X-Cache: STALE` (RFC 7234 §5.5.1, RFC 5861) when the archive answers 502/503/504, times out
or refuses connections. Frames never go stale (a SOP Instance's pixels do not change): a cached frame is
served as a plain hit, archive or not; a frame the cache lacks fails with the archive's error (a frames
request is answered whole or not at all). Real-ish: the sample archive is really stopped.
"""

from __future__ import annotations

import time

import httpx
import pytest
from support import ProxyProcess, instance_path, sample_holding, split_multipart

from proxy.demo.synth import Patient, Study, ct_series

TTL = 1.0
STUDY = Study(Patient("DOE^STALE", "PID908"), accession="ACC908", description="STALE")
FRAMES = "multipart/related; type=application/octet-stream"
STALE_WARNING = '110 - "Response is Stale"'


@pytest.fixture(scope="module")
def slices():
    return list(ct_series(STUDY, 3, rows=16, cols=16))


@pytest.fixture(scope="module")
def archive(slices):
    yield from sample_holding("STALE", slices)


@pytest.fixture(scope="module")
def proxy(archive, tmp_path_factory):
    work = tmp_path_factory.mktemp("proxy_stale")
    config = work / "edge.toml"
    config.write_text(
        f'[cache]\ndir = "{work / "cache"}"\nmetadata_cache_ttl = {TTL}\nstale_if_error = 3600\nprefetch = false\n'
        "[federation]\nhealth_interval = 0\n"
        f'[[archives]]\nname = "stale"\nurl = "{archive.dicomweb_url}"\nbreaker_threshold = 100000\n'
        "timeouts = { connect = 1, first_byte = 1, idle_read = 1 }\n")
    with ProxyProcess({}, work, extra_args=["--config", str(config)]) as p:
        yield p


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30.0, trust_env=False) as c:
        yield c


def _until_stale(client, url):
    """Ask until the cached copy is past its TTL: every answer before is a fresh hit, the first after is
    stale (polled: the TTL is a second)."""
    deadline = time.monotonic() + 10 * TTL + 5
    while True:
        r = client.get(url, headers={"Accept": "application/dicom+json"})
        assert r.status_code == 200, r.text
        if r.headers.get("x-cache") == "STALE":
            return r
        assert r.headers.get("x-cache") == "HIT" and "warning" not in r.headers
        assert time.monotonic() < deadline, "the metadata never went stale"
        time.sleep(0.05)


def test_stale_metadata_and_cached_frames_while_the_archive_fails(client, proxy, archive, slices):
    ds = slices[0]
    url = f"{proxy.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata"
    frame_url = f"{proxy.dicomweb_url}{instance_path(ds)}/frames/1"
    warm = client.get(url, headers={"Accept": "application/dicom+json"})
    assert warm.status_code == 200 and warm.headers["x-cache"] == "MISS"
    frame = client.get(frame_url, headers={"Accept": FRAMES})
    assert frame.status_code == 200 and frame.headers["x-cache"] == "MISS"

    # 1. The archive answers 503: past its TTL the metadata is served stale, marked so.
    archive.archive.faults.status = 503
    try:
        stale = _until_stale(client, url)
        assert stale.content == warm.content
        assert stale.headers["warning"] == STALE_WARNING
        assert stale.headers["content-type"].startswith("application/dicom+json")
        # Metadata the proxy never had cannot be made up: the archive's error comes through.
        other = f"{proxy.dicomweb_url}{instance_path(slices[1])}/metadata"
        assert client.get(other, headers={"Accept": "application/dicom+json"}).status_code == 503
    finally:
        archive.archive.faults.clear()

    # 1b. The archive answers 502 or 504 itself, or not within first_byte (the proxy's own 504): the same.
    for fault in ({"status": 502}, {"status": 504}, {"first_byte_delay": 1.5}):
        for name, value in fault.items():
            setattr(archive.archive.faults, name, value)
        try:
            r = client.get(url, headers={"Accept": "application/dicom+json"})
            assert (r.status_code, r.headers.get("x-cache")) == (200, "STALE"), (fault, r.status_code, r.text)
            assert r.content == warm.content and r.headers["warning"] == STALE_WARNING
        finally:
            archive.archive.faults.clear()

    # 2. The archive is down (connection refused): the same, and the cached frame is a plain hit.
    archive.stop()
    try:
        stale = client.get(url, headers={"Accept": "application/dicom+json"})
        assert stale.status_code == 200 and stale.headers["x-cache"] == "STALE", stale.text
        assert stale.content == warm.content and stale.headers["warning"] == STALE_WARNING
        for _ in range(3):
            hit = client.get(frame_url, headers={"Accept": FRAMES})
            assert hit.status_code == 200 and hit.headers["x-cache"] == "HIT" and "warning" not in hit.headers
            _, parts = split_multipart(hit.content, hit.headers["content-type"])
            assert [c for _, c in parts] == [ds.PixelData]
        # A frame the cache lacks needs the archive: its error, naming it, no partial answer.
        missing = client.get(f"{proxy.dicomweb_url}{instance_path(slices[2])}/frames/1", headers={"Accept": FRAMES})
        assert missing.status_code == 502 and "'stale'" in missing.json()["reason"]
        # A client that insists on a fresh answer (Cache-Control: no-cache) gets the error, not the stale copy.
        fresh = client.get(url, headers={"Accept": "application/dicom+json", "Cache-Control": "no-cache"})
        assert fresh.status_code == 502
    finally:
        archive.start()

    # 3. The archive is back: a fresh answer again, no warning, cached anew.
    back = client.get(url, headers={"Accept": "application/dicom+json"})
    assert back.status_code == 200 and back.headers["x-cache"] == "MISS" and "warning" not in back.headers
    assert back.content == warm.content
