"""deploy/nginx/front.conf in front of two real proxies: each study's requests land on one replica.

Real nginx (Debian's), configured with the front config as shipped (only its listen address and its
replica list rendered for this test), in front of two proxy processes that share one real Orthanc.
Where a request went is read from the replicas' own request counters (`/metrics`), not from nginx.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import REPO_ROOT, ProxyProcess, free_port, orthanc_holding, require_binary

from proxy.demo.synth import Patient, Study, ct_series

FRONT = REPO_ROOT / "deploy" / "nginx" / "front.conf"
STUDIES = 24  # with two replicas, all of them hashing to one replica by chance has odds of about 1e-7

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log {dir}/access.log;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp;
  fastcgi_temp_path {dir}/tmp; uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
  include {front};
}}
"""


def render_front(text: str, replicas: list[str], listen: str) -> str:
    """The shipped front config with its replica list and listen address replaced (nothing else)."""
    servers = "".join(f"    server {r} max_fails=3 fail_timeout=10s;\n" for r in replicas)
    text, n = re.subn(r"(?m)^    server 127\.0\.0\.1:\d+ [^\n]*\n(?:    server [^\n]*\n)*", servers, text)
    assert n == 1, "front.conf: the upstream's server lines were not found"
    text, n = re.subn(r"(?m)^    listen 8080;$", f"    listen {listen};", text)
    assert n == 1, "front.conf: `listen 8080;` was not found"
    return text


@dataclass(frozen=True)
class Held:
    """Where one study's one instance is."""

    series: str
    sop: str


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Iterator[Any]:
    """A real Orthanc holding STUDIES one-instance studies; `instances`: study UID -> where its instance is."""
    datasets = [ds for i in range(STUDIES)
                for ds in ct_series(Study(Patient(f"FRONT^{i}", f"FRONT{i:03d}")), 1, rows=16, cols=16, seed=i)]
    for server in orthanc_holding(tmp_path_factory, "FRONT", datasets):
        server.instances = {ds.StudyInstanceUID: Held(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in datasets}
        yield server


@pytest.fixture(scope="module")
def front(tmp_path_factory, archive):
    nginx = require_binary("nginx")
    work = tmp_path_factory.mktemp("front")
    replicas = [ProxyProcess({"a": archive.dicomweb_url}, work / f"replica{i}", ["--workers", "1"]) for i in (1, 2)]
    for r in replicas:
        r.start()
    (work / "nginx" / "tmp").mkdir(parents=True)
    port = free_port()
    conf_d = work / "nginx" / "front.conf"
    conf_d.write_text(render_front(FRONT.read_text(), [f"127.0.0.1:{r.port}" for r in replicas], f"127.0.0.1:{port}"))
    conf = work / "nginx" / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=work / "nginx", front=conf_d))
    log = open(work / "nginx" / "stdout.log", "wb")
    args = [nginx, "-e", str(work / "nginx" / "error.log"), "-p", str(work / "nginx"), "-c", str(conf)]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/healthz", proc, work / "nginx" / "error.log")
        yield f"http://127.0.0.1:{port}", replicas
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        for r in replicas:
            r.stop()


def _wait_ready(url: str, proc: subprocess.Popen, error_log: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        assert proc.poll() is None, f"nginx exited: {error_log.read_text(errors='replace')}"
        try:
            if httpx.get(url, timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"nginx not ready: {error_log.read_text(errors='replace')}"
        time.sleep(0.05)


def answered(replica: ProxyProcess) -> int:
    """DICOMweb requests this replica has answered, from its /metrics (all workers)."""
    text = httpx.get(replica.url + "/metrics", timeout=10.0, trust_env=False).text
    return int(sum(s.value for f in text_string_to_metric_families(text) if f.name == "dicomweb_edge_requests"
                   for s in f.samples if s.name.endswith("_total") and s.labels.get("service") != "other"))


def test_each_study_lands_on_one_replica_and_studies_spread_over_both(front, archive):
    url, replicas = front
    landed: dict[str, int] = {}
    with httpx.Client(base_url=url + "/dicomweb", timeout=30.0, trust_env=False) as client:
        before = [answered(r) for r in replicas]
        for study, e in archive.instances.items():
            paths = [f"/studies/{study}/metadata", f"/studies/{study}/series",
                     f"/studies/{study}/series/{e.series}/instances/{e.sop}/frames/1"]
            for path in paths:
                accept = "multipart/related; type=application/octet-stream" if "/frames/" in path else \
                    "application/dicom+json"
                response = client.get(path, headers={"Accept": accept})
                assert response.status_code == 200, (path, response.status_code, response.text[:200])
            after = [answered(r) for r in replicas]
            delta = [a - b for a, b in zip(after, before, strict=True)]
            assert sorted(delta) == [0, len(paths)], f"study {study[-8:]}: requests per replica {delta}"
            landed[study], before = delta.index(len(paths)), after
        assert set(landed.values()) == {0, 1}, "every study hashed to the same replica"
        for study in list(archive.instances)[:4]:  # again, and through /upstreams/{name}: the same replica
            before = [answered(r) for r in replicas]
            assert client.get(f"/studies/{study}/metadata").status_code == 200
            assert client.get(f"{url}/upstreams/a/dicomweb/studies/{study}/metadata").status_code == 200
            assert [answered(r) - b for r, b in zip(replicas, before, strict=True)].index(2) == landed[study]


def test_searches_without_a_study_are_spread(front):
    url, replicas = front
    before = [answered(r) for r in replicas]
    with httpx.Client(base_url=url + "/dicomweb", timeout=30.0, trust_env=False) as client:
        for _ in range(24):
            assert client.get("/studies", params={"limit": "5"}).status_code == 200
    delta = [answered(r) - b for r, b in zip(replicas, before, strict=True)]
    assert sum(delta) == 24 and min(delta) > 0, f"searches per replica {delta}"


def test_render_front_changes_only_the_replicas_and_the_listen_address():
    text = FRONT.read_text()
    rendered = render_front(text, ["10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3"], "127.0.0.1:9")
    drop = re.compile(r"^\s*(server 1\d\.0\.0\.\d|server 127\.0\.0\.1:\d+ |listen )")
    kept = [x for x in text.splitlines() if not drop.match(x)]
    assert kept == [x for x in rendered.splitlines() if not drop.match(x)]
    assert rendered.count("    server 10.0.0.") == 3
