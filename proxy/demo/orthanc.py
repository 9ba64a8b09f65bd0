"""Run a real Orthanc (1.10 + DICOMweb plugin 1.7) as a child process, for the demo and the tests.

Orthanc 1.10 listens on all interfaces: the config refuses remote clients; we only talk to 127.0.0.1.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import httpx
from pydicom.dataset import Dataset

from proxy.demo.synth import to_part10

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB_PLUGIN_GLOB = "/usr/lib/orthanc/libOrthancDicomWeb.so*"


def find_orthanc() -> tuple[str, str] | None:
    """(Orthanc binary, DICOMweb plugin .so), or None when either is missing."""
    binary = ORTHANC_BINARY if os.access(ORTHANC_BINARY, os.X_OK) else shutil.which("Orthanc")
    plugins = [p for p in [DICOMWEB_PLUGIN, *sorted(glob.glob(DICOMWEB_PLUGIN_GLOB))] if os.path.isfile(p)]
    if binary is None or not plugins:
        return None
    return binary, plugins[0]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


class OrthancServer:
    """One Orthanc process with its own config, storage and log under `workdir`."""

    def __init__(self, workdir: Path, name: str = "ORTHANC", port: int | None = None,
                 encoding: str = "Latin1", servers: Mapping[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.name = name
        # Orthanc's DefaultEncoding: its searches answer in it (ISO_IR 100 for Latin1), and drop the characters
        # of a stored name that it cannot hold ("Utf8" keeps them all).
        self.encoding = encoding
        self.servers = dict(servers or {})  # DICOMweb servers its plugin is a client of: name -> URL
        self.port = port if port is not None else free_port()
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.stdout_path = self.workdir / "orthanc.stdout.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + "/dicom-web"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def config(self, plugin: str) -> dict[str, object]:
        """The single config file Orthanc is started with (no DicomWeb "Host": URLs follow the request)."""
        storage = str(self.workdir / "db")
        return {
            "Name": self.name,
            "DefaultEncoding": self.encoding,
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": False,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "HttpCompressionEnabled": False,
            "OverwriteInstances": True,
            "SaveJobs": False,
            "HttpThreadsCount": 50,
            "Plugins": [plugin],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
                "Servers": {name: {"Url": url} for name, url in self.servers.items()},
            },
        }

    def start(self, timeout: float = 15.0) -> OrthancServer:
        """Write the config, launch Orthanc and wait until `GET /system` answers."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        found = find_orthanc()
        if found is None:
            raise RuntimeError("Orthanc or its DICOMweb plugin is missing (apt-get install orthanc-dicomweb)")
        binary, plugin = found
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(plugin), indent=2))
        with open(self.stdout_path, "ab") as out:
            self._proc = subprocess.Popen(
                [binary, f"--logfile={self.log_path}", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"Orthanc exited with {self._proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(self.url + "/system").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc not ready at {self.url} in {timeout}s:\n{self.log_tail()}")
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, wait up to 10 s, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, timeout: float = 15.0) -> OrthancServer:
        """Stop and start again on the same port and storage."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 40) -> str:
        return f"{_tail(self.log_path, lines)}\n{_tail(self.stdout_path, lines)}"

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def store(self, items: Iterable[Dataset | bytes], batch_bytes: int = 50_000_000) -> int:
        """STOW-RS datasets or Part 10 bytes in batches of about `batch_bytes`; returns the instance count."""
        stored = 0
        with httpx.Client(timeout=300.0, trust_env=False) as client:
            for batch in _batches(items, batch_bytes):
                self._stow(client, batch)
                stored += len(batch)
        return stored

    def _stow(self, client: httpx.Client, parts: list[bytes]) -> None:
        boundary = uuid.uuid4().hex
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body = b"".join(head + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()
        response = client.post(
            self.dicomweb_url + "/studies", content=body,
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                     "Accept": "application/dicom+json"},
        )
        if response.status_code != 200:
            raise RuntimeError(f"STOW to {self.name} failed: {response.status_code} {response.text[:500]}")
        failed = response.json().get("00081198", {}).get("Value")  # Orthanc says 200 even on failures
        if failed:
            raise RuntimeError(f"STOW to {self.name}: {len(failed)} of {len(parts)} instances failed")

    def count_instances(self) -> int:
        """Number of instances stored, from Orthanc's REST `/statistics`."""
        response = httpx.get(self.url + "/statistics", timeout=10.0, trust_env=False)
        response.raise_for_status()
        return int(response.json()["CountInstances"])


def _batches(items: Iterable[Dataset | bytes], batch_bytes: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    size = 0
    for item in items:
        batch.append(data := item if isinstance(item, bytes) else to_part10(item))
        size += len(data)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
