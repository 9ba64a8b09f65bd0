"""The container image, built by scripts/build-image.sh with podman and run as a user runs it.

The image (deploy/docker/Dockerfile) is built the way `docker build` builds it, on a Debian base the script
makes (no registry is reachable here), then run with podman on the host's network in front of a real Orthanc
on 127.0.0.1: as a non-root user, healthy by its own HEALTHCHECK, serving Orthanc's searches and frames,
keeping its cache in a named volume that outlives the container, and draining on SIGTERM (`podman stop`).
Without podman the tests skip; under CI=true they fail (tests/support.py: missing).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from support import REPO_ROOT, first_payload, free_port, instance_path, orthanc_holding, require_binary, split_multipart

from proxy.demo.synth import Patient, Study, ct_series

TAG = "dicomweb-edge:0.1.0"  # the script's default: what the README's `docker run` line names
CACHE = "/var/cache/dicomweb-edge"  # the image's VOLUME
ENV = {**os.environ, "CONTAINERS_CONF": str(REPO_ROOT / "scripts" / "lib" / "containers.conf")}
FRAME = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
DICOM = {"Accept": 'multipart/related; type="application/dicom"'}
# deploy/kubernetes/statefulset.yaml's securityContext, in podman's words (the read-only root gets a /tmp of
# its own, as the pod's emptyDir)
POD_RESTRICTIONS = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", "10001:10001")
SLICES = 40  # 512x512 16-bit: a 21 MB series retrieve, far more than the socket buffers hold


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)}: {done.returncode}\n{done.stdout}{done.stderr}"
    return done


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built by the script a user runs (cold: ~1.5 min; warm: seconds)."""
    for tool in ("podman", "mmdebstrap"):
        require_binary(tool)
    build = subprocess.run([str(REPO_ROOT / "scripts" / "build-image.sh"), TAG], capture_output=True, text=True,
                           timeout=900, cwd=REPO_ROOT)
    assert build.returncode == 0, f"scripts/build-image.sh failed:\n{build.stdout[-3000:]}{build.stderr[-3000:]}"
    return TAG


@pytest.fixture(scope="module")
def series() -> list:
    study = Study(Patient("IMAGE^TEST", "IMAGE01"))
    return list(ct_series(study, SLICES, seed=11))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, series):
    yield from orthanc_holding(tmp_path_factory, "IMAGE", series)


class Container:
    """`podman run -d` of the image on the host's network, proxying `orthanc`, its cache in `volume`."""

    def __init__(self, image: str, orthanc, volume: str, extra: tuple[str, ...] = ()) -> None:
        self.name = f"dicomweb-edge-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        podman("run", "-d", "--name", self.name, "--network", "host", "--health-interval", "disable",
               "-e", "DICOMWEB_EDGE_HOST=127.0.0.1", "-e", f"DICOMWEB_EDGE_PORT={self.port}",
               "-e", f"DICOMWEB_EDGE_UPSTREAMS=orthanc={orthanc.dicomweb_url}",
               "-v", f"{volume}:{CACHE}", *extra, image)
        deadline = time.monotonic() + 60
        while not self._healthy():
            state = self.inspect()["State"]
            assert state["Running"], f"the container stopped ({state['ExitCode']}):\n{self.logs()}"
            assert time.monotonic() < deadline, f"no /healthz in 60 s:\n{self.logs()}"
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=2, trust_env=False).status_code == 200
        except httpx.TransportError:
            return False

    def inspect(self) -> dict:
        return json.loads(podman("inspect", self.name).stdout)[0]

    def logs(self) -> str:
        done = podman("logs", "--tail", "40", self.name, check=False)
        return done.stdout + done.stderr

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"dicomweb-edge-test-cache-{uuid.uuid4().hex[:8]}"
    yield name
    podman("volume", "rm", "--force", name, check=False)


@pytest.fixture
def containers(image, orthanc, volume) -> Iterator[list[Container]]:
    """Containers a test starts (`start()`), removed afterwards whatever happened."""
    started: list[Container] = []
    yield started
    for container in started:
        container.remove()


def start(containers: list[Container], image: str, orthanc, volume: str, extra: tuple[str, ...] = ()) -> Container:
    containers.append(container := Container(image, orthanc, volume, extra))
    return container


def frame_url(base: str, ds) -> str:
    return base + instance_path(ds) + "/frames/1"


# --- the image ----------------------------------------------------------------------------------------------


def test_the_image_runs_as_non_root_and_its_healthcheck_passes(containers, image, orthanc, volume):
    container = start(containers, image, orthanc, volume)
    uid = podman("exec", container.name, "id", "-u").stdout.strip()
    assert uid.isdigit() and int(uid) != 0, f"the proxy runs as uid {uid}"
    users = podman("top", container.name, "user").stdout.split()[1:]  # the supervisor and its workers
    assert len(users) >= 3 and set(users) <= {"10001", "dicomweb-edge"}, users
    assert httpx.get(container.url + "/healthz", trust_env=False).status_code == 200
    check = podman("healthcheck", "run", container.name, check=False)
    assert check.returncode == 0, f"HEALTHCHECK failed: {check.stdout}{check.stderr}\n{container.logs()}"


def test_a_search_and_a_frame_come_from_orthanc_unchanged(containers, image, orthanc, volume, series):
    """Under the StatefulSet's restrictions, whose preStop hook's `sleep` the image has."""
    container = start(containers, image, orthanc, volume, POD_RESTRICTIONS)
    podman("exec", container.name, "sleep", "0")
    query = "/studies?PatientID=IMAGE01&includefield=all"
    direct = httpx.get(orthanc.dicomweb_url + query, trust_env=False).json()
    found = httpx.get(container.url + "/dicomweb" + query, trust_env=False)
    assert found.status_code == 200, found.text
    assert [r["0020000D"] for r in found.json()] == [r["0020000D"] for r in direct] != []
    assert found.json()[0]["00100010"] == direct[0]["00100010"]
    assert found.json()[0]["00081190"]["Value"][0].startswith(container.url + "/dicomweb/studies/")  # its own URL
    ds = series[3]
    frame = httpx.get(frame_url(container.url + "/dicomweb", ds), headers=FRAME, trust_env=False, timeout=30)
    assert frame.status_code == 200 and frame.headers["x-cache"] == "MISS", frame.text[:300]
    orthanc_frame = httpx.get(frame_url(orthanc.dicomweb_url, ds), trust_env=False, timeout=30,
                              headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert first_payload(frame) == first_payload(orthanc_frame) == bytes(ds.PixelData)


def test_the_cache_is_in_the_volume_and_outlives_the_container(containers, image, orthanc, volume, series):
    """A frame fetched through one container is served by the next one on the same volume, Orthanc stopped."""
    first = start(containers, image, orthanc, volume)
    ds = series[5]
    miss = httpx.get(frame_url(first.url + "/dicomweb", ds), headers=FRAME, trust_env=False, timeout=30)
    assert miss.status_code == 200 and miss.headers["x-cache"] == "MISS"
    podman("stop", "--time", "30", first.name)
    first.remove()
    orthanc.stop()
    try:
        second = start(containers, image, orthanc, volume)
        hit = httpx.get(frame_url(second.url + "/dicomweb", ds), headers=FRAME, trust_env=False, timeout=30)
        assert hit.status_code == 200, f"{hit.status_code} {hit.text[:300]}\n{second.logs()}"
        assert hit.headers["x-cache"] == "HIT" and first_payload(hit) == bytes(ds.PixelData)
        owner = podman("exec", second.name, "stat", "-c", "%u", CACHE).stdout.strip()
        assert owner == "10001", "the volume's cache directory belongs to the proxy's user"
    finally:
        orthanc.start()


class Download(threading.Thread):
    """A series retrieve through a small receive buffer that stops after its first bytes until `go` is set."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.error, self.content_type = url, bytearray(), None, ""
        self.started, self.go = threading.Event(), threading.Event()

    def run(self) -> None:
        small = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]  # (no autotuning to tens of MB)
        try:
            with httpx.Client(transport=httpx.HTTPTransport(socket_options=small), timeout=60, trust_env=False) as c:
                with c.stream("GET", self.url, headers=DICOM) as response:
                    assert response.status_code == 200, response.status_code
                    self.content_type = response.headers["content-type"]
                    for chunk in response.iter_raw(65536):
                        self.body += chunk
                        if not self.started.is_set():
                            self.started.set()
                            self.go.wait(60)
        except Exception as exc:  # noqa: BLE001 - the test looks at what broke the stream
            self.error = exc
        finally:
            self.started.set()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except (ConnectionRefusedError, ConnectionResetError):
        return True


def test_podman_stop_drains_the_retrieve_in_flight_and_exits_0(containers, image, orthanc, volume, series):
    container = start(containers, image, orthanc, volume)
    path = f"/studies/{series[0].StudyInstanceUID}/series/{series[0].SeriesInstanceUID}"
    download = Download(container.url + "/dicomweb" + path)
    download.start()
    assert download.started.wait(30) and download.error is None, repr(download.error)
    stop = subprocess.Popen(["podman", "stop", "--time", "30", container.name], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    signalled = time.monotonic()
    deadline = signalled + 15
    while not refused(container.port):  # SIGTERM: the listener closes at once
        assert time.monotonic() < deadline, f"still accepting connections 15 s after SIGTERM\n{container.logs()}"
        time.sleep(0.05)
    assert download.is_alive() and len(download.body) < 5_000_000, "the retrieve was no longer in flight"
    download.go.set()
    download.join(60)
    assert download.error is None, f"{download.error!r}\n{container.logs()}"
    direct = httpx.get(orthanc.dicomweb_url + path, headers=DICOM, trust_env=False, timeout=60)
    parts = split_multipart(bytes(download.body), download.content_type)[1]
    expected = split_multipart(direct.content, direct.headers["content-type"])[1]
    assert sorted(p for _, p in parts) == sorted(p for _, p in expected) and len(parts) == SLICES
    assert stop.wait(35) == 0, stop.stdout.read()
    assert time.monotonic() - signalled < 30, "podman stop waited for its SIGKILL"
    state = container.inspect()["State"]
    assert (state["Running"], state["ExitCode"]) == (False, 0), f"{state}\n{container.logs()}"


def test_the_image_goes_without_the_demo_packages_and_says_so(image):
    found = podman("run", "--rm", "--entrypoint", "python3", image, "-c",
                   "import importlib.util as u; print([u.find_spec(m) for m in ('numpy', 'PIL', 'pip')])")
    assert found.stdout.strip() == "[None, None, None]"
    demo = podman("run", "--rm", image, "demo", check=False)
    assert demo.returncode == 2 and "pip install 'dicomweb-edge[demo]'" in demo.stderr, demo.stderr
    assert podman("run", "--rm", image, "--version").stdout.strip() == "dicomweb-edge 0.1.0"


def test_the_readme_gives_the_images_size(image):
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)
    stated = re.search(r"The image is (\d+) MB", (REPO_ROOT / "README.md").read_text())
    assert stated, "README: no 'The image is N MB'"
    assert abs(int(stated.group(1)) - size / 1e6) <= 0.1 * size / 1e6, f"the image is {size / 1e6:.0f} MB"
