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
from proxy.formats.multipart import MultipartReader, PartEnd, PartHeaders


def _run_demo(extra, env=None):
    port = free_port()
    cmd = [sys.executable, "-m", "proxy.cli", "demo", "--port", str(port), "--ct-slices", "5", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
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


FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def frame_path(out):
    """The frame URL the demo printed, from the DICOMweb root on (the same on the proxy and an archive)."""
    return re.search(r"http://[^'\"]+/dicomweb(/studies/[^'\"]+/frames/1)", out).group(1)


def _payloads(body):
    """The part payloads of a multipart/related body (its boundary read from its first line)."""
    boundary = body.split(b"\r\n", 1)[0][2:].decode()
    parts = []
    for event in (reader := MultipartReader(boundary)).feed(body):
        if isinstance(event, PartHeaders):
            parts.append(b"")
        elif not isinstance(event, PartEnd):
            parts[-1] += bytes(event)
    reader.close()
    return parts


def _archive_frame(out, path):
    """The frame as the archive holding it serves it, asked directly (not through the proxy)."""
    for archive in re.findall(r"(http://127.0.0.1:[0-9]+/dicom-web)", out):
        r = httpx.get(archive + path, trust_env=False, headers={"Accept": FRAMES})
        if r.status_code == 200:
            [payload] = _payloads(r.content)
            return payload
    raise AssertionError(f"no archive of the demo serves {path}")


def _run_printed(out, tmp_path):
    """The commands the demo printed, run as printed by a shell whose PATH has only the system's
    directories (no virtual environment on it): (exit status, what they printed)."""
    block = out.split("Try:\n", 1)[1].split("Press Ctrl-C", 1)[0]
    done = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "NO_PROXY": "*"})
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("mode,stop,curl", [("orthanc", signal.SIGINT, True), ("sample", signal.SIGINT, True),
                                            ("orthanc", signal.SIGTERM, True), ("sample", signal.SIGINT, False)])
def test_demo_serves_what_it_prints(mode, stop, curl, tmp_path):
    """The demo works, the commands it prints work as printed on a machine without our virtual environment on
    its PATH (and without curl: then it prints commands of its own interpreter instead), and Ctrl-C or
    SIGTERM stops everything it started (no orphaned archives)."""
    import os

    if mode == "orthanc" and find_orthanc() is None:
        missing("Orthanc with the DICOMweb plugin is not installed")
    env = None
    if not curl:  # a PATH where no curl is found
        (tmp_path / "bin").mkdir()
        env = {**os.environ, "PATH": str(tmp_path / "bin")}
    proc, out, base = _run_demo(["--sample-archives"] if mode == "sample" else [], env)
    try:
        assert ("curl -s" in out) == curl, out
        status, printed = _run_printed(out, tmp_path)
        assert status == 0, printed
        assert printed.lstrip().startswith("[") and '"00080005"' in printed, printed  # the search's records
        assert "5 instances" in printed, printed
        assert _payloads((tmp_path / "frame.bin").read_bytes()) == [_archive_frame(out, frame_path(out))]
        assert ("HTTP/1.1 200" if curl else "200 multipart/related") in printed, printed
        assert "Press Ctrl-C" in out, out
        assert ("Orthanc with the DICOMweb plugin" in out) == (mode == "orthanc")
        # And what they ask of the proxy is right.
        qido = re.search(r"(http://[^'\"]+/studies\?PatientName=DOE\*)", out).group(1)
        r = httpx.get(qido, trust_env=False)
        assert r.status_code == 200 and r.json()[0]["00100010"]["Value"][0]["Alphabetic"] == "DOE^JOHN"
        frame_url = re.search(r"(http://[^'\"]+/frames/1)", out).group(1)
        r = httpx.get(frame_url, trust_env=False, headers={"Accept": FRAMES})
        assert r.status_code == 200 and _payloads(r.content) == [_archive_frame(out, frame_path(out))]
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


@pytest.mark.parametrize("module", ["numpy", "PIL"])
def test_without_the_demo_extra_the_proxy_runs_and_the_demo_says_what_to_install(module):
    """numpy and Pillow come with the `demo` extra only: without them `serve` and the rest of the CLI start,
    and `demo` tells the user which extra to install (the container image has neither: test_image_e2e.py)."""
    hide = f"import sys; sys.modules[{module!r}] = None; from proxy.cli import main; sys.exit(main(sys.argv[1:]))"
    run = [sys.executable, "-c", hide]
    version = subprocess.run([*run, "--version"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("dicomweb-edge "), version.stderr
    demo = subprocess.run([*run, "demo", "--port", str(free_port())], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert demo.returncode == 2, demo.stdout + demo.stderr
    distribution = {"numpy": "numpy", "PIL": "Pillow"}[module]
    assert f"the demo needs {distribution}" in demo.stderr and "pip install 'dicomweb-edge[demo]'" in demo.stderr
    assert "Traceback" not in demo.stderr
