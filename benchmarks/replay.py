"""A viewer-like replay: Orthanc direct vs the proxy with its frame cache, with and without prefetch (issue 4).

    python benchmarks/replay.py [--viewers 4] [--slices 200] [--rounds 3] [--workers 2,1] [--against REV]

One viewer = what OHIF does to open a CT: study search, series search, the series metadata (one
keep-alive connection, stdlib `http.client`), then every frame of the series with 6 requests in flight
(`curl --parallel --parallel-max 6`). Both clients are thin C-backed readers, so the client is not what
is measured: httpx, used here before, spent 3-5 ms more than curl per viewer on the three JSON answers
(the 670 KB metadata most), a cost that weighed on the proxy's short viewers only. Viewers run one
after the other, each timed from its first request to its last byte (curl already started, waiting
for its list of frames: its process start is the harness's cost, not the server's). Modes, each from
a cold start:
Orthanc direct; for each worker count, the proxy with a fresh cache and prefetch off, and with
prefetch on. Worker counts: 2 (deploy/docker, deploy/kubernetes) and 1 (the default). `--against REV`
adds, for each worker count, the proxy of another revision (a clean export of its `proxy/`) with prefetch
on, interleaved with the rest: a before/after in one run.
A reference mode, nginx serving as static files the very bodies Orthanc sends for every request of the
viewer, shows the floor: the fastest any cache could answer this viewer with these clients on this machine.
Targets: the second viewer through the proxy >= 5x faster than against Orthanc directly; with prefetch
on, the first viewer faster than direct.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from stack import (  # noqa: E402
    ACCEPT_FRAME,
    NGINX_HTTP,
    NGINX_TOP,
    PATIENT,
    WORK,
    Stack,
    code_state,
    export,
    free_port,
    on_sigterm,
    replace_section,
    spawn,
    versions,
    wait_http,
)
from support import ProxyProcess  # noqa: E402


def viewer(base: str, study: str, series: str, sops: list[str]) -> float:
    """One viewer opening the study: seconds from the first request to the last byte.

    curl is started before the clock, reading its list of frames from stdin (it parses all of its
    config before its first transfer): its process start, ~6 ms here, is the harness's, not a cost any
    server causes or a viewer in a running browser pays.
    """
    config = "".join(f'url = "{base}/studies/{study}/series/{series}/instances/{sop}/frames/1"\n'
                     'output = "/dev/null"\n' for sop in sops)
    curl = subprocess.Popen(["curl", "-sS", "--fail", "-Z", "--parallel-max", "6", "-H", f"Accept: {ACCEPT_FRAME}",
                             "--config", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    t = time.perf_counter()
    for path in (f"/studies?PatientName={PATIENT.split('^')[0]}*", f"/studies/{study}/series",
                 f"/studies/{study}/series/{series}/metadata"):
        conn.request("GET", url.path + path, headers={"Accept": "application/dicom+json"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200 and body.startswith(b"["), (path, r.status)
    conn.close()
    _, err = curl.communicate(config, timeout=120)
    elapsed = time.perf_counter() - t
    if curl.returncode != 0:
        raise RuntimeError(f"curl failed: {err[:500]}")
    return elapsed


STATIC_CONF = NGINX_TOP + """\
http {{
  access_log off; sendfile on; tcp_nopush on; tcp_nodelay on; default_type application/octet-stream;
""" + NGINX_HTTP + """\
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location = {base}/studies {{ alias {dir}/studies.json; }}
    location = {base}/studies/{study}/series {{ alias {dir}/series.json; }}
  }}
}}
"""


def static_mirror(st: Stack, study: str, series: str, sops: list[str], workdir: Path) -> str:
    """nginx serving, as static files, the very bodies Orthanc sends for every request of a viewer: the
    fastest any cache could answer this viewer on this machine (the reference). Returns its base URL."""
    assert st.orthanc is not None
    ngx, base = workdir / "nginx-static", urlsplit(st.orthanc.dicomweb_url).path
    root = ngx / "root"
    series_dir = root / base.lstrip("/") / "studies" / study / "series" / series
    for d in (ngx / "tmp", series_dir):
        d.mkdir(parents=True, exist_ok=True)
    with httpx.Client(base_url=st.orthanc.dicomweb_url, trust_env=False, timeout=120) as client:
        def body(path: str, accept: str) -> bytes:
            r = client.get(path, headers={"Accept": accept})
            assert r.status_code == 200, (path, r.status_code)
            return r.content
        json = "application/dicom+json"
        (ngx / "studies.json").write_bytes(body(f"/studies?PatientName={PATIENT.split('^')[0]}*", json))
        (ngx / "series.json").write_bytes(body(f"/studies/{study}/series", json))
        (series_dir / "metadata").write_bytes(body(f"/studies/{study}/series/{series}/metadata", json))
        for sop in sops:
            (series_dir / "instances" / sop / "frames").mkdir(parents=True)
            (series_dir / "instances" / sop / "frames" / "1").write_bytes(
                body(f"/studies/{study}/series/{series}/instances/{sop}/frames/1", ACCEPT_FRAME))
    port = free_port()
    conf = ngx / "nginx.conf"
    conf.write_text(STATIC_CONF.format(dir=ngx, root=root, port=port, base=base, study=study))
    proc = spawn(st.stack, ["nginx", "-e", str(ngx / "error.log"), "-p", str(ngx), "-c", str(conf)],
                 ngx / "stdout.log")
    url = f"http://127.0.0.1:{port}{base}"
    wait_http(f"{url}/studies/{study}/series", proc, "nginx", ngx / "error.log")
    return url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--viewers", type=int, default=4)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="cold starts of every mode, interleaved (medians)")
    ap.add_argument("--workers", default="2,1", help="proxy worker counts to run, comma-separated")
    ap.add_argument("--against", metavar="REV", help="also run this revision's proxy (prefetch on)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    on_sigterm()
    work = WORK / "replay"
    counts = [int(w) for w in args.workers.split(",")]
    direct_mode = "Orthanc direct"
    proxied = [(f"proxy, {w} worker{'s' if w > 1 else ''}, prefetch {p}", w, "true" if p == "on" else "false")
               for w in counts for p in ("off", "on")]
    against = None
    if args.against:
        rev, against = export(args.against)
        proxied += [(f"proxy at {rev}, {w} worker{'s' if w > 1 else ''}, prefetch on", w, "true") for w in counts]
    static_mode = "nginx static (reference)"
    modes = [direct_mode, static_mode] + [label for label, _, _ in proxied]
    rounds: list[dict[str, list[float]]] = []
    with Stack(work, slices=args.slices, workers=2, proxy=False, nginx=False) as st:
        assert st.orthanc is not None
        study, series = st.uids["study"], st.uids["series"]
        listing = httpx.get(f"{st.orthanc.dicomweb_url}/studies/{study}/series/{series}/instances",
                            trust_env=False).json()
        # In InstanceNumber order, as a viewer walks a CT stack.
        sops = [r["00080018"]["Value"][0] for r in sorted(listing, key=lambda r: r["00200013"]["Value"][0])]
        viewer(st.orthanc.dicomweb_url, study, series, sops)  # unrecorded: Orthanc's own caches warm
        static = static_mirror(st, study, series, sops, work)
        viewer(static, study, series, sops)  # unrecorded: the page cache holds the files
        for n in range(args.rounds):
            times: dict[str, list[float]] = {}
            times[direct_mode] = [viewer(st.orthanc.dicomweb_url, study, series, sops)
                                  for _ in range(args.viewers)]
            times[static_mode] = [viewer(static, study, series, sops) for _ in range(args.viewers)]
            # Every other round in reverse: a mode's place in the round weighs (the same code run last was
            # ~4 % faster than run first, 5 rounds, 17:22 UTC), and a before/after must not inherit it.
            for label, workers, prefetch in (proxied if n % 2 == 0 else proxied[::-1]):
                run = work / f"{label.replace(', ', '-').replace(' ', '_')}-{n}"
                shutil.rmtree(run, ignore_errors=True)
                run.mkdir(parents=True)
                process = ProxyProcess({"bench": st.orthanc.dicomweb_url}, run,
                                       ["--cache-dir", str(run / "cache"), "--workers", str(workers)],
                                       env={"DICOMWEB_EDGE_PREFETCH": prefetch})
                if label.startswith("proxy at ") and against is not None:
                    process.env["PYTHONPATH"] = str(against)  # that revision's package, not the work tree's
                with process as proxy:
                    times[label] = [viewer(proxy.dicomweb_url, study, series, sops)
                                    for _ in range(args.viewers)]
            rounds.append(times)
    med = {m: [statistics.median(r[m][v] for r in rounds) for v in range(args.viewers)] for m in modes}

    def ratio(mode: str, v: int) -> tuple[float, list[float]]:
        """direct / proxy for viewer v: on the medians, and in each round."""
        return med[direct_mode][v] / med[mode][v], [r[direct_mode][v] / r[mode][v] for r in rounds]

    lines = [
        f"Command: `python benchmarks/replay.py {' '.join(argv if argv is not None else sys.argv[1:])}`<br>",
        f"Date: {datetime.now(UTC).isoformat(timespec='seconds')}<br>",
        f"Code: {code_state()}<br>",
        "Software: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        f"One viewer: study search, series search, series metadata (stdlib `http.client`, one keep-alive "
        f"connection), then frame 1 of each of the {len(sops)} "
        "CT slices in InstanceNumber order (512x512, `transfer-syntax=*`) with 6 in flight "
        "(`curl --parallel-max 6`). Viewers one after the other; seconds per viewer. A round runs every "
        "mode once (the proxy modes in reverse order every other round), each proxy mode from a cold start (new "
        "proxy, empty cache); Orthanc's own caches are "
        f"warm (one unrecorded viewer first). {args.rounds} rounds; the table gives the median of each "
        "cell over the rounds, the verdicts are on those medians, and each round's own ratios follow. "
        "Worker counts: 2 as in deploy/docker and deploy/kubernetes, 1 the default; all on the same 2 "
        "cores as Orthanc and the clients. nginx static (2 workers, sendfile): the same bodies as Orthanc "
        "sends them, from files in the page cache; no cold start.",
        "",
        "| mode | " + " | ".join(f"viewer {i + 1}" for i in range(args.viewers)) + " |",
        "|---|" + "---|" * args.viewers,
    ]
    lines += [f"| {k} | " + " | ".join(f"{t:.3f}" for t in v) + " |" for k, v in med.items()]
    lines += ["", "| metric | value (median) | per round | target | result |", "|---|---|---|---|---|"]
    for workers in counts:
        off, on = (label for label, w, _ in proxied if w == workers and not label.startswith("proxy at "))
        for what, mode, v, target in (("second viewer", off, 1, 5.0), ("second viewer", on, 1, 5.0),
                                      ("first viewer", on, 0, 1.0)):
            value, each = ratio(mode, v)
            met = value >= target if target > 1 else value > target
            lines.append(f"| {what}, direct / {mode} | {value:.2f}x | " + ", ".join(f"{x:.2f}x" for x in each)
                         + f" | {'≥' if target > 1 else '>'} {target:g}x | **{'PASS' if met else 'FAIL'}** |")
    # The floor: nginx sending the same bytes from static files. Where it is below a target too, this
    # machine and these clients bound the ratio, not the proxy.
    for what, v in (("first viewer", 0), ("second viewer", 1)):
        value, each = ratio(static_mode, v)
        lines.append(f"| reference: {what}, direct / {static_mode} | {value:.2f}x | "
                     + ", ".join(f"{x:.2f}x" for x in each) + " | | — |")
    for label, _, _ in proxied:
        if label.startswith("proxy at "):
            for what, v in (("first viewer", 0), ("second viewer", 1)):
                value, each = ratio(label, v)
                lines.append(f"| {what}, direct / {label} (for comparison) | {value:.2f}x | "
                             + ", ".join(f"{x:.2f}x" for x in each) + " | | |")
    body = "\n".join(lines) + "\n"
    replace_section(args.out, "## Viewer replay: Orthanc direct vs the frame cache (issue 4)", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
