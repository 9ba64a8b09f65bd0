"""`dicomweb-edge demo`: the main job works with real Orthanc and with the built-in sample archives."""

import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from support import REPO_ROOT, dicomweb_client, free_port, missing

from proxy.demo.orthanc import find_orthanc


def _run_demo(extra):
    port = free_port()
    cmd = [sys.executable, "-m", "proxy.cli", "demo", "--port", str(port), "--ct-slices", "5", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Press Ctrl-C" in line:
            break
    out = "".join(lines)
    base = f"http://127.0.0.1:{port}/dicomweb"
    for _ in range(100):  # the banner comes just before uvicorn binds
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", trust_env=False)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    return proc, out, base


@pytest.mark.parametrize("mode,stop", [("orthanc", signal.SIGINT), ("sample", signal.SIGINT),
                                       ("orthanc", signal.SIGTERM)])
def test_demo_serves_what_it_prints(mode, stop):
    """The demo works, and Ctrl-C or SIGTERM stops everything it started (no orphaned archives)."""
    if mode == "orthanc" and find_orthanc() is None:
        missing("Orthanc with the DICOMweb plugin is not installed")
    proc, out, base = _run_demo(["--sample-archives"] if mode == "sample" else [])
    try:
        assert "Press Ctrl-C" in out, out
        assert ("Orthanc with the DICOMweb plugin" in out) == (mode == "orthanc")
        # The three commands it prints work.
        qido = re.search(r"curl -s '([^']+)'", out).group(1)
        r = httpx.get(qido, trust_env=False)
        assert r.status_code == 200 and r.json()[0]["00100010"]["Value"][0]["Alphabetic"] == "DOE^JOHN"
        frame_url = re.search(r"'(http://[^']+/frames/1)'", out).group(1)
        r = httpx.get(frame_url, trust_env=False,
                      headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
        assert r.status_code == 200 and len(r.content) > 512 * 512 * 2
        study, series = re.search(r"retrieve_series\('([0-9.]+)', '([0-9.]+)'\)", out).groups()
        assert len(dicomweb_client(base).retrieve_series(study, series)) == 5
    finally:
        proc.send_signal(stop)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0
    for archive in re.findall(r"(http://127.0.0.1:[0-9]+)/dicom-web", out):  # the archives were stopped
        with pytest.raises(httpx.TransportError):
            httpx.get(archive + "/system", trust_env=False)
