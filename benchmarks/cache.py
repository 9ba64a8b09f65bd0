"""Cached frames: the proxy serving hits, against Orthanc direct and nginx serving the same bytes (issue 4).

    python benchmarks/cache.py [--duration 5] [--repeat 3] [--concurrency 1,32] [--workers 2]

One run: a fresh Orthanc with a CT study, the proxy with `--cache-dir` in front of it, nginx serving
the exact frame body Orthanc sends as a static file. The frame is read once through the proxy (a miss
that fills the cache), then wrk measures the three servers on the same frame URL, interleaved, and the
proxy once more with an `Origin` header: a viewer served from another origin (the proxy runs with that
origin in `cors_origins`) sends one with every request.
Targets: cached single-frame throughput >= 0.5x nginx and >= 5x Orthanc direct.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from run import wrk  # noqa: E402
from stack import WORK, Stack, on_sigterm, replace_section, versions  # noqa: E402

SERVERS = ("orthanc", "proxy", "nginx", "proxy, Origin")
ORIGIN = "https://viewer.example.org"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    on_sigterm()
    os.environ["DICOMWEB_EDGE_CORS_ORIGINS"] = ORIGIN
    mode = "writes from the memory tier"
    work = WORK / "cache"
    concs = [int(c) for c in args.concurrency.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {}
    with Stack(work, slices=20, workers=args.workers,
               proxy_args=["--cache-dir", str(work / "frame-cache")]) as st:
        accept = st.targets["frame"].accept
        warm = httpx.get(st.url("proxy", "frame"), headers={"Accept": accept}, trust_env=False, timeout=60)
        assert warm.status_code == 200, warm.text[:200]
        hit = httpx.get(st.url("proxy", "frame"), headers={"Accept": accept}, trust_env=False, timeout=60)
        assert hit.headers.get("x-cache") == "HIT", dict(hit.headers)
        pg = frozenset(st.pgids())

        def measure(server: str, conc: int, duration: int) -> dict:
            name, _, origin = server.partition(", ")
            return wrk(st.url(name, "frame"), accept, conc, duration, pg, (f"Origin: {ORIGIN}",) if origin else ())

        for server in SERVERS:
            measure(server, 1, 1)  # warm-up, not recorded
        for conc in concs:
            for _ in range(args.repeat):
                for server in SERVERS:
                    r = measure(server, conc, args.duration)
                    runs.setdefault((server, conc), []).append(r)
                    print(f"c={conc:<3} {server:13} {r['requests'] / r['duration_us'] * 1e6:9.1f} req/s", flush=True)
        size = st.body_sizes["frame"]

    def rps(server: str, conc: int) -> float:
        return statistics.median(r["requests"] / r["duration_us"] * 1e6 for r in runs[(server, conc)])

    def p50(server: str, conc: int) -> float:
        return statistics.median(r["p50_us"] for r in runs[(server, conc)]) / 1000

    lines = [
        f"Command: `python benchmarks/cache.py {' '.join(argv if argv is not None else sys.argv[1:])}`<br>",
        f"Date: {datetime.now(UTC).isoformat(timespec='seconds')}<br>",
        "Software: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        f"One 512x512 CT frame ({size:,} B body, `transfer-syntax=*`), the proxy with `--cache-dir` and "
        f"`--workers {args.workers}` after one miss filled the cache, hits sent as {mode}; "
        f"`wrk -t min(c,2) -c c -d {args.duration}s`, "
        f"{args.repeat} runs per cell, servers interleaved, medians. \"proxy, Origin\": the same requests with "
        f"`Origin: {ORIGIN}`, an origin in the proxy's `cors_origins` (a viewer served from elsewhere).",
        "",
        "| c | server | req/s | p50 ms |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c} | {s} | {rps(s, c):,.0f} | {p50(s, c):.2f} |" for c in concs for s in SERVERS]
    lines += ["", "| metric | value | target | result |", "|---|---|---|---|"]
    for c in concs:
        vs_nginx, vs_direct = rps("proxy", c) / rps("nginx", c), rps("proxy", c) / rps("orthanc", c)
        lines.append(f"| cached / nginx, c={c} | {vs_nginx:.2f} | ≥ 0.5 | "
                     f"**{'PASS' if vs_nginx >= 0.5 else 'FAIL'}** |")
        lines.append(f"| cached / Orthanc direct, c={c} | {vs_direct:.2f} | ≥ 5 | "
                     f"**{'PASS' if vs_direct >= 5 else 'FAIL'}** |")
        # What the fastest server of the same bytes reaches against the same Orthanc with the same client:
        # where it is below 5x too, the client and the machine bound the ratio, not the proxy.
        lines.append(f"| reference: nginx static / Orthanc direct, c={c} | "
                     f"{rps('nginx', c) / rps('orthanc', c):.2f} | | — |")
        lines.append(f"| cached with Origin / nginx, c={c} | {rps('proxy, Origin', c) / rps('nginx', c):.2f} | | — |")
    body = "\n".join(lines) + "\n"
    heading = "## Cached single frame (issue 4)"
    replace_section(args.out, heading, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
