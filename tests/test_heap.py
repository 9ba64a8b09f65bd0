"""A worker with a frame cache warms its heap at start-up (heap.py): the frames of the first series it
learns land in memory already faulted in, instead of costing a page fault per 4 KiB while the first
viewer waits. Against a real Orthanc; faults and resident memory read from /proc."""

import os
import platform
import subprocess
import sys
import time

import httpx
import pytest
from support import ProxyProcess, orthanc_holding

from proxy.demo.synth import Patient, Study, ct_series

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt, and /proc")

PAGE = os.sysconf("SC_PAGE_SIZE")
WARM = 64 * 1024 * 1024
SLICES = 32  # 512x512 CT: ~16 MiB of pixel data, well within WARM


@pytest.fixture(scope="module")
def series():
    return list(ct_series(Study(Patient("HEAP^WARM", "PIDH1")), n_slices=SLICES))


@pytest.fixture(scope="module")
def archive(tmp_path_factory, series):
    yield from orthanc_holding(tmp_path_factory, "HEAP", series)


def minor_faults(pid: int) -> int:
    """Minor page faults of the process so far, all threads (/proc/PID/stat field 10)."""
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[7])


def retrieve_and_settle(proxy: ProxyProcess, series) -> int:
    """Retrieve the series through the proxy (it learns every instance into its memory tier) and wait
    until what it holds back is on disk; the bytes received."""
    first = series[0]
    with httpx.Client(trust_env=False, timeout=60) as c:
        r = c.get(f"{proxy.dicomweb_url}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}",
                  headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert r.status_code == 200
        deadline = time.monotonic() + 30
        while (stats := c.get(f"{proxy.url}/admin/cache").json())["memory_entries"] < SLICES \
                or stats["held_back_bytes"] > 0:
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        return len(r.content)


def test_a_warmed_worker_learns_a_series_without_faulting_its_memory_in(archive, series, tmp_path):
    measured = {}
    for warm in (0, WARM):
        run = tmp_path / f"warm-{warm}"
        with ProxyProcess({"a": archive.dicomweb_url}, run, ["--cache-dir", str(run / "c"), "--workers", "1"],
                          env={"DICOMWEB_EDGE_MEMORY_WARM_BYTES": str(warm)}) as proxy:
            rss = proxy.rss_bytes()
            before = minor_faults(proxy.pid)
            size = retrieve_and_settle(proxy, series)
            measured[warm] = (rss, minor_faults(proxy.pid) - before)
    pages = size // PAGE
    (cold_rss, cold_faults), (warm_rss, warm_faults) = measured[0], measured[WARM]
    assert warm_rss - cold_rss >= 0.9 * WARM  # touched before the first request: resident from the start
    assert cold_faults >= 0.8 * pages  # without it, the series' memory is faulted in as it arrives ...
    assert warm_faults < cold_faults / 4, measured  # ... with it, it was faulted in at start-up


def test_instance_sized_buffers_come_from_the_warmed_heap():
    """What the proxy allocates for an instance received whole (a bytearray of its size, parts.py):
    from the warmed heap, not from fresh mmaps, however many there are (the memory tier keeps them)."""
    code = (
        "import resource, sys\n"
        "from proxy.cache import heap\n"
        "warmed = heap.warm(int(sys.argv[1]))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "kept = [bytearray(524_782) for _ in range(64)]\n"
        "print(warmed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )

    def run(nbytes: int) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", code, str(nbytes)], capture_output=True, text=True, check=True)
        warmed, faults = out.stdout.split()
        return int(warmed), int(faults)

    pages = 64 * 524_782 // PAGE
    assert run(0) >= (0, int(0.9 * pages))
    warmed, faults = run(WARM)
    assert warmed == WARM and faults < pages / 20
