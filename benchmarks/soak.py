"""Soak (issue 7 point 10): 500 concurrent clients of mixed viewer-like traffic for 60 s through the proxy.

    python benchmarks/soak.py [--connections 500] [--duration 60] [--workers 2] [--slices 100]

A fresh Orthanc with a CT study (benchmarks/stack.py), the proxy with `--workers 2` and a cache dir in
front of it, and wrk (2 threads, C, little CPU: Python clients cannot drive 500 connections on 2 cores
without becoming the bottleneck) running benchmarks/soak.lua, which picks each request from a weighted
mix: frames mostly, series metadata, searches, instance retrieves, rendered images. Meanwhile the
proxy's RSS and open fds (master + workers) are sampled once a second. At the end: responses by status,
the proxy's own counters (dicomweb_edge_requests_total by service and status, upstream errors by kind)
to tell 5xx the proxy caused from 5xx the archive caused, peak RSS and fds. Writes a section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from procstats import children, fd_count, rss_bytes  # noqa: E402

LUA = REPO / "benchmarks" / "soak.lua"
FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
INSTANCE = 'multipart/related; type="application/dicom"; transfer-syntax=*'
JSON = "application/dicom+json"


def viewer_mix(study: str, series: str, instances: list[str], root: str = "/dicomweb") -> list[tuple[int, str, str]]:
    """(weight, path, Accept): what a viewer opening and scrolling a CT asks for, frames mostly."""
    se = f"{root}/studies/{study}/series/{series}"
    mix = [(60 * 100 // len(instances) or 1, f"{se}/instances/{sop}/frames/1", FRAME) for sop in instances]
    mix += [(500, f"{se}/metadata", JSON), (300, f"{root}/studies?PatientName=BENCH*", JSON),
            (200, f"{root}/studies/{study}/series", JSON), (200, f"{se}/instances?limit=50", JSON)]
    mix += [(30, f"{se}/instances/{sop}", INSTANCE) for sop in instances[:10]]
    mix += [(30, f"{se}/instances/{sop}/rendered", "image/jpeg") for sop in instances[:10]]
    return mix


@dataclass
class Sampler:
    """RSS and fds of a process and its children, once a second, in a thread."""

    pid: int
    interval: float = 1.0
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss bytes, fds)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> tuple[int, int]:
        pids = [self.pid, *children(self.pid)]
        return sum(rss_bytes(p) for p in pids), sum(fd_count(p) for p in pids)

    def start(self) -> Sampler:
        t0 = time.monotonic()

        def run() -> None:
            while not self._stop.is_set():
                rss, fds = self.sample()
                self.samples.append((time.monotonic() - t0, rss, fds))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, daemon=True, name="soak-sampler")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def counters(metrics_url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The proxy's requests and upstream error counters, by label set."""
    text = httpx.get(metrics_url, timeout=30, trust_env=False).text
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in ("dicomweb_edge_requests", "dicomweb_edge_upstream_errors", "dicomweb_edge_upstream_requests",
                        "dicomweb_edge_shared_failures"):
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out.setdefault(fam.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def diff(after: dict, before: dict) -> dict:
    return {name: {k: v - before.get(name, {}).get(k, 0.0) for k, v in fam.items()} for name, fam in after.items()}


def run_wrk(url: str, mix: list[tuple[int, str, str]], connections: int, duration: int, threads: int = 2) -> dict:
    """wrk with soak.lua; its JSON summary."""
    with tempfile.NamedTemporaryFile("w", suffix=".mix", delete=False) as f:
        f.writelines(f"{w}\t{p}\t{a}\n" for w, p, a in mix)
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--timeout", "30s",
           "-s", str(LUA), url, "--", f.name]
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime
    Path(f.name).unlink()
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return {**json.loads(line[5:]), "client_cpu_s": cpu}


def soak(proxy_url: str, proxy_pid: int, mix: list[tuple[int, str, str]], connections: int, duration: int,
         log: Path | None = None) -> dict:
    """Drive the mix through the proxy; statuses, the proxy's counters over the run, RSS/fd samples."""
    before = counters(proxy_url + "/metrics")
    sampler = Sampler(proxy_pid).start()
    try:
        result = run_wrk(proxy_url, mix, connections, duration)
    finally:
        sampler.stop()
    delta = diff(counters(proxy_url + "/metrics"), before)
    by_service: dict[str, dict[str, int]] = {}
    for labels, v in delta.get("dicomweb_edge_requests", {}).items():
        d = dict(labels)
        if v:
            by_service.setdefault(d["service"], {})[d["status"]] = int(v)
    upstream_errors = {dict(k)["kind"]: int(v) for k, v in delta.get("dicomweb_edge_upstream_errors", {}).items() if v}
    statuses = {int(k): v for k, v in result["statuses"].items()}
    fivexx = sum(v for s, v in statuses.items() if s >= 500)
    gateway = sum(v for s, v in statuses.items() if s in (502, 503, 504))
    unhandled = log.read_text(errors="replace").count("Exception in ASGI application") if log else 0
    # A 502/503/504 has an archive failure behind it when the proxy counted one (an error status, timeout,
    # reset...), or answered an identical request's archive failure it waited for (single-flight); anything
    # else (a 500, a 503 the proxy shed itself, gateway errors beyond the archive's failures) is the proxy's.
    shared = sum(int(v) for k, v in delta.get("dicomweb_edge_shared_failures", {}).items()
                 if dict(k)["status"] in ("502", "503", "504"))
    archive_caused = min(gateway, sum(upstream_errors.values()) + shared)
    return {**result, "statuses": statuses, "by_service": by_service, "upstream_errors": upstream_errors,
            "fivexx": fivexx, "archive_caused_5xx": archive_caused, "proxy_caused_5xx": fivexx - archive_caused,
            "unhandled_exceptions": unhandled, "samples": sampler.samples}


def shares(mix: list[tuple[int, str, str]]) -> str:
    """The mix per 100 requests, by kind."""
    kinds: dict[str, int] = {}
    for w, path, accept in mix:
        kind = ("frames" if "/frames/" in path else "rendered" if path.endswith("/rendered") else
                "series metadata" if path.endswith("/metadata") else "instance retrieves" if accept == INSTANCE
                else "searches")
        kinds[kind] = kinds.get(kind, 0) + w
    total = sum(kinds.values())
    return ", ".join(f"{100 * w / total:.0f} {k}" for k, w in sorted(kinds.items(), key=lambda kv: -kv[1]))


def report(r: dict, args: argparse.Namespace, argv: list[str], slices: int, orthanc: str,
           mix: list[tuple[int, str, str]]) -> str:
    samples = r["samples"]
    peak_rss = max(s[1] for s in samples)
    peak_fds = max(s[2] for s in samples)
    first_half = [s for s in samples if s[0] < args.duration / 2]
    second_half = [s for s in samples if s[0] >= args.duration / 2]
    rps = r["requests"] / r["duration_us"] * 1e6
    ok = r["proxy_caused_5xx"] == 0 and r["unhandled_exceptions"] == 0
    lines = [
        f"Command: `{' '.join(['python benchmarks/soak.py', *argv])}`<br>",
        f"Date: {datetime.now(UTC).isoformat(timespec='seconds')}<br>",
        f"Orthanc {orthanc} with one CT study ({slices} slices of 512x512), the proxy with "
        f"`--workers {args.workers}` and a cache dir (empty at the start); `wrk -t 2 -c {args.connections} "
        f"-d {args.duration}s --timeout 30s -s benchmarks/soak.lua`: each request drawn from a weighted viewer "
        f"mix (per 100: {shares(mix)}; frames spread over every slice). wrk is the client because 500 "
        "Python clients would need the 2 cores themselves; wrk used "
        f"{r['client_cpu_s'] / (r['duration_us'] / 1e6):.2f} of a core on average. RSS and fds of master + workers "
        "sampled once a second.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| responses | {r['requests']:,} ({rps:,.0f}/s), p50 {r['p50_us'] / 1000:.1f} ms, "
        f"p99 {r['p99_us'] / 1000:.1f} ms, max {r['max_us'] / 1000:.0f} ms |",
        "| by status | " + ", ".join(f"{s}: {n:,}" for s, n in sorted(r["statuses"].items())) + " |",
        f"| socket errors (connect/read/write/timeout) | {r['err_connect']}/{r['err_read']}/{r['err_write']}/"
        f"{r['err_timeout']} |",
        f"| 5xx | {r['fivexx']:,}: caused by the archive {r['archive_caused_5xx']:,}, by the proxy "
        f"**{r['proxy_caused_5xx']:,}** |",
        "| archive failures the proxy counted | " + (", ".join(f"{k}: {v}" for k, v in r["upstream_errors"].items())
                                                    or "none") + " |",
        f"| unhandled exceptions in the proxy log | {r['unhandled_exceptions']} |",
        f"| peak RSS, master + workers | {peak_rss / 2**20:.0f} MiB (first half "
        f"{max(s[1] for s in first_half) / 2**20:.0f}, second half {max(s[1] for s in second_half) / 2**20:.0f}) |",
        f"| peak open fds, master + workers | {peak_fds} (first half {max(s[2] for s in first_half)}, second half "
        f"{max(s[2] for s in second_half)}; {args.connections} client connections) |",
        "",
        "Per service (the proxy's dicomweb_edge_requests_total over the run): " + "; ".join(
            f"{svc} " + ", ".join(f"{st}: {n:,}" for st, n in sorted(by.items()))
            for svc, by in sorted(r["by_service"].items())) + ".",
        "",
        f"Result: **{'PASS' if ok else 'FAIL'}** (zero 5xx caused by the proxy, no unhandled exception).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from stack import WORK, Stack, on_sigterm, replace_section

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=500)
    ap.add_argument("--duration", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    on_sigterm()
    work = WORK / "soak"
    with Stack(work, slices=args.slices, workers=args.workers, nginx=False,
               proxy_args=["--cache-dir", str(work / "frame-cache")]) as st:
        assert st.orthanc is not None and st.proxy is not None
        instances = httpx.get(f"{st.orthanc.dicomweb_url}/studies/{st.uids['study']}/series/{st.uids['series']}"
                              "/instances", trust_env=False, timeout=60).json()
        sops = [i["00080018"]["Value"][0] for i in instances]
        mix = viewer_mix(st.uids["study"], st.uids["series"], sops)
        proxy_url = f"http://127.0.0.1:{st.proxy_port}"
        result = soak(proxy_url, st.proxy.pid, mix, args.connections, args.duration, st.proxy_log)
        body = report(result, args, argv, args.slices, st.orthanc_version, mix)
    replace_section(args.out, "## Soak: 500 concurrent viewer clients for 60 s (issue 7)", body)
    print(body)
    return 0 if result["proxy_caused_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
