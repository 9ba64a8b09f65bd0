"""A cache is never the reason the edge is down (issue 22): real files, real filesystems, a real Orthanc.

- a cache directory on a full filesystem (a small tmpfs) at start-up: two workers start and serve from
  the archive with the cache off (said by /readyz and `dicomweb_edge_cache_writable 0`); a worker killed
  meanwhile is replaced; once there is room the cache turns itself on, without a restart;
- a cache directory that stops being writable under a running proxy (the proxy runs as an unprivileged
  user, as in the container and the systemd unit, and the directory is made read-only before its first
  write, so that SQLite opens the database read-only for the writer): it keeps serving, and its writes
  resume once the directory is writable again (they never did without a fresh connection);
- SQLite's lock held by another process longer than a write waits: the write is dropped and counted,
  the writer goes on with the next;
- an index that is not a database at start-up: served from the archive until it is moved away;
- an index deleted under a running proxy: /metrics still answers;
- a soft open-file limit of 256: raised to the hard limit at start-up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ProxyProcess, first_payload, instance_path, missing, native_frame, orthanc_holding

from proxy.demo.synth import Patient, Study, multiframe_native

FRAMES = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}


@pytest.fixture(scope="module")
def ds():  # 128 KB frames: each a file of its own in the disk tier
    return multiframe_native(Study(Patient("FAULTS^DISK", "PIDFLT")), n_frames=40, rows=256, cols=256, seed=51)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, ds):
    yield from orthanc_holding(tmp_path_factory, "CACHEFAULTS", [ds])


def frame(proxy, ds, n):
    return f"{proxy.dicomweb_url}{instance_path(ds)}/frames/{n}"






def metric(proxy, name, **labels):
    text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def until(condition, what, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return value


def children(pid):
    """The worker processes of a supervisor (not multiprocessing's resource tracker)."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line}


@contextlib.contextmanager
def small_filesystem(size="4m"):
    """A tmpfs of its own (root only; a test fails under CI=true without it, skips elsewhere)."""
    where = Path(tempfile.mkdtemp(prefix="dicomweb-edge-fs-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        where.rmdir()
        missing("mounting a small tmpfs needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    return filler


def config(workdir: Path, orthanc, cache_dir: Path, workers: int = 1, extra: str = "") -> list[str]:
    (workdir / "edge.toml").write_text(
        f'[server]\nworkers = {workers}\n[cache]\ndir = "{cache_dir}"\nprefetch = false\n{extra}'
        f'[[archives]]\nname = "pacs"\nurl = "{orthanc.dicomweb_url}"\n')
    return ["--config", str(workdir / "edge.toml")]


def test_a_full_cache_disk_at_start_up_leaves_the_cache_off_until_there_is_room(orthanc, ds, tmp_path):
    with small_filesystem() as disk, httpx.Client(timeout=30, trust_env=False) as client:
        filler = fill(disk)
        with ProxyProcess({}, tmp_path, config(tmp_path, orthanc, disk / "cache", workers=2)) as proxy:
            ready = client.get(f"{proxy.url}/readyz")
            assert ready.status_code == 200 and ready.json()["cache"].startswith("off: ")
            assert metric(proxy, "dicomweb_edge_cache_writable") == 0
            for _ in range(2):  # served from the archive, every time: the cache is off
                r = client.get(frame(proxy, ds, 1), headers=FRAMES)
                assert (r.status_code, first_payload(r)) == (200, native_frame(ds, 1))
                assert r.headers.get("x-cache") != "HIT"

            workers = until(lambda: children(proxy.pid) if len(children(proxy.pid)) == 2 else None, "2 workers")
            os.kill(min(workers), signal.SIGKILL)  # a worker dies while the disk is full: another one starts
            until(lambda: len(children(proxy.pid) - workers) == 1 and len(children(proxy.pid)) == 2,
                  "the dead worker was not replaced")
            died = next(line for line in proxy.log_path.read_text().splitlines() if "died" in line)
            assert '"level":"warning"' in died

            filler.unlink()  # room again: every worker turns its cache on by itself
            until(lambda: all(httpx.get(f"{proxy.url}/readyz", trust_env=False).json()["cache"] == "on"
                              for _ in range(10)), "the cache did not turn on again in every worker")
            r = client.get(frame(proxy, ds, 2), headers=FRAMES)
            assert (r.status_code, r.headers.get("x-cache"), first_payload(r)) == (200, "MISS", native_frame(ds, 2))
            assert client.get(frame(proxy, ds, 2), headers=FRAMES).headers.get("x-cache") == "HIT"
            until(lambda: metric(proxy, "dicomweb_edge_cache_disk_entries") >= 2, "nothing reached the disk tier")


def test_a_damaged_index_at_start_up_leaves_the_cache_off_and_the_proxy_serving(orthanc, ds, tmp_path):
    """An index that is not a database (a disk error, a copy gone wrong): the proxy serves from the archive,
    says why the cache is off, and turns it on once the operator has moved the index away."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cache.db").write_bytes(b"this is not an SQLite database" * 100)
    with ProxyProcess({}, tmp_path, config(tmp_path, orthanc, cache)) as proxy, \
            httpx.Client(timeout=30, trust_env=False) as client:
        assert "DatabaseError" in client.get(f"{proxy.url}/readyz").json()["cache"]
        r = client.get(frame(proxy, ds, 1), headers=FRAMES)
        assert (r.status_code, first_payload(r)) == (200, native_frame(ds, 1))
        assert "cache directory cannot be opened" in proxy.log_path.read_text()
        (cache / "cache.db").rename(tmp_path / "damaged-cache.db")
        until(lambda: client.get(f"{proxy.url}/readyz").json()["cache"] == "on", "the cache stayed off")
        client.get(frame(proxy, ds, 1), headers=FRAMES)
        assert client.get(frame(proxy, ds, 1), headers=FRAMES).headers.get("x-cache") == "HIT"


def test_a_cache_directory_that_stops_being_writable_recovers_without_a_restart(orthanc, ds):
    """The proxy runs as `nobody` (as in the container and the systemd unit), so that a directory made
    read-only is read-only for it; 128 KB frames are files of their own, created in that directory."""
    if shutil.which("setpriv") is None:
        missing("setpriv (util-linux) is needed to run the proxy as an unprivileged user")
    if os.geteuid() != 0:
        missing("running the proxy as another user needs root")
    work = Path(tempfile.mkdtemp(prefix="dicomweb-edge-ro-"))
    try:
        os.chmod(work, 0o777)
        cache = work / "cache"
        args = config(work, orthanc, cache)
        proxy = ProxyProcess({}, work, args)
        proxy.args = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *proxy.args]
        with proxy, httpx.Client(timeout=30, trust_env=False) as client:
            # Read-only before the first write: SQLite opens the database read-only for the writer thread.
            subprocess.run(["chmod", "-R", "a-w", str(cache)], check=True)
            n = 1
            def write_fails():
                nonlocal n
                r = client.get(frame(proxy, ds, n), headers=FRAMES)
                assert r.status_code == 200 and first_payload(r) == native_frame(ds, n), (r.status_code, r.text[:300])
                n += 1
                time.sleep(0.5)  # (a worker alone writes what it fetched in a quiet moment)
                return metric(proxy, "dicomweb_edge_cache_lookups_total", result="write-failed") >= 1
            until(write_fails, "no write failed on a read-only directory")
            assert metric(proxy, "dicomweb_edge_cache_writable") == 0
            subprocess.run(["chmod", "-R", "u+w", str(cache)], check=True)
            before = metric(proxy, "dicomweb_edge_cache_disk_entries")

            def written_again():
                nonlocal n
                client.get(frame(proxy, ds, n), headers=FRAMES)
                n += 1
                time.sleep(0.5)
                return metric(proxy, "dicomweb_edge_cache_disk_entries") > before
            until(written_again, "writes did not resume once the directory was writable", seconds=40)
            assert until(lambda: metric(proxy, "dicomweb_edge_cache_writable") == 1, "still not writable")
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def test_a_write_waiting_on_another_processs_lock_is_dropped_and_the_writer_goes_on(orthanc, ds, tmp_path):
    args = config(tmp_path, orthanc, tmp_path / "cache")
    with ProxyProcess({}, tmp_path, args) as proxy, httpx.Client(timeout=30, trust_env=False) as client:
        assert client.get(frame(proxy, ds, 1), headers=FRAMES).status_code == 200
        until(lambda: metric(proxy, "dicomweb_edge_cache_disk_entries") >= 2, "frame 1 not written")
        holder = sqlite3.connect(tmp_path / "cache" / "cache.db", timeout=1)
        holder.execute("BEGIN IMMEDIATE")  # another process holds SQLite's write lock (a `cache check`, say)
        try:
            r = client.get(frame(proxy, ds, 2), headers=FRAMES)
            assert (r.status_code, first_payload(r)) == (200, native_frame(ds, 2))
            until(lambda: metric(proxy, "dicomweb_edge_cache_lookups_total", result="write-failed") >= 1,
                  "the write waiting on the lock was not given up", seconds=30)
        finally:
            holder.rollback()
            holder.close()
        before = metric(proxy, "dicomweb_edge_cache_disk_entries")
        assert client.get(frame(proxy, ds, 3), headers=FRAMES).status_code == 200
        until(lambda: metric(proxy, "dicomweb_edge_cache_disk_entries") > before, "the writer stopped for good")


def test_metrics_answer_with_the_cache_index_deleted(orthanc, ds, tmp_path):
    args = config(tmp_path, orthanc, tmp_path / "cache", workers=2)
    with ProxyProcess({}, tmp_path, args) as proxy, httpx.Client(timeout=30, trust_env=False) as client:
        assert client.get(frame(proxy, ds, 1), headers=FRAMES).status_code == 200
        for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
            with contextlib.suppress(FileNotFoundError):
                (tmp_path / "cache" / name).unlink()
        for _ in range(6):
            r = httpx.get(f"{proxy.url}/metrics", trust_env=False)
            assert r.status_code == 200 and "dicomweb_edge_cache_writable" in r.text
        r = client.get(frame(proxy, ds, 5), headers=FRAMES)
        assert (r.status_code, first_payload(r)) == (200, native_frame(ds, 5))


def test_a_low_soft_open_file_limit_is_raised_at_start_up(orthanc, tmp_path):
    if shutil.which("prlimit") is None:
        missing("prlimit (util-linux) is needed to start the proxy under a low soft limit")
    proxy = ProxyProcess({}, tmp_path, config(tmp_path, orthanc, tmp_path / "cache"))
    proxy.args = ["prlimit", "--nofile=256:", *proxy.args]
    with proxy:
        limits = Path(f"/proc/{proxy.pid}/limits").read_text()
        soft, hard = next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files"))
        assert soft == hard and int(soft) > 256, limits
