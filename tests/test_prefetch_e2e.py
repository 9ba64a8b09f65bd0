"""The series prefetch (issue 4 point 6) when the archive breaks off or stalls inside a part.

A prefetch receives each counted part straight into one buffer (transport.Response.read_into). These
faults a real archive cannot make on demand, so the sample archive makes them: whatever the prefetch
had received whole is cached, the instance it was inside is not (a truncated entry is never served),
the failure is counted, and the frames it did not get are fetched on request, with the right bytes.
The happy path against real Orthanc is in test_cache_e2e.py.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
from support import ProxyProcess, sample_holding, split_multipart

from proxy.demo.synth import Patient, Study, ct_series, to_part10

STUDY = Study(Patient("DOE^PREFETCH", "PID620"), accession="ACC620", description="PREFETCH")
SLICES = 6
ROWS = 256  # 256x256x2: 131,072 pixel bytes a slice
ACCEPT = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
IDLE_READ = 0.5


@pytest.fixture(scope="module")
def slices():
    return list(ct_series(STUDY, SLICES, rows=ROWS, cols=ROWS, seed=620))


@pytest.fixture(scope="module")
def sample(slices):
    yield from sample_holding("PREFETCHSAMPLE", slices)


@pytest.fixture
def faults(sample):
    sample.archive.faults.clear()
    yield sample.archive.faults
    sample.archive.faults.clear()


@pytest.fixture
def proxy(sample, tmp_path):
    config = tmp_path / "edge.toml"
    config.write_text(
        f'[server]\nworkers = 1\n[cache]\ndir = "{tmp_path / "cache"}"\nprefetch = true\n'
        "[federation]\nhealth_interval = 0\n"
        f'[[archives]]\nname = "sample"\nurl = "{sample.dicomweb_url}"\nbreaker_threshold = 100000\n'
        f"timeouts = {{ connect = 2.0, first_byte = 5.0, idle_read = {IDLE_READ} }}\n")
    with ProxyProcess({}, tmp_path, extra_args=["--config", str(config)]) as p:
        yield p


def _metric(proxy: ProxyProcess, name: str, labels: str) -> float:
    text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    m = re.search(rf"^{name}\{{{labels}\}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _prefetch_ended(proxy: ProxyProcess, outcome: str) -> None:
    deadline = time.monotonic() + 15
    while _metric(proxy, "dicomweb_edge_prefetches_total", f'outcome="{outcome}"') < 1:
        assert time.monotonic() < deadline, f"no prefetch ended {outcome}"
        time.sleep(0.05)


def _frame(client: httpx.Client, proxy: ProxyProcess, ds) -> tuple[str, bytes]:
    r = client.get(f"{proxy.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                   f"/instances/{ds.SOPInstanceUID}/frames/1", headers=ACCEPT)
    assert r.status_code == 200
    parts = split_multipart(r.content, r.headers["content-type"])[1]
    assert len(parts) == 1
    return r.headers["x-cache"], parts[0][1]


def _instance_sizes(sample, slices) -> list[int]:
    """The Part 10 size of each instance as the archive sends it (its parts' Content-Length)."""
    r = httpx.get(f"{sample.dicomweb_url}/studies/{slices[0].StudyInstanceUID}/series/{slices[0].SeriesInstanceUID}",
                  headers={"Accept": 'multipart/related; type="application/dicom"'}, trust_env=False)
    return [len(body) for _, body in split_multipart(r.content, r.headers["content-type"])[1]]


def test_an_archive_that_breaks_off_mid_part_leaves_only_whole_instances(proxy, sample, slices, faults):
    sizes = _instance_sizes(sample, slices)
    faults.reset_after_bytes = sizes[0] + sizes[1] + sizes[2] // 2  # inside the third instance
    series = f"/studies/{slices[0].StudyInstanceUID}/series/{slices[0].SeriesInstanceUID}"
    with httpx.Client(trust_env=False, timeout=30) as client:
        resets = _metric(proxy, "dicomweb_edge_upstream_errors_total", 'archive="sample",kind="reset"')
        assert client.get(proxy.dicomweb_url + series + "/metadata").status_code == 200  # (not cut: JSON is small)
        _prefetch_ended(proxy, "failed")
        assert _metric(proxy, "dicomweb_edge_upstream_errors_total", 'archive="sample",kind="reset"') == resets + 1
        faults.clear()
        got = [_frame(client, proxy, ds) for ds in slices]
    assert [cache for cache, _ in got] == ["HIT", "HIT"] + ["MISS"] * (SLICES - 2)
    assert [payload for _, payload in got] == [ds.PixelData for ds in slices]


def test_an_archive_that_stalls_mid_part_is_given_up_after_idle_read(proxy, sample, slices, faults):
    sizes = _instance_sizes(sample, slices)
    faults.stall_after_bytes = sizes[0] + sizes[1] // 2  # silent inside the second instance, connection open
    series = f"/studies/{slices[0].StudyInstanceUID}/series/{slices[0].SeriesInstanceUID}"
    with httpx.Client(trust_env=False, timeout=30) as client:
        stalls = _metric(proxy, "dicomweb_edge_upstream_errors_total", 'archive="sample",kind="idle_timeout"')
        assert client.get(proxy.dicomweb_url + series + "/metadata").status_code == 200
        _prefetch_ended(proxy, "failed")
        assert _metric(proxy, "dicomweb_edge_upstream_errors_total",
                       'archive="sample",kind="idle_timeout"') == stalls + 1
        faults.clear()
        got = [_frame(client, proxy, ds) for ds in slices]
    assert [cache for cache, _ in got] == ["HIT"] + ["MISS"] * (SLICES - 1)
    assert [payload for _, payload in got] == [ds.PixelData for ds in slices]


def test_a_client_retrieving_the_series_stops_its_prefetch_so_the_archive_sends_it_once(proxy, sample, slices,
                                                                                         faults):
    """A script reads a series' metadata (which starts a prefetch) and then retrieves the series itself: the
    prefetch stops and the client's retrieve teaches the cache, so the archive streams the series about
    once, not twice (body bytes counted at the archive side); every frame is a hit afterwards."""
    size = sum(_instance_sizes(sample, slices))
    archive = sample.archive
    faults.body_chunk_delay = 0.05  # a slow archive: the two streams would overlap
    series = f"/studies/{slices[0].StudyInstanceUID}/series/{slices[0].SeriesInstanceUID}"
    with httpx.Client(trust_env=False, timeout=30) as client:
        sent, asked = archive.body_bytes["retrieve"], archive.requests["retrieve"]
        assert client.get(proxy.dicomweb_url + series + "/metadata").status_code == 200
        deadline = time.monotonic() + 10
        while archive.requests["retrieve"] == asked:  # the prefetch's request reached the archive
            assert time.monotonic() < deadline, "no prefetch started"
            time.sleep(0.01)
        r = client.get(proxy.dicomweb_url + series,
                       headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert r.status_code == 200  # the client's retrieve, which took over from the prefetch: every instance whole
        assert [body for _, body in split_multipart(r.content, r.headers["content-type"])[1]] == \
            [to_part10(ds) for ds in slices]
        _prefetch_ended(proxy, "yielded")
        sent = archive.body_bytes["retrieve"] - sent
        faults.clear()
        got = [_frame(client, proxy, ds) for ds in slices]
    assert size <= sent < 1.5 * size, (sent, size)
    assert [cache for cache, _ in got] == ["HIT"] * SLICES
    assert [payload for _, payload in got] == [ds.PixelData for ds in slices]


async def test_a_frame_waiting_on_a_prefetch_that_yields_waits_for_the_retrieve_that_took_over(proxy, sample,
                                                                                                  slices, faults):
    """A frame request waits for the prefetch that carries its instance; the prefetch then stops for a
    client's series retrieve: the frame request waits for that retrieve instead, and the archive is never
    asked for the frame (counted at the archive side)."""
    import asyncio

    archive = sample.archive
    faults.body_chunk_delay = 0.05
    series = f"/studies/{slices[0].StudyInstanceUID}/series/{slices[0].SeriesInstanceUID}"
    # The second instance: not yet through when the prefetch stops, and through the client's retrieve
    # within the waiter's patience (the archive's idle_read, 0.5 s here).
    last = slices[1]
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        frames_asked, asked = archive.requests["frames"], archive.requests["retrieve"]
        waiters = _metric(proxy, "dicomweb_edge_cache_singleflight_waiters_total", "")
        assert (await client.get(proxy.dicomweb_url + series + "/metadata")).status_code == 200
        async with asyncio.timeout(10):
            while archive.requests["retrieve"] == asked:  # the prefetch's request reached the archive
                await asyncio.sleep(0.01)
        frame = asyncio.ensure_future(client.get(
            f"{proxy.dicomweb_url}{series}/instances/{last.SOPInstanceUID}/frames/1", headers=ACCEPT))
        async with asyncio.timeout(10):
            while _metric(proxy, "dicomweb_edge_cache_singleflight_waiters_total", "") == waiters:
                await asyncio.sleep(0.01)  # the frame request waits for the prefetch
        r = await client.get(proxy.dicomweb_url + series,
                             headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert r.status_code == 200
        f = await frame
    _prefetch_ended(proxy, "yielded")
    assert f.status_code == 200
    assert split_multipart(f.content, f.headers["content-type"])[1][0][1] == last.PixelData
    assert archive.requests["frames"] == frames_asked
