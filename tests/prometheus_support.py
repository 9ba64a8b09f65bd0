"""A real Prometheus (Debian `prometheus`) for tests and for the dashboard preview, on a free loopback port."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from support import free_port, missing

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        missing(f"{name} is not installed (Debian package prometheus)")
    return found


class Prometheus:
    """A real Prometheus scraping `target` every second with our alert rules, on a free loopback port."""

    def __init__(self, workdir: Path, target: str, retention: str = "1d") -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(RULES, workdir / "alerts.yml")
        (workdir / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [alerts.yml]\n"
            "scrape_configs:\n"
            f"  - job_name: dicomweb-edge\n    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [binary("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 f"--storage.tsdb.retention.time={retention}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir, start_new_session=True)
        self.api = f"http://127.0.0.1:{self.port}/api/v1"
        self.wait_until(lambda: httpx.get(f"http://127.0.0.1:{self.port}/-/ready", trust_env=False).status_code
                        == 200, "Prometheus ready")

    def wait_until(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-3000:]}")
            try:
                if check():
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.api}/query", params={"query": expr}, trust_env=False, timeout=10).json()
        assert r["status"] == "success", (expr, r)
        return r["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        r = httpx.get(f"{self.api}/query_range", params={"query": expr, "start": start, "end": end, "step": step},
                      trust_env=False, timeout=30).json()
        assert r["status"] == "success", (expr, r)
        return r["data"]["result"]

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
