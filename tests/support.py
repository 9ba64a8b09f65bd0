"""Test helpers: skip-or-fail for missing tools, free ports, and the proxy as a real subprocess."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from proxy.demo.orthanc import free_port

__all__ = ["ProxyProcess", "dicomweb_client", "first_payload", "free_port", "instance_path", "missing", "native_frame",
           "orthanc_file", "require_binary", "running_in_ci", "split_multipart"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def running_in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> NoReturn:
    """Skip locally; fail under CI=true, where a skipped Orthanc test would hide a broken stack."""
    if running_in_ci():
        pytest.fail(f"{reason} (CI=true: missing dependencies are failures, not skips)", pytrace=False)
    pytest.skip(reason)


def orthanc_holding(tmp_path_factory: Any, name: str, datasets: Iterable[Any], **options: Any) -> Iterator[Any]:
    """For a module-scoped fixture: a real Orthanc (with its DICOMweb plugin) on loopback holding
    `datasets`, stopped afterwards; skipped without Orthanc (failed under CI=true). `options` go to
    OrthancServer (e.g. encoding="Utf8")."""
    from proxy.demo.orthanc import OrthancServer, find_orthanc

    if find_orthanc() is None:
        missing("Orthanc with the DICOMweb plugin is not installed")
    with OrthancServer(tmp_path_factory.mktemp(f"{name.lower()}_orthanc"), name, **options) as server:
        server.store(list(datasets))
        yield server


def sample_holding(name: str, datasets: Iterable[Any]) -> Iterator[Any]:
    """For a module-scoped fixture: the in-process sample archive (`proxy.demo.archive`, the one whose
    faults tests switch on) holding `datasets`, served on loopback, stopped afterwards."""
    from proxy.demo.archive import ArchiveServer, SampleArchive

    archive = SampleArchive(name)
    archive.extend(datasets)
    with ArchiveServer(archive) as server:
        yield server


def require_binary(name_or_path: str) -> str:
    """The path of an executable (a name looked up on PATH, or a path), or skip/fail."""
    if os.sep in name_or_path:
        found = name_or_path if os.access(name_or_path, os.X_OK) else None
    else:
        found = shutil.which(name_or_path)
    if found is None:
        missing(f"{name_or_path} is not installed (run ./scripts/test.sh to install it)")
    return found


def _read_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


class ProxyProcess:
    """`python -m proxy.cli serve ...` on 127.0.0.1:PORT, ready once `GET /healthz` answers 200."""

    def __init__(self, upstreams: Mapping[str, str], workdir: Path, extra_args: Sequence[str] = (),
                 port: int | None = None, env: Mapping[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.log_path = self.workdir / "proxy.log"
        self.args = [sys.executable, "-m", "proxy.cli", "serve"]
        for name, url in upstreams.items():
            self.args += ["--upstream", f"{name}={url}"]
        self.args += ["--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), self.env.get("PYTHONPATH")]))
        self._proc: subprocess.Popen[bytes] | None = None
        self.scheme = "http"  # "https" for a proxy terminating TLS ([server] tls_cert_file)
        self.verify: Any = True  # what httpx verifies the proxy's certificate with (a CA file for https)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + "/dicomweb"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "proxy not started"
        return self._proc.pid

    def start(self, timeout: float = 30.0) -> ProxyProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # cwd = workdir, so relative cache dirs land there
            self._proc = subprocess.Popen(self.args, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0, trust_env=False,
                             verify=self.verify).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"proxy not ready at {self.url} in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (uvicorn shuts its workers down), then SIGKILL for the whole process group."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the proxy and its workers only
            proc.wait()

    def wait_exit(self, timeout: float) -> int:
        """Wait for the proxy to exit on its own (after a signal the test sent); its return code."""
        assert self._proc is not None, "proxy not started"
        return self._proc.wait(timeout=timeout)

    def rss_bytes(self) -> int:
        """Current resident set size of the main process (VmRSS)."""
        return _read_kib(self.pid, "VmRSS")

    def peak_rss_bytes(self) -> int:
        """Peak resident set size of the main process (VmHWM)."""
        return _read_kib(self.pid, "VmHWM")

    def log_after(self, request_id: str, timeout: float = 10.0) -> str:
        """The whole log once the record of the request sent with `X-Request-ID: request_id` is in it (access
        records are written in batches): an assertion that something is *not* in the log needs that much."""
        deadline = time.monotonic() + timeout
        while request_id not in (text := self.log_path.read_text()):
            assert time.monotonic() < deadline, f"no record of request {request_id} in the log"
            time.sleep(0.02)
        return text

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return "(no proxy log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def instance_path(ds: Any) -> str:
    """`/studies/{study}/series/{series}/instances/{sop}` of a dataset, relative to a DICOMweb root."""
    return f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def dicomweb_client(url: str) -> Any:
    """dicomweb-client's DICOMwebClient for `url`, as a user's script makes it, less two things that would
    hide the proxy's faults from a test: its retries (on 408, 429, 503 and 504, five times with back-off:
    a failure answered once would pass unseen) and the environment's HTTP proxy settings."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.trust_env = False  # loopback only, never through a proxy from the environment
    client = DICOMwebClient(url, session=session)
    client.set_http_retry_params(retry=False)
    return client


def native_frame(ds: Any, n: int) -> bytes:
    """Frame `n` (from 1) of a dataset with native pixel data (Rows x Columns x BitsAllocated/8 bytes each)."""
    size = ds.Rows * ds.Columns * int(getattr(ds, "SamplesPerPixel", 1)) * ds.BitsAllocated // 8
    return bytes(ds.PixelData[(n - 1) * size : n * size])


def first_payload(response: httpx.Response) -> bytes:
    """The content of the first part of a multipart/related response."""
    return split_multipart(response.content, response.headers["content-type"])[1][0][1]


def orthanc_file(orthanc: Any, sop_uid: str) -> bytes:
    """The Part-10 bytes Orthanc stores for an instance (its REST API, not DICOMweb)."""
    with httpx.Client(base_url=orthanc.url, timeout=30.0, trust_env=False) as client:
        found = client.post("/tools/lookup", content=sop_uid).json()
        ids = [f["ID"] for f in found if f["Type"] == "Instance"]
        assert len(ids) == 1, f"Orthanc has {len(ids)} instances with that SOP Instance UID"
        response = client.get(f"/instances/{ids[0]}/file")
        response.raise_for_status()
        return response.content


def split_multipart(body: bytes, content_type: str) -> tuple[str, list[tuple[list[tuple[str, str]], bytes]]]:
    """A strict multipart/related parser, independent of the proxy's: (boundary, [(headers, content)]).

    Header names are kept exactly as spelled. The body must start with the first delimiter (no
    preamble: client parsers find the boundary in the body) and end with the close delimiter.
    """
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    assert match, f"no boundary in {content_type!r}"
    boundary = match.group(1)
    delim = b"--" + boundary.encode()
    assert body.startswith(delim + b"\r\n"), body[:100]
    assert body.endswith(b"\r\n" + delim + b"--\r\n"), body[-100:]
    parts = []
    for raw in body[len(delim) + 2 : -(len(delim) + 6)].split(b"\r\n" + delim + b"\r\n"):
        head, sep, content = raw.partition(b"\r\n\r\n")
        assert sep, "part without a blank line after its headers"
        headers = [tuple(line.split(": ", 1)) for line in head.decode("latin-1").split("\r\n")]
        parts.append((headers, content))
    return boundary, parts
