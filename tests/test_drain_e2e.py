"""SIGTERM drains: in-flight streams finish within `shutdown_grace`, new connections are refused, then exit.

The upstream is the in-process sample archive with a slow body: each part of a series retrieve is held
back by `body_chunk_delay`, so the test decides when the stream in flight may finish (by lifting the
delay), instead of hoping that it is still running when the signal arrives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from support import ProxyProcess, split_multipart

from proxy.config import ConfigError, load
from proxy.demo.archive import ArchiveServer, SampleArchive
from proxy.demo.synth import Patient, Study, ct_series

SLICES = 40
HELD = 0.5  # seconds per part while the stream is held back: 40 parts would take 20 s
DICOM = {"Accept": 'multipart/related; type="application/dicom"'}


@pytest.fixture(scope="module")
def archive():
    study = Study(Patient("DRAIN^TEST", "DRAIN01"))
    datasets = list(ct_series(study, SLICES, rows=64, cols=64, seed=7))
    sample = SampleArchive("DRAIN")
    sample.extend(datasets)
    server = ArchiveServer(sample).start()
    server.series_path = f"/studies/{study.study_uid}/series/{datasets[0].SeriesInstanceUID}"
    server.instances = sorted(e.data for e in sample._snapshot())
    yield server
    server.stop()


@pytest.fixture
def held(archive):
    """The archive's body is slow until the test lifts the delay."""
    archive.archive.faults.clear()
    archive.archive.faults.body_chunk_delay = HELD
    yield archive.archive.faults
    archive.archive.faults.clear()


class Download(threading.Thread):
    """A series retrieve read to the end (or until the connection breaks) in the background."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.error = url, bytearray(), None
        self.content_type = ""
        self.first_bytes = threading.Event()

    def run(self) -> None:
        try:
            with httpx.Client(timeout=60.0, trust_env=False) as client:
                with client.stream("GET", self.url, headers=DICOM) as response:
                    assert response.status_code == 200, response.status_code
                    self.content_type = response.headers["content-type"]
                    for chunk in response.iter_bytes():
                        self.body += chunk
                        self.first_bytes.set()
        except Exception as exc:  # noqa: BLE001 - the test inspects what broke the stream
            self.error = exc
        finally:
            self.first_bytes.set()


@contextlib.contextmanager
def explained(proxy: ProxyProcess) -> Iterator[None]:
    """A failed assertion carries the proxy's log (the proxy is started inside the test)."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- proxy log ---\n{proxy.log_tail(80)}") from None


def _start(archive, proxy) -> Download:
    download = Download(proxy.dicomweb_url + archive.series_path)
    download.start()
    assert download.first_bytes.wait(30), "the retrieve never started"
    assert download.error is None, f"the retrieve failed before SIGTERM: {download.error!r}"
    return download


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        return False
    except (ConnectionRefusedError, ConnectionResetError):  # (reset: the listener closed with it queued)
        return True


def _wait_refused(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not _refused(port):
        assert time.monotonic() < deadline, f"port {port} still accepts connections {timeout}s after SIGTERM"
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_the_stream_in_flight_finish_and_refuses_new_connections(archive, held, tmp_path, workers):
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--workers", str(workers)]) as proxy, \
            explained(proxy):
        download = _start(archive, proxy)
        os.kill(proxy.pid, signal.SIGTERM)
        _wait_refused(proxy.port)
        assert download.is_alive(), f"the stream ended before the test let it: {download.error!r}"
        held.body_chunk_delay = 0.0  # let it finish
        download.join(30)
        assert not download.is_alive() and download.error is None, repr(download.error)
        _, parts = split_multipart(bytes(download.body), download.content_type)
        assert sorted(content for _, content in parts) == archive.instances  # every instance, byte for byte
        proxy.wait_exit(15)


def test_a_stream_longer_than_the_grace_period_is_cut_and_the_proxy_exits(archive, held, tmp_path):
    grace = 1.0
    args = ["--workers", "2", "--shutdown-grace", str(grace)]
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, args) as proxy, explained(proxy):
        download = _start(archive, proxy)
        os.kill(proxy.pid, signal.SIGTERM)
        signalled = time.monotonic()
        try:
            proxy.wait_exit(grace + 5)  # the held stream alone would need ~20 s
        except subprocess.TimeoutExpired:
            pytest.fail(f"the proxy was still running {grace + 5}s after SIGTERM with shutdown_grace={grace}")
        assert time.monotonic() - signalled >= grace - 0.2, "exited before the grace period was over"
        download.join(10)
        assert isinstance(download.error, httpx.HTTPError), "the stream was not cut"
        assert len(download.body) < sum(len(i) for i in archive.instances)
        assert "timeout graceful shutdown exceeded" in proxy.log_tail(200)


def test_shutdown_grace_setting(tmp_path):
    config = tmp_path / "edge.toml"
    config.write_text('[server]\nshutdown_grace = 12.5\n[[archives]]\nname = "a"\nurl = "http://127.0.0.1:1/"\n')
    assert load(config, environ={}).shutdown_grace == 12.5
    assert load(config, environ={"DICOMWEB_EDGE_SHUTDOWN_GRACE": "3"}).shutdown_grace == 3.0
    assert load(config, {"shutdown_grace": 0.0}, environ={}).shutdown_grace == 0.0
    with pytest.raises(ConfigError, match="shutdown_grace"):
        load(config, {"shutdown_grace": -1.0}, environ={})
