"""No byte of a cached answer is served unverified after the file under it may have changed (issue 22).

A real Orthanc, a proxy whose worker reads a frame from the disk tier (a restart, so that the frame comes
from disk and not from the request that fetched it), then the entry's file is damaged under the running
worker: bytes flipped, then the file cut. What was checked is what is served: the worker's own copy. A
worker meeting the damaged
file reads it, refuses it, evicts it, counts it `corrupt`, and answers from the archive.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ProxyProcess, first_payload, instance_path, native_frame, orthanc_holding

from proxy.demo.synth import Patient, Study, multiframe_native

FRAMES = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}


@pytest.fixture(scope="module")
def ds():  # 128 KB frames: each a file of its own in the disk tier
    return multiframe_native(Study(Patient("DAMAGE^DISK", "PIDDMG")), n_frames=2, rows=256, cols=256, seed=41)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, ds):
    yield from orthanc_holding(tmp_path_factory, "DAMAGE", [ds])


def frame_url(base, ds, n):
    return f"{base}{instance_path(ds)}/frames/{n}"






def corrupt_count(proxy):
    text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "dicomweb_edge_cache_lookups_total" and s.labels.get("result") == "corrupt")


def value_files(cache_dir: Path, at_least: int) -> list[Path]:
    deadline = time.monotonic() + 20
    while len(files := [p for p in cache_dir.glob("*/*.val") if p.stat().st_size > 100_000]) < at_least:
        assert time.monotonic() < deadline, "the frame did not reach the disk tier"
        time.sleep(0.05)
    return files


def test_a_damaged_file_is_never_served(orthanc, ds, tmp_path):
    (tmp_path / "edge.toml").write_text(
        '[cache]\ndir = "cache"\nprefetch = false\n'
        f'[[archives]]\nname = "pacs"\nurl = "{orthanc.dicomweb_url}"\n')
    args = ["--config", str(tmp_path / "edge.toml")]
    url = lambda proxy: frame_url(proxy.dicomweb_url, ds, 1)  # noqa: E731
    with ProxyProcess({}, tmp_path, args) as proxy, httpx.Client(timeout=30, trust_env=False) as client:
        assert client.get(url(proxy), headers=FRAMES).headers["x-cache"] == "MISS"
        (entry,) = value_files(tmp_path / "cache", 1)
        port = proxy.port

    with ProxyProcess({}, tmp_path, args, port=port) as proxy, httpx.Client(timeout=30, trust_env=False) as client:
        r = client.get(url(proxy), headers=FRAMES)
        assert (r.headers["x-cache"], first_payload(r)) == ("HIT", native_frame(ds, 1))  # read from disk, checked
        with open(entry, "r+b") as f:  # bytes flipped under the running worker
            f.seek(-64, 2)
            f.write(b"\xa5" * 64)
        served = [client.get(url(proxy), headers=FRAMES) for _ in range(3)]
        assert all(r.status_code == 200 and first_payload(r) == native_frame(ds, 1) for r in served)
        assert [r.headers["x-cache"] for r in served] == ["HIT"] * 3  # the worker's own checked copy
        entry.write_bytes(entry.read_bytes()[:1000])  # the file cut under the running worker
        served = [client.get(url(proxy), headers=FRAMES) for _ in range(3)]
        assert all(r.status_code == 200 and first_payload(r) == native_frame(ds, 1) for r in served)
        assert corrupt_count(proxy) == 0

    with ProxyProcess({}, tmp_path, args, port=port) as proxy, httpx.Client(timeout=30, trust_env=False) as client:
        r = client.get(url(proxy), headers=FRAMES)  # a worker meeting the damaged file
        assert (r.status_code, r.headers["x-cache"], first_payload(r)) == (200, "MISS", native_frame(ds, 1))
        assert corrupt_count(proxy) == 1 and not entry.exists()
        r = client.get(url(proxy), headers=FRAMES)
        assert (r.headers["x-cache"], first_payload(r)) == ("HIT", native_frame(ds, 1))
