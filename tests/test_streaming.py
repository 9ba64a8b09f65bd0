"""Streaming both ways with bounded memory (issue 2, point 4; design invariant 1).

A 600-slice CT series (about 315 MB) is stored through the proxy and retrieved through it; the
proxy's peak RSS must grow by less than 15 MB (what the README promises), whatever the study size
"""

import hashlib

import httpx
import pytest
from support import ProxyProcess, missing

from proxy.demo.orthanc import OrthancServer, find_orthanc
from proxy.demo.synth import Patient, Study, ct_series, to_part10
from proxy.formats.multipart import MultipartReader, PartEnd, PartHeaders

SLICES = 600
MB = 1024 * 1024


@pytest.fixture(scope="module")
def big_archive(tmp_path_factory):
    if find_orthanc() is None:
        missing("Orthanc with the DICOMweb plugin is not installed")
    with OrthancServer(tmp_path_factory.mktemp("big"), "BIG") as server:
        yield server


@pytest.fixture(scope="module")
def proxy(big_archive, tmp_path_factory):
    with ProxyProcess({"big": big_archive.dicomweb_url}, tmp_path_factory.mktemp("proxy_big")) as p:
        yield p


def _stow_body(study: Study, boundary: str, sent: set[str]):
    """The STOW body, generated as it is sent; `sent` collects each instance's SHA-256."""
    for ds in ct_series(study, SLICES, seed=7):
        blob = to_part10(ds)
        sent.add(hashlib.sha256(blob).hexdigest())
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + blob + b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def test_large_series_streams_both_ways_with_bounded_memory(proxy, big_archive):
    study = Study(Patient("BIG^SERIES", "PIDBIG"), description="BIG")
    with httpx.Client(timeout=120, trust_env=False) as client:
        client.get(f"{proxy.dicomweb_url}/studies")  # warm the worker up before the baseline
        baseline = proxy.rss_bytes()

        # STOW: the request body is streamed to the archive (chunked, no Content-Length).
        boundary = "stowBoundary0123456789"
        sent: set[str] = set()
        r = client.post(f"{proxy.dicomweb_url}/studies", content=_stow_body(study, boundary, sent),
                        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                                 "Accept": "application/dicom+json"})
        assert r.status_code == 200, r.text[:300]
        stored = r.json()["00081199"]["Value"]
        assert len(stored) == SLICES
        assert big_archive.count_instances() == SLICES
        after_stow = proxy.peak_rss_bytes()

        # Retrieve: the series is streamed back, re-framed part by part.
        series = stored[0]["00081190"]["Value"][0].rsplit("/instances/", 1)[0]
        assert series.startswith(proxy.dicomweb_url)
        received: list[str] = []
        total = 0
        with client.stream("GET", series, headers={
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}) as resp:
            assert resp.status_code == 200
            reader = MultipartReader(resp.headers["content-type"].rsplit("boundary=", 1)[1])
            digest = hashlib.sha256()
            for chunk in resp.iter_raw(1 << 20):
                total += len(chunk)
                for event in reader.feed(chunk):  # each part hashed as it streams past (nothing kept)
                    if isinstance(event, PartHeaders):
                        digest = hashlib.sha256()
                    elif isinstance(event, PartEnd):
                        received.append(digest.hexdigest())
                    else:
                        digest.update(event)
        reader.close()
        peak = proxy.peak_rss_bytes()

    # Every instance comes back byte for byte as it was stored (the archive keeps Part 10 files as sent).
    assert len(received) == SLICES and set(received) == sent
    growth = peak - baseline
    print(f"baseline RSS {baseline / MB:.1f} MB, after STOW peak {after_stow / MB:.1f} MB, "
          f"after retrieve peak {peak / MB:.1f} MB, streamed {total / MB:.0f} MB each way")
    assert growth < 15 * MB, f"proxy RSS grew by {growth / MB:.0f} MB while streaming {total / MB:.0f} MB"
