"""The benchmark stack: a fresh Orthanc holding one synthetic CT study, the proxy in front of it, and
nginx serving Orthanc's exact response bodies as static files. Shared by run.py and upstream_clients.py.

Every process is started in its own session and stopped by its process group id when the `Stack`
closes (normal end, error, Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.demo.orthanc import OrthancServer, free_port  # noqa: E402
from proxy.demo.synth import Patient, Study, ct_series, new_uid  # noqa: E402

WORK = REPO / "benchmarks" / ".work"
PATIENT = "BENCH^CT"
ACCEPT_FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
ACCEPT_SERIES = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass(frozen=True)
class Target:
    """One benchmarked request: its path under a DICOMweb root, its Accept, and its nginx location."""

    name: str
    path: str
    accept: str | None


def targets(study: str, series: str, instance: str) -> dict[str, Target]:
    """The three requests issue 2 tracks (QIDO with one match, one 512 KB frame, the whole series)."""
    se = f"/studies/{study}/series/{series}"
    return {
        "qido": Target("qido", f"/studies?PatientName={PATIENT.split('^')[0]}*", None),
        "frame": Target("frame", f"{se}/instances/{instance}/frames/1", ACCEPT_FRAME),
        "series": Target("series", se, ACCEPT_SERIES),
    }


def on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that `finally` blocks (and the Stack teardown) run."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def spawn(stack: ExitStack, cmd: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path = REPO) -> subprocess.Popen:
    """Start `cmd` in a new session, logging to `log`; stop its whole process group on teardown."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd, env=env, start_new_session=True)

    def stop() -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue

    stack.callback(stop)
    return proc


def wait_http(url: str, proc: subprocess.Popen, what: str, log: Path, timeout: float = 30.0) -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(url, timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready at {url} within {timeout:g}s:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ('' if it does not exist)."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def wire_size(url: str, accept: str | None) -> tuple[int, int]:
    """Status and bytes on the wire (status line, headers, body, chunk framing) of one keep-alive GET, as
    wrk sends it."""
    u = urlsplit(url)
    req = f"GET {u.path}{'?' + u.query if u.query else ''} HTTP/1.1\r\nHost: {u.netloc}\r\n"
    req += (f"Accept: {accept}\r\n" if accept else "") + "\r\n"
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock, sock.makefile("rb") as f:
        sock.sendall(req.encode())
        head = b""
        while not head.endswith(b"\r\n\r\n") and (line := f.readline()):
            head += line
        total = len(head)
        fields = head.decode("latin-1").lower()
        status = int(fields.split(" ", 2)[1]) if fields.startswith("http/") else 0
        if m := re.search(r"\ncontent-length:\s*(\d+)", fields):
            return status, total + len(f.read(int(m.group(1))))
        if re.search(r"\ntransfer-encoding:\s*chunked", fields):
            while line := f.readline():
                size = int(line.split(b";")[0], 16)
                total += len(line) + len(f.read(size + 2))  # data and its CRLF (no trailers)
                if size == 0:
                    break
            return status, total
        return status, total + len(f.read())  # the body ends at EOF


class Stack:
    """Orthanc (+ study), the proxy and nginx under `workdir`; use as a context manager."""

    def __init__(self, workdir: Path, slices: int = 200, workers: int = 2, proxy: bool = True,
                 nginx: bool = True, proxy_rev: str | None = None, proxy_args: list[str] | None = None) -> None:
        self.workdir = workdir
        self.proxy_args = list(proxy_args or [])
        self.proxy_rev = proxy_rev
        self.slices = slices
        self.workers = workers
        self.with_proxy = proxy
        self.with_nginx = nginx
        self.stack = ExitStack()
        self.orthanc: OrthancServer | None = None
        self.proxy: subprocess.Popen | None = None
        self.nginx: subprocess.Popen | None = None
        self.proxy_port = self.nginx_port = self.nginx_proxy_port = 0
        self.uids: dict[str, str] = {}
        self.targets: dict[str, Target] = {}
        self.body_sizes: dict[str, int] = {}
        self.orthanc_version = ""

    @property
    def proxy_log(self) -> Path:
        return self.workdir / "proxy.log"

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop everything that was started (reverse order) and drop the bulky files."""
        try:
            self.stack.close()
        finally:
            for bulky in ("orthanc/db", "static"):
                shutil.rmtree(self.workdir / bulky, ignore_errors=True)

    def start(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        self.start_orthanc()
        if self.with_proxy:
            self.start_proxy()
        if self.with_nginx:
            self.start_nginx()

    def start_orthanc(self) -> None:
        """A fresh Orthanc (RemoteAccessAllowed false; we only talk to 127.0.0.1) with one CT study."""
        self.orthanc = OrthancServer(self.workdir / "orthanc", "BENCH")
        self.stack.callback(self.orthanc.stop)
        self.orthanc.start()
        study = Study(Patient(PATIENT, "BENCH01"), accession="BENCH01", description="BENCH CT")
        series = new_uid()
        instances: list[str] = []

        def generate():
            for ds in ct_series(study, self.slices, series_uid=series):
                instances.append(ds.SOPInstanceUID)
                yield ds

        stored = self.orthanc.store(generate())
        if stored != self.slices or self.orthanc.count_instances() != self.slices:
            raise RuntimeError(f"Orthanc holds {self.orthanc.count_instances()} instances, expected {self.slices}")
        self.uids = {"study": study.study_uid, "series": series, "instance": instances[0]}
        self.targets = targets(**self.uids)
        system = httpx.get(self.orthanc.url + "/system", trust_env=False).json()
        self.orthanc_version = system.get("Version", "?")

    def start_proxy(self) -> None:
        """`python -m proxy.cli serve` with `workers` processes, in front of the Orthanc.

        The proxy runs from the work tree, or with `proxy_rev` from a clean export of that revision's
        `proxy/` (so that a benchmark is not at the mercy of edits in progress).
        """
        assert self.orthanc is not None
        self.proxy_port = free_port()
        prom = self.workdir / "prometheus"
        prom.mkdir()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom)}
        src = REPO
        if self.proxy_rev:
            src = self.workdir / "src"
            src.mkdir()
            archive = subprocess.run(["git", "archive", self.proxy_rev, "proxy"], cwd=REPO, capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
            env["PYTHONPATH"] = str(src)
        cmd = [sys.executable, "-m", "proxy.cli", "serve", "--upstream", f"bench={self.orthanc.dicomweb_url}",
               "--host", "127.0.0.1", "--port", str(self.proxy_port), "--workers", str(self.workers),
               *self.proxy_args]
        self.proxy = spawn(self.stack, cmd, self.proxy_log, env, cwd=src)
        wait_http(f"http://127.0.0.1:{self.proxy_port}/healthz", self.proxy, "proxy", self.proxy_log)

    def start_nginx(self) -> None:
        """nginx (NGINX_CONF) serving the bodies Orthanc sent for each target."""
        assert self.orthanc is not None
        ngx = self.workdir / "nginx"
        static = self.workdir / "static"
        for d in (ngx / "tmp", static):
            d.mkdir(parents=True)
        locations = []
        up = self.orthanc.dicomweb_url.split("/")[2]
        self.nginx_proxy_port = free_port()
        for t in self.targets.values():
            headers = {"Accept": t.accept} if t.accept else {}
            r = httpx.get(self.orthanc.dicomweb_url + t.path, headers=headers, timeout=120, trust_env=False)
            if r.status_code != 200:
                raise RuntimeError(f"Orthanc answered {r.status_code} for {t.name}: {r.text[:300]}")
            (static / t.name).write_bytes(r.content)
            self.body_sizes[t.name] = len(r.content)
            ctype = r.headers["content-type"].replace("'", "")
            locations.append(f"    location = /{t.name} {{ default_type '{ctype}'; try_files /{t.name} =404; }}")
        self.nginx_port = free_port()
        conf = ngx / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=ngx, static=static, port=self.nginx_port,
                                          locations="\n".join(locations), upstream=up,
                                          proxy_port=self.nginx_proxy_port))
        log = ngx / "stdout.log"
        self.nginx = spawn(self.stack, ["nginx", "-e", str(ngx / "error.log"), "-p", str(ngx), "-c", str(conf)], log)
        wait_http(f"http://127.0.0.1:{self.nginx_port}/qido", self.nginx, "nginx", ngx / "error.log")

    def url(self, server: str, target: str) -> str:
        """The URL of `target` on `server` (orthanc, proxy, nginx-proxy or nginx)."""
        assert self.orthanc is not None
        path = self.targets[target].path
        if server == "orthanc":
            return self.orthanc.dicomweb_url + path
        if server == "nginx-proxy":
            return f"http://127.0.0.1:{self.nginx_proxy_port}/{self.orthanc.dicomweb_url.split('/', 3)[3]}{path}"
        if server == "proxy":
            return f"http://127.0.0.1:{self.proxy_port}/dicomweb{path}"
        return f"http://127.0.0.1:{self.nginx_port}/{target}"

    def pgids(self) -> set[int]:
        """Process groups of everything the stack runs (each server leads its own session)."""
        procs = [self.orthanc.pid if self.orthanc else None, *(p.pid for p in (self.proxy, self.nginx) if p)]
        return {p for p in procs if p}

    def worker_pids(self) -> list[int]:
        """PIDs of the proxy's uvicorn worker processes (its master's children, minus the resource tracker)."""
        assert self.proxy is not None
        out = subprocess.run(["pgrep", "-P", str(self.proxy.pid)], capture_output=True, text=True).stdout
        cmdline = {int(p): Path(f"/proc/{p}/cmdline").read_bytes() for p in out.split()}
        return [p for p, cmd in cmdline.items() if b"resource_tracker" not in cmd]


# What every nginx of the benchmarks runs with: 2 workers (the proxy's count in deploy/), its files under
# {dir}; NGINX_HTTP opens its http block.
NGINX_TOP = """\
daemon off;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
"""
NGINX_HTTP = """\
  keepalive_timeout 65; keepalive_requests 100000;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp;
  fastcgi_temp_path {dir}/tmp; uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
"""
NGINX_CONF = NGINX_TOP + """\
http {{
  access_log off; sendfile on; tcp_nopush on; tcp_nodelay on;
""" + NGINX_HTTP + """\
  server {{
    listen 127.0.0.1:{port};
    root {static};
{locations}
  }}
  # The reference reverse proxy: nginx proxy_pass in front of the same Orthanc (kept-alive upstream
  # connections, default buffering), to show what one more hop costs on this machine with a C proxy.
  upstream orthanc {{ server {upstream}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{proxy_port};
    location / {{
      proxy_pass http://orthanc; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffers 64 64k; proxy_max_temp_file_size 0; proxy_read_timeout 120s;
    }}
  }}
}}
"""


class ForeignCpu:
    """CPU used on this machine by anything but us (the servers' process groups, wrk, this process).

    `start()` then `stop()` around a run gives the average number of cores other sessions kept busy.
    """

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self, pgids: set[int]) -> None:
        self.pgids = pgids

    def _sample(self) -> tuple[float, float, float]:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = sum(vals) - vals[3] - vals[4]  # minus idle and iowait
        ours = 0
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and self.pgids:
                try:
                    st = (d / "stat").read_text()
                except OSError:
                    continue
                f = st[st.rindex(")") + 2 :].split()
                if int(f[2]) in self.pgids:
                    ours += int(f[11]) + int(f[12])
        t = os.times()
        mine = t.user + t.system + t.children_user + t.children_system  # this process and waited-for wrk
        return time.monotonic(), (busy - ours) / self.HZ, mine

    def start(self) -> None:
        self._t0 = self._sample()

    def stop(self) -> float:
        t1 = self._sample()
        wall = t1[0] - self._t0[0]
        return max(0.0, (t1[1] - self._t0[1]) - (t1[2] - self._t0[2])) / wall if wall > 0 else 0.0


def versions() -> dict[str, str]:
    """Machine and software versions for the report."""
    out = {"nproc": str(os.cpu_count()), "python": platform.python_version(), "kernel": platform.release()}
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        out["cpu"] = cpu.group(1) if cpu else "?"
    except OSError:
        out["cpu"] = "?"
    for pkg in ("uvicorn", "aiohttp", "httpx", "starlette", "uvloop", "httptools"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    for name, cmd in (("nginx", ["nginx", "-v"]), ("wrk", ["wrk", "-v"])):
        try:
            text = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            out[name] = (text.stdout + text.stderr).splitlines()[0].strip()
        except (OSError, IndexError):
            out[name] = "?"
    return out


def code_state(rev: str | None = None) -> str:
    """The commit under test and any uncommitted changes to the proxy (others may be editing it)."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.rstrip()
    if rev:
        return f"clean export of `{rev}` = commit {git('rev-parse', '--short', rev)} (`--proxy-rev`)"
    dirty = git("status", "--short", "--", "proxy", "pyproject.toml").splitlines()
    files = ", ".join(line[3:] for line in dirty)
    head = f"work tree at commit {git('rev-parse', '--short', 'HEAD')}"
    return head + (f" + uncommitted changes in {files}" if files else " (clean)")


def replace_section(path: Path, heading: str, body: str) -> None:
    """Write `heading` + `body` into a Markdown file, replacing that `## ` section if it exists."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\nWritten by the scripts in `benchmarks/`.\n"
    section = f"{heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    if start is None:
        text = text.rstrip() + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    path.write_text(text)


def export(rev: str) -> tuple[str, Path]:
    """A clean `git archive REV proxy` export under the work dir, for running another revision's proxy
    (PYTHONPATH=<path>): (short revision, path). Checked to be what `import proxy` finds there."""
    short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.strip()
    path = WORK / f"proxy-at-{short}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    tar = subprocess.run(["git", "archive", rev, "proxy"], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(path)], input=tar.stdout, check=True)
    found = subprocess.run([sys.executable, "-c", "import proxy; print(proxy.__file__)"], cwd=path.parent,
                           env={**os.environ, "PYTHONPATH": str(path)}, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert found.startswith(str(path)), f"{rev}'s export is not what imports: {found}"
    return short, path
