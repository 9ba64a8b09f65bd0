"""Issue 2 benchmark: Orthanc direct vs the transparent proxy vs nginx serving the same bytes, with wrk.

    python benchmarks/run.py [--duration 5] [--repeat 3] [--concurrency 1,32] [--workers 2]
                             [--out benchmarks/RESULTS.md] [--only qido,frame,series] [--hold]

Sets up a fresh Orthanc with a 200-slice 512x512 CT (stack.py), the proxy (`--workers`) in front of it
and nginx with Orthanc's exact response bodies, runs `wrk -t min(c,2) -c c -d DURATION --timeout 30s`
`--repeat` times per target x concurrency x server, and writes the medians, the issue's ratios and the
raw runs into the "## Transparent proxy (issue 2)" section of RESULTS.md. The c=1 latency targets are
also measured with a blocking sequential client (sequential.py). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from sequential import probe
from stack import REPO, WORK, ForeignCpu, Stack, code_state, on_sigterm, replace_section, tail, versions, wire_size

SERVERS = ("orthanc", "proxy", "nginx-proxy", "nginx")
TARGETS = ("qido", "frame", "series")
SECTION = "## Transparent proxy (issue 2)"
SERIES_MAX_CONC = 4  # 32 connections each pulling 105 MB would only measure memory and the scheduler
LUA = Path(__file__).resolve().with_name("report.lua")
SERIES_RATIO_MIN = 0.8
ADDED_P50_MAX_MS = 2.0
SEQUENTIAL_TARGETS = ("qido", "frame")  # the c=1 latency targets, also measured with a blocking client
SEQUENTIAL_SERVERS = ("orthanc", "proxy", "nginx-proxy")
SEQUENTIAL_REQUESTS = 300
TITLES = {
    "qido": "QIDO `GET /studies?PatientName=BENCH*` (1 match)",
    "frame": "Single frame `GET …/instances/I/frames/1` (512 KB, `transfer-syntax=*`)",
    "series": "Series retrieve `GET …/studies/S/series/X` (200 instances, `transfer-syntax=*`)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--repeat", type=int, default=3, help="wrk runs per cell; the median is reported (default 3)")
    p.add_argument("--concurrency", default="1,32", help="comma-separated connection counts (default 1,32)")
    p.add_argument("--workers", type=int, default=2, help="proxy worker processes (default 2)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    p.add_argument("--only", default=",".join(TARGETS), help="subset of qido,frame,series")
    p.add_argument("--slices", type=int, default=200, help="CT slices in the series (default 200)")
    p.add_argument("--proxy-rev", metavar="REV",
                   help="run the proxy from a clean `git archive REV proxy` instead of the work tree")
    p.add_argument("--hold", action="store_true", help="set up the stack, print its URLs and wait for Ctrl-C")
    args = p.parse_args(argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    args.only = [t for t in TARGETS if t in {x.strip() for x in args.only.split(",")}]
    if not args.only or not args.concurrency or min(args.concurrency) < 1:
        p.error("--only needs one of qido,frame,series and --concurrency positive numbers")
    return args


def wrk(url: str, accept: str | None, conc: int, duration: int, pgids: frozenset[int] = frozenset(),
        headers: tuple[str, ...] = ()) -> dict:
    """One wrk run: the numbers report.lua prints, the 1-minute load average before and after, and the
    cores other sessions kept busy meanwhile (everything but wrk, this process and the `pgids`).
    `headers`: more request headers ("Name: value")."""
    cmd = ["wrk", "-t", str(min(conc, 2)), "-c", str(conc), "-d", f"{duration}s", "--timeout", "30s",
           "-s", str(LUA)]
    if accept:
        cmd += ["-H", f"Accept: {accept}"]
    for header in headers:
        cmd += ["-H", header]
    load_before = os.getloadavg()[0]
    foreign = ForeignCpu(set(pgids))
    foreign.start()
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=duration + 90)
    other = foreign.stop()
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return {**json.loads(line[5:]), "load_before": load_before, "load_after": os.getloadavg()[0],
            "other_cores": round(other, 3)}


def cell_concurrency(target: str, conc: int) -> int:
    return min(conc, SERIES_MAX_CONC) if target == "series" else conc


def measure(st: Stack, args: argparse.Namespace) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """All wrk runs, servers interleaved within each repetition so that drift hits them alike."""
    expected: dict[str, dict[str, int]] = {}
    for t in args.only:
        for s in SERVERS:
            status, size = wire_size(st.url(s, t), st.targets[t].accept)
            if status != 200:
                raise RuntimeError(f"{s} answered {status} for {t} ({st.url(s, t)}); not measuring.\n"
                                   f"Proxy log tail:\n{tail(st.proxy_log)}")
            expected.setdefault(t, {})[s] = size
    runs: list[dict] = []
    pg = frozenset(st.pgids())
    for target in args.only:
        accept = st.targets[target].accept
        concs = sorted({cell_concurrency(target, c) for c in args.concurrency})
        for server in SERVERS:  # warm-up, not recorded: pools, page cache, Orthanc's caches
            wrk(st.url(server, target), accept, concs[0], 1, pg)
        for conc in concs:
            for rep in range(args.repeat):
                for server in SERVERS:
                    r = wrk(st.url(server, target), accept, conc, args.duration, pg)
                    runs.append({"target": target, "server": server, "conc": conc, "rep": rep + 1, **r})
                    rps = r["requests"] / r["duration_us"] * 1e6
                    print(f"{target:6} c={conc:<3} {server:7} rep {rep + 1}: {rps:9.1f} req/s  "
                          f"p50 {r['p50_us'] / 1000:7.2f} ms  errors read={r['err_read']} status={r['err_status']}",
                          flush=True)
    return runs, expected


def measure_sequential(st: Stack, args: argparse.Namespace) -> dict[tuple[str, str], list[float]]:
    """c=1 latency with a blocking client (sequential.py): p50 ms per repetition, servers interleaved."""
    seq: dict[tuple[str, str], list[float]] = {}
    if 1 not in args.concurrency:
        return seq
    for target in [t for t in args.only if t in SEQUENTIAL_TARGETS]:
        for rep in range(args.repeat):
            for server in SEQUENTIAL_SERVERS:
                p50 = probe(st.url(server, target), st.targets[target].accept, SEQUENTIAL_REQUESTS) * 1000
                seq.setdefault((target, server), []).append(p50)
                print(f"{target:6} sequential {server:11} rep {rep + 1}: p50 {p50:7.2f} ms", flush=True)
    return seq


def sequential_rows(seq: dict[tuple[str, str], list[float]]) -> list[tuple[str, str, str, str]]:
    """The issue 2 latency targets as the sequential client sees them."""
    rows = []
    for target in SEQUENTIAL_TARGETS:
        if (target, "orthanc") not in seq:
            continue
        direct = statistics.median(seq[(target, "orthanc")])
        for server, label in (("proxy", ""), ("nginx-proxy", "reference: ")):
            p50 = statistics.median(seq[(target, server)])
            added = p50 - direct
            who = "proxy" if server == "proxy" else "nginx proxy_pass"
            rows.append((f"{label}{target} added p50 {who} − direct, c=1, sequential client",
                         f"{added:+.2f} ms ({p50:.2f} − {direct:.2f})",
                         f"≤ {ADDED_P50_MAX_MS:g} ms" if server == "proxy" else "",
                         verdict(added <= ADDED_P50_MAX_MS) if server == "proxy" else "—"))
    return rows


def summarize(runs: list[dict], expected: int) -> dict:
    """Medians over the repetitions of one cell, and the sanity flags for it."""
    rps = [r["requests"] / r["duration_us"] * 1e6 for r in runs]
    conc, target, server = runs[0]["conc"], runs[0]["target"], runs[0]["server"]
    cell = {
        "rps": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps),
        "mbs": statistics.median(r["bytes"] / r["duration_us"] for r in runs),
        "p50": statistics.median(r["p50_us"] for r in runs) / 1000,
        "p99": statistics.median(r["p99_us"] for r in runs) / 1000,
        "bpr": statistics.median(r["bytes"] / max(r["requests"], 1) for r in runs),
        "other": statistics.median(r["other_cores"] for r in runs),
        "expected": expected, "errors": {}, "flags": [],
    }
    for kind in ("connect", "read", "write", "status", "timeout"):
        n = sum(r[f"err_{kind}"] for r in runs)
        if n:
            cell["errors"][kind] = n
    eof_framed = server == "orthanc" and target == "series"  # Connection: close, body ends at EOF
    for r in runs:
        if r["requests"] == 0:
            cell["flags"].append(f"rep {r['rep']}: no completed request")
            continue
        ratio = r["bytes"] / (r["requests"] * expected)
        upper = 1.02 + conc / r["requests"]  # each connection may hold one unfinished response at the end
        if not 0.98 <= ratio <= upper:
            cell["flags"].append(f"rep {r['rep']}: bytes/request is {ratio:.3f}× the expected {expected:,} B")
        bad = {k: r[f"err_{k}"] for k in ("connect", "write", "status", "timeout") if r[f"err_{k}"]}
        if eof_framed and r["err_read"] > r["requests"] + conc:
            bad["read"] = r["err_read"]
        elif not eof_framed and r["err_read"]:
            bad["read"] = r["err_read"]
        if bad:
            cell["flags"].append(f"rep {r['rep']}: errors {bad}")
    return cell


def ratios(cells: dict[tuple[str, int, str], dict]) -> list[tuple[str, str, str, str]]:
    """(metric, value, target, verdict) for what issue 2 tracks."""
    rows = []
    for (target, conc, server), proxy in sorted(cells.items(), key=lambda kv: (kv[0][2] != "proxy", kv[0])):
        if server not in ("proxy", "nginx-proxy") or (target, conc, "orthanc") not in cells:
            continue
        if server == "nginx-proxy":  # the reference: what a C reverse proxy costs on the same hop
            direct = cells[(target, conc, "orthanc")]
            if target == "series":
                value = f"{proxy['mbs'] / direct['mbs']:.2f} ({proxy['mbs']:,.0f} / {direct['mbs']:,.0f})"
                rows.append((f"reference: series MB/s nginx proxy_pass / direct, c={conc}", value, "", "—"))
            elif conc == 1:
                rows.append((f"reference: {target} added p50 nginx proxy_pass − direct, c=1",
                             f"{proxy['p50'] - direct['p50']:+.2f} ms", "", "—"))
            continue
        direct = cells[(target, conc, "orthanc")]
        if proxy["flags"] or direct["flags"]:
            rows.append((f"{target} c={conc}", "not computed: see sanity checks", "",
                         "**FAIL**" if proxy["flags"] else "n/a"))
            continue
        if target == "series":
            value = proxy["mbs"] / direct["mbs"]
            rows.append((f"series MB/s proxy / direct, c={conc}", f"{value:.2f} ({proxy['mbs']:,.0f} / "
                         f"{direct['mbs']:,.0f})", f"≥ {SERIES_RATIO_MIN}", verdict(value >= SERIES_RATIO_MIN)))
        elif conc == 1:
            added = proxy["p50"] - direct["p50"]
            rows.append((f"{target} added p50 latency proxy − direct, c=1", f"{added:+.2f} ms ({proxy['p50']:.2f} − "
                         f"{direct['p50']:.2f})", f"≤ {ADDED_P50_MAX_MS:g} ms", verdict(added <= ADDED_P50_MAX_MS)))
    return rows


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def fmt_cell(target: str, conc: int, server: str, c: dict) -> str:
    errors = ", ".join(f"{k} {v:,}" for k, v in c["errors"].items()) or "0"
    if server == "orthanc" and target == "series" and set(c["errors"]) == {"read"}:
        errors += " (EOF-framed, expected)"
    return (f"| {conc} | {server} | {c['rps']:,.1f} ({c['rps_min']:,.1f}–{c['rps_max']:,.1f}) | {c['mbs']:,.1f} | "
            f"{c['p50']:.2f} | {c['p99']:.2f} | {c['bpr']:,.0f} / {c['expected']:,} | {errors} | {c['other']:.2f} |"
            + (" ⚠" if c["flags"] else ""))


def render(args: argparse.Namespace, st: Stack, runs: list[dict], cells: dict, info: dict) -> str:
    capped = [c for c in args.concurrency if c > SERIES_MAX_CONC] if "series" in args.only else []
    out = [
        f"Command: `{info['command']}`  ",
        f"Date: {info['date']}  ",
        f"Machine: {info['v']['nproc']} cores ({info['v']['cpu']}), kernel {info['v']['kernel']}, "
        f"Python {info['v']['python']}  ",
        "Software: " + ", ".join(f"{k} {info['v'][k]}" for k in ("uvicorn", "aiohttp", "httpx", "starlette",
                                                                  "uvloop", "httptools"))
        + f"; Orthanc {st.orthanc_version} + DICOMweb plugin; {info['v']['nginx']}; {info['v']['wrk']}  ",
        f"Proxy: `python -m proxy.cli serve --upstream bench=… --workers {args.workers}` (otherwise default "
        f"settings), code: {info['code']}  ",
        f"Load average (1 min): {info['load_start']:.2f} before setup; {info['load_min']:.2f}–{info['load_max']:.2f} "
        f"at the start/end of the wrk runs (includes our own wrk and servers); {info['load_end']:.2f} after "
        "teardown. Other sessions may share this machine: 'other load' is the median number of cores kept "
        "busy during a cell's runs by processes other than wrk, Orthanc, the proxy and nginx "
        f"(over all runs: median {info['other_med']:.2f}, max {info['other_max']:.2f} of {info['v']['nproc']}).",
        "",
        f"Method: `wrk -t min(c,2) -c c -d {args.duration}s --timeout 30s -s benchmarks/report.lua`, {args.repeat} "
        "runs per cell, servers interleaved within each repetition, after a 1 s unrecorded warm-up per "
        "target and server. Medians of req/s, MB/s (bytes read / duration, headers included, 1 MB = 10⁶ B), "
        "p50 and p99; req/s also as (min–max). wrk, Orthanc, the proxy and nginx share the cores. "
        f"Study: {args.slices} CT slices 512×512; body sizes from Orthanc: "
        + ", ".join(f"{t} {n:,} B" for t, n in st.body_sizes.items() if t in args.only) + ". "
        "nginx (2 workers, sendfile) serves those exact bodies as static files; 'nginx-proxy' is the same nginx "
        "as a reverse proxy (proxy_pass, kept-alive upstream connections, default buffering) in front of the "
        "same Orthanc: the cost of one more hop through a C proxy on this machine. "
        "'bytes/req / expected' compares wrk's bytes per completed request with one response as read on the "
        "wire from that server (the proxy re-frames multipart under its own boundary and chunked encoding, "
        "so its size differs slightly)."
        + (f" Series runs at c={','.join(map(str, capped))} were capped at c={SERIES_MAX_CONC}." if capped else ""),
        "",
        "### Ratios tracked by issue 2",
        "",
        "| metric | value | target | result |",
        "|---|---|---|---|",
        *[f"| {m} | {v} | {t} | {r} |" for m, v, t, r in ratios(cells) + sequential_rows(info["sequential"])],
    ]
    if info["sequential"]:
        out += ["", "The 'sequential client' rows: one keep-alive connection, one request at a time, a blocking "
                f"Python socket client (`benchmarks/sequential.py`, {SEQUENTIAL_REQUESTS} requests after 20 "
                "unrecorded, median; medians of the repetitions), which is how `dicomweb-client` and scripts "
                "ask. wrk's event loop sees a larger added latency for the same servers on this machine; both "
                "are reported, and the issue's target is judged on each.", "",
                "| target | " + " | ".join(f"{s} p50 ms (per rep)" for s in SEQUENTIAL_SERVERS) + " |",
                "|---|" + "---|" * len(SEQUENTIAL_SERVERS)]
        for target in SEQUENTIAL_TARGETS:
            if (target, "orthanc") in info["sequential"]:
                out.append(f"| {target} | " + " | ".join(
                    f"{statistics.median(info['sequential'][(target, s)]):.2f} ("
                    + ", ".join(f"{x:.2f}" for x in info["sequential"][(target, s)]) + ")"
                    for s in SEQUENTIAL_SERVERS) + " |")
    for target in args.only:
        out += ["", f"### {TITLES[target]}", "",
                "| c | server | req/s (min–max) | MB/s | p50 ms | p99 ms | bytes/req / expected | errors "
                "| other load |",
                "|---|---|---|---|---|---|---|---|---|"]
        out += [fmt_cell(t, c, s, cell) for (t, c, s), cell in sorted(cells.items(), key=order) if t == target]
    flags = [f"- {t} c={c} {s}: {f}" for (t, c, s), cell in sorted(cells.items(), key=order) for f in cell["flags"]]
    out += ["", "### Sanity checks", "", *(flags or ["- Every cell: bytes/request matches the body size; no errors "
                                                    "other than Orthanc's EOF-framed series responses."])]
    if info["proxy_log"]:
        out += ["", f"Proxy log: {info['proxy_problems']} warning/error lines; its last 30 lines:", "", "```",
                info["proxy_log"], "```"]
    out += ["", "<details><summary>Raw wrk runs (JSON)</summary>", "", "```json",
            json.dumps({"uids": st.uids, "expected_wire_bytes": info["expected"], "runs": runs}, indent=1), "```",
            "", "</details>"]
    return "\n".join(out)


def order(item: tuple[tuple[str, int, str], dict]) -> tuple[int, int, int]:
    (t, c, s), _ = item
    return TARGETS.index(t), c, SERVERS.index(s)


def proxy_problems(log: Path) -> tuple[int, str]:
    """How many warning/error lines the proxy logged, and the log's tail when there are any."""
    if not log.exists():
        return 0, ""
    bad = sum(1 for ln in log.read_text(errors="replace").splitlines()
              if re.search(r'\b(WARNING|ERROR|CRITICAL)\b|"level":"(warning|error|critical)"|Traceback', ln))
    return bad, tail(log, 30) if bad else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_sigterm()
    info: dict = {"command": shlex.join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
                  "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "load_start": os.getloadavg()[0], "v": versions(), "code": code_state(args.proxy_rev)}
    workdir = WORK / "transparent"
    print(f"setting up in {workdir} ({args.slices} slices, proxy workers {args.workers}) …", flush=True)
    with Stack(workdir, slices=args.slices, workers=args.workers, proxy_rev=args.proxy_rev) as st:
        print(f"orthanc {st.orthanc.url}  proxy :{st.proxy_port} (workers {st.worker_pids()})  "
              f"nginx :{st.nginx_port}", flush=True)
        if args.hold:
            for t in args.only:
                print(f"{t}: accept={st.targets[t].accept!r}\n  " + "\n  ".join(st.url(s, t) for s in SERVERS))
            print("holding; Ctrl-C to tear down", flush=True)
            while True:
                signal.pause()
        runs, expected = measure(st, args)
        info["sequential"] = measure_sequential(st, args)
        info["proxy_problems"], info["proxy_log"] = proxy_problems(st.proxy_log)
        if info["proxy_problems"]:
            print(f"proxy log tail:\n{tail(st.proxy_log)}")
        groups: dict[tuple[str, int, str], list[dict]] = {}
        for r in runs:
            groups.setdefault((r["target"], r["conc"], r["server"]), []).append(r)
        cells = {k: summarize(v, expected[k[0]][k[2]]) for k, v in groups.items()}
        loads = [x for r in runs for x in (r["load_before"], r["load_after"])]
        other = [r["other_cores"] for r in runs]
        info.update(load_min=min(loads), load_max=max(loads), expected=expected,
                    other_med=statistics.median(other), other_max=max(other))
    info["load_end"] = os.getloadavg()[0]
    body = render(args, st, runs, cells, info)
    replace_section(args.out, SECTION, body)
    print("\n".join(ln for ln in body.splitlines() if ln.startswith("|")))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: everything the benchmark started has been stopped", file=sys.stderr)
        sys.exit(130)
