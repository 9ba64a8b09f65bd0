"""Metrics, dashboards and alerts against a real Prometheus (issue 6 points 1-3).

A proxy with two workers sits in front of a real Orthanc and an archive that is down; a real Prometheus
(Debian `prometheus`) scrapes it every second with our alert rules loaded. The test drives viewer-like
traffic, then asks Prometheus's HTTP API for what an operator would look at.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_support import Prometheus, binary
from support import ProxyProcess, free_port

from proxy.config import load
from proxy.runtime import create_app

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "dicomweb-edge.json"
ANY = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
GRAFANA_VARS = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, Grafana variables filled in."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def rule_queries() -> list[tuple[str, str]]:
    import yaml

    doc = yaml.safe_load(RULES.read_text())
    return [(r.get("alert") or r["record"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that name metrics (not functions, keywords, labels or recordings)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*(?:\{|\)|$|\s|\[|/|>|<|=|\*|-|\+))", expr))
    functions = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "and",
                 "or", "unless", "label_values", "abs", "clamp_min", "time", "vector", "scalar", "bool"}
    return {n for n in names if n not in functions and ":" not in n and not n.isdigit()}


async def test_dashboards_and_alerts_only_use_metrics_the_proxy_exports(tmp_path):
    """Static check: every metric name in a panel or a rule is one /metrics exports (or Prometheus's own)."""
    app = create_app(load(None, {"archives": [{"name": "a", "url": "http://127.0.0.1:9/dicom-web"}],
                                 "cache_dir": str(tmp_path / "cache"), "health_interval": 0}, environ={}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        text = (await client.get("/metrics")).text
    exported = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        suffixes = {"histogram": ["_bucket", "_sum", "_count"], "counter": ["_total"] if not name.endswith(
            "_total") else [""]}.get(kind, [""])
        exported |= {name + s for s in suffixes}
    assert "dicomweb_edge_requests_total" in exported and "dicomweb_edge_cache_disk_bytes" in exported
    queries = dashboard_queries() + rule_queries()
    assert len(queries) > 20
    unknown = {(where, n) for where, q in queries for n in metric_names(q) if n not in exported | PROMETHEUS_OWN}
    assert not unknown, f"names the proxy does not export: {sorted(unknown)}"
    # and the check itself can fail: a made-up name is caught
    assert metric_names('sum(rate(dicomweb_edge_made_up_total{a="b"}[5m]))') == {"dicomweb_edge_made_up_total"}


def test_rules_pass_promtool():
    promtool = binary("promtool")
    for cmd in (["check", "rules", str(RULES)], ["test", "rules", str(RULES.with_name("alerts_test.yml"))],
                ["check", "config", str(RULES.with_name("prometheus.yml"))]):
        r = subprocess.run([promtool, *cmd], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture()
def stack(orthanc_a, tmp_path):
    gone = f"http://127.0.0.1:{free_port()}/dicom-web"
    with ProxyProcess({"a": orthanc_a.dicomweb_url, "gone": gone}, tmp_path / "proxy",
                      ["--workers", "2", "--cache-dir", str(tmp_path / "cache")]) as proxy:
        prom = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{proxy.port}")
        try:
            yield proxy, prom
        finally:
            prom.stop()


def test_prometheus_sees_what_the_proxy_did(stack, demo_data):
    proxy, prom = stack
    ct = next(ds for ds in demo_data.archive_a if ds.StudyInstanceUID == demo_data.uids["ct_study"])
    study = f"{proxy.dicomweb_url}/studies/{ct.StudyInstanceUID}"
    frame = f"{study}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}/frames/1"
    sent: dict[str, int] = {"qido": 0, "metadata": 0, "frames": 0}
    with httpx.Client(trust_env=False, timeout=30, headers={"Connection": "close"}) as c:  # spread over workers
        for _ in range(3):
            assert c.get(f"{proxy.dicomweb_url}/studies").status_code == 200  # partial: 'gone' is down
            sent["qido"] += 1
        for _ in range(2):
            assert c.get(f"{study}/metadata").status_code == 200
            sent["metadata"] += 1
        def disk_entries() -> float:
            found = re.search(r"^dicomweb_edge_cache_disk_entries (\S+)$", c.get(f"{proxy.url}/metrics").text, re.M)
            return float(found.group(1))
        before = disk_entries()
        assert c.get(frame, headers=ANY).headers["x-cache"] == "MISS"
        sent["frames"] += 1
        deadline = time.monotonic() + 20  # the disk write happens off the event loop: wait for it, bounded
        while disk_entries() < before + 2:  # the frame and its encoding index
            assert time.monotonic() < deadline, "the frame never reached the disk tier"
            time.sleep(0.05)
        for _ in range(3):
            assert c.get(frame, headers=ANY).headers["x-cache"] == "HIT"  # whichever worker answers
            sent["frames"] += 1
        assert c.get(f"{proxy.url}/upstreams/gone/dicomweb/studies").status_code == 502
        # A study the live archive does not hold may be on the one that is down: unavailable, not missing.
        r = c.get(f"{proxy.dicomweb_url}/studies/1.2.3.999/metadata")
        assert r.status_code == 502 and "archive 'gone'" in r.headers["warning"]
        assert c.get(f"{proxy.dicomweb_url}/studies/not-a-uid/metadata").status_code == 400  # a client error
        text = c.get(f"{proxy.url}/metrics").text

    r = subprocess.run([binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    assert ct.StudyInstanceUID not in text and "DOE" not in text

    def scraped_everything() -> bool:
        return prom.value('sum(dicomweb_edge_requests_total{service="frames"})') == sent["frames"]
    prom.wait_until(scraped_everything, "the frame requests in Prometheus")
    prom.wait_until(lambda: prom.value("count(up == 1)") == 1 and len(prom.query(
        "dicomweb_edge_requests_total[5s]")[0]["values"]) >= 2, "two scrapes after the traffic")

    # Requests from both workers, added up, by service and status
    for service, n in sent.items():
        assert prom.value(f'sum(dicomweb_edge_requests_total{{service="{service}",status="200"}})') == n
    assert prom.value('sum(dicomweb_edge_requests_total{status="502"})') == 2  # /upstreams/gone, the unknown study
    assert prom.value('sum(dicomweb_edge_request_duration_seconds_count{service="frames",code="2xx"})') == 4
    p99 = prom.value('histogram_quantile(0.99, sum by (le) (dicomweb_edge_request_duration_seconds_bucket))')
    assert 0 < p99 < 30
    assert prom.value('sum(dicomweb_edge_request_ttfb_seconds_count{service="frames"})') == 4
    assert prom.value('sum(dicomweb_edge_response_bytes_total{service="frames"})') >= 4 * 512 * 512 * 2
    # Per archive: health, errors by kind, federation degraded but answered
    assert prom.value('max(dicomweb_edge_archive_up{archive="a"})') == 1
    assert prom.value('max(dicomweb_edge_archive_up{archive="gone"})') == 0
    assert prom.value('sum(dicomweb_edge_upstream_errors_total{archive="gone",kind="unreachable"})') >= 3
    assert prom.value('sum(dicomweb_edge_upstream_errors_total{archive="a"})') == 0
    assert prom.value('sum(dicomweb_edge_search_partial_total{archive="gone"})') >= 3
    assert prom.value('sum(dicomweb_edge_search_fanout_archives_count)') >= 3
    assert prom.value('sum(dicomweb_edge_upstream_received_bytes_total{archive="a"})') > 512 * 512 * 2
    # Cache: the three repeated frame requests were hits, and the disk tier holds the frame
    hits = prom.value('sum(dicomweb_edge_cache_lookups_total{kind="frame",result="hit"})')
    assert hits >= 3
    assert prom.value('sum(dicomweb_edge_cache_hit_bytes_total{kind="frame"})') >= 3 * 512 * 512 * 2
    assert prom.value("max(dicomweb_edge_cache_disk_entries)") >= 1
    assert prom.value("max(dicomweb_edge_cache_disk_limit_bytes)") == 10 * 1024**3
    assert prom.value("min(dicomweb_edge_cache_writable)") == 1
    assert prom.value("max(dicomweb_edge_build_info)") == 1

    # Every dashboard query and every rule runs in this Prometheus, and every panel shows something
    for _, expr in dashboard_queries() + rule_queries():
        prom.query(expr)  # asserts status success
    empty = [title for title, exprs in _by_panel(dashboard_queries()).items()
             if not any(prom.query(e) for e in exprs)]
    assert not empty, f"panels with no data after the traffic: {empty}"
    groups = httpx.get(f"{prom.api}/rules", trust_env=False).json()["data"]["groups"]
    bad = [r["name"] for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert len(groups) == 3 and not bad, bad


def _by_panel(queries: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for title, expr in queries:
        out.setdefault(title, []).append(expr)
    return out
