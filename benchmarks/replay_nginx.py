"""nginx `proxy_cache` vs the DICOM-aware frame cache, in front of the same Orthanc (issue 4, point 2).

    python benchmarks/replay_nginx.py [--viewers 4] [--slices 200] [--tiles 200]

One run, one machine, the same Orthanc and the same bytes. Three scenarios, each from a cold cache
(nginx with an empty cache directory, the proxy with an empty `--cache-dir`); viewers one after the other,
each timed from its first request to its last byte; frames with 6 requests in flight
(`curl --parallel-max 6`, a C client):

- replay: the viewer of benchmarks/replay.py (study search, series search, series metadata, frame 1 of
  each CT slice in InstanceNumber order) — the same URLs for every viewer, the case URL caches are made for;
- series first: viewer 1 retrieves the CT series in one request (a prefetching viewer or a download),
  viewers 2.. then run the frame replay — the frames came by, under other URLs;
- frame lists: a tiled multi-frame instance (JPEG tiles), every frame asked by each viewer in lists of a
  different size (10, 8, 5, 1, ...), as slide viewers batch tiles — the same frames under other URLs.

Servers: Orthanc direct; nginx (Debian) with `proxy_cache` (key `$request_uri|$http_accept`,
`proxy_cache_valid 200 10m`, `proxy_cache_lock on`, kept-alive upstream); the proxy with its cache
(`--workers 2`), prefetch off and on (the default). Hit ratio = responses served from the cache / all
responses of the scenario: for nginx `$upstream_cache_status` = HIT in its access log, for the proxy
`X-Cache: HIT` on the response.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from stack import (  # noqa: E402
    ACCEPT_FRAME,
    ACCEPT_SERIES,
    NGINX_HTTP,
    NGINX_TOP,
    PATIENT,
    WORK,
    Stack,
    code_state,
    on_sigterm,
    replace_section,
    spawn,
    versions,
    wait_http,
)
from support import ProxyProcess, split_multipart  # noqa: E402

from proxy.demo.orthanc import free_port  # noqa: E402
from proxy.demo.synth import Patient, Study, multiframe_jpeg  # noqa: E402

GROUPINGS = (10, 8, 5, 1, 4, 2, 3, 6)
NGINX_CACHE_CONF = NGINX_TOP + """\
http {{
  log_format cache '$upstream_cache_status $status "$request_uri"';
  access_log {dir}/access.log cache;
  sendfile on; tcp_nopush on; tcp_nodelay on;
""" + NGINX_HTTP + """\
  proxy_cache_path {dir}/cache levels=1:2 keys_zone=dicom:32m max_size=10g inactive=60m use_temp_path=off;
  upstream orthanc {{ server {upstream}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://orthanc; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_cache dicom; proxy_cache_key "$request_uri|$http_accept"; proxy_cache_valid 200 10m;
      proxy_cache_lock on; proxy_read_timeout 120s;
      add_header X-Cache $upstream_cache_status always;
    }}
  }}
}}
"""


class Client:
    """Requests of one scenario against one server: timed viewers, and what each response said of the cache."""

    def __init__(self, base: str, workdir: Path) -> None:
        self.base = base
        self.workdir = workdir
        self.xcache: list[str] = []
        self.http = httpx.Client(trust_env=False, timeout=120)

    def get(self, path: str, accept: str | None = None) -> None:
        r = self.http.get(self.base + path, headers={"Accept": accept} if accept else {})
        if r.status_code != 200:
            raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:200]}")
        self.xcache.append(r.headers.get("x-cache", "-"))

    def curl(self, paths: list[str], accept: str) -> None:
        """Every path with 6 in flight (curl, a C client); the bodies are discarded."""
        cfg = self.workdir / "urls.curl"
        cfg.write_text("".join(f'url = "{self.base}{p}"\noutput = "/dev/null"\n' for p in paths))
        out = subprocess.run(["curl", "-sS", "--fail", "-Z", "--parallel-max", "6", "-H", f"Accept: {accept}",
                              "-w", "%header{x-cache}\\n", "--config", str(cfg)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"curl failed: {out.stderr[:500]}")
        lines = out.stdout.split()
        if len(lines) > len(paths):
            raise RuntimeError(f"curl wrote {len(lines)} lines for {len(paths)} transfers")
        self.xcache += lines + ["-"] * (len(paths) - len(lines))  # no X-Cache header: an empty line

    def close(self) -> None:
        self.http.close()


class Scenario:
    """What the viewers of one scenario ask for."""

    def __init__(self, name: str, uids: dict[str, str], sops: list[str], tiles: dict[str, str], n_tiles: int) -> None:
        self.name = name
        self.uids = uids
        self.sops = sops
        self.tiles = tiles
        self.n_tiles = n_tiles

    def viewer(self, c: Client, i: int) -> None:
        """Viewer `i` (0-based), start to last byte."""
        study, series = self.uids["study"], self.uids["series"]
        se = f"/studies/{study}/series/{series}"
        if self.name == "frame lists":
            t = self.tiles
            tse = f"/studies/{t['study']}/series/{t['series']}"
            c.get(tse + "/metadata")
            g = GROUPINGS[i % len(GROUPINGS)]
            lists = [",".join(str(n) for n in range(s, min(s + g, self.n_tiles + 1)))
                     for s in range(1, self.n_tiles + 1, g)]
            c.curl([f"{tse}/instances/{t['instance']}/frames/{fl}" for fl in lists], ACCEPT_FRAME)
            return
        c.get(f"/studies?PatientName={PATIENT.split('^')[0]}*")
        c.get(f"/studies/{study}/series")
        c.get(se + "/metadata")
        if self.name == "series first" and i == 0:
            c.curl([se], ACCEPT_SERIES)
            return
        c.curl([f"{se}/instances/{sop}/frames/1" for sop in self.sops], ACCEPT_FRAME)


def nginx_cache(stack: ExitStack, workdir: Path, upstream: str) -> tuple[int, Path]:
    """A fresh nginx with an empty proxy_cache in front of `upstream` (host:port); (port, access log)."""
    workdir.mkdir(parents=True)
    (workdir / "tmp").mkdir()
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CACHE_CONF.format(dir=workdir, port=port, upstream=upstream))
    proc = spawn(stack, ["nginx", "-e", str(workdir / "error.log"), "-p", str(workdir), "-c", str(conf)],
                 workdir / "stdout.log")
    wait_http(f"http://127.0.0.1:{port}/system", proc, "nginx", workdir / "error.log")  # Orthanc's /system
    (workdir / "access.log").write_text("")  # the readiness probe is not part of the run
    return port, workdir / "access.log"


MODES = ("Orthanc direct", "nginx proxy_cache", "proxy, prefetch off", "proxy, prefetch on")


def start_mode(label: str, stack: ExitStack, d: Path, orthanc: str) -> tuple[str, Callable[[Client], float]]:
    """Start the server of mode `label` with a cold cache: (DICOMweb base URL, hit ratio of a client's run)."""
    if label == "Orthanc direct":
        return orthanc, lambda client: _ratio(client.xcache, "HIT")  # never a hit
    if label == "nginx proxy_cache":
        port, log = nginx_cache(stack, d, orthanc.split("/")[2])
        return f"http://127.0.0.1:{port}/{orthanc.split('/', 3)[3]}", lambda client: _log_ratio(log)
    d.mkdir(parents=True)
    prefetch = "true" if label.endswith("prefetch on") else "false"
    proxy = stack.enter_context(ProxyProcess({"bench": orthanc}, d, ["--cache-dir", str(d / "cache"), "--workers", "2"],
                                             env={"DICOMWEB_EDGE_PREFETCH": prefetch}))
    return proxy.dicomweb_url, lambda client: _ratio(client.xcache, "HIT")


def run_viewers(scn: Scenario, c: Client, viewers: int) -> list[float]:
    times = []
    for i in range(viewers):
        t = time.perf_counter()
        scn.viewer(c, i)
        times.append(time.perf_counter() - t)
    return times


def same_bytes(bases: dict[str, str], path: str, accept: str) -> None:
    """The servers answer the same part payloads for `path` (boundaries differ)."""
    seen = {}
    for name, base in bases.items():
        r = httpx.get(base + path, headers={"Accept": accept}, trust_env=False, timeout=60)
        seen[name] = [body for _, body in split_multipart(r.content, r.headers["content-type"])[1]]
    if len({repr(v) for v in seen.values()}) != 1:
        raise RuntimeError(f"servers disagree on {path}: " + ", ".join(f"{k} {len(v)} parts" for k, v in seen.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--viewers", type=int, default=4)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--tiles", type=int, default=200, help="frames of the tiled multi-frame instance")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    on_sigterm()
    work = WORK / "replay_nginx"
    load_start = os.getloadavg()
    rows: dict[str, dict[str, tuple[list[float], float, int]]] = {}  # scenario → mode → (times, hit ratio, n)
    with Stack(work, slices=args.slices, workers=2, proxy=False, nginx=False) as st:
        assert st.orthanc is not None
        tiles_ds = multiframe_jpeg(Study(Patient("TILES^MF", "BENCH02")), n_frames=args.tiles, tile=256)
        st.orthanc.store([tiles_ds])
        tiles = {"study": tiles_ds.StudyInstanceUID, "series": tiles_ds.SeriesInstanceUID,
                 "instance": tiles_ds.SOPInstanceUID}
        study, series = st.uids["study"], st.uids["series"]
        listing = httpx.get(f"{st.orthanc.dicomweb_url}/studies/{study}/series/{series}/instances",
                            trust_env=False).json()
        sops = [r["00080018"]["Value"][0] for r in sorted(listing, key=lambda r: r["00200013"]["Value"][0])]
        checked = False
        for name in ("replay", "series first", "frame lists"):
            scn = Scenario(name, st.uids, sops, tiles, args.tiles)
            run = work / name.replace(" ", "_")
            for label in MODES:
                with ExitStack() as stack:
                    base, ratio = start_mode(label, stack, run / label.replace(", ", "-").replace(" ", "_"),
                                             st.orthanc.dicomweb_url)
                    (run / "client").mkdir(parents=True, exist_ok=True)
                    c = Client(base, run / "client")
                    try:
                        times = run_viewers(scn, c, args.viewers)
                        rows.setdefault(name, {})[label] = (times, ratio(c), len(c.xcache))
                    finally:
                        c.close()
                    print(f"{name:13} {label:20} " + " ".join(f"{t:7.3f}" for t in times)
                          + f"  hit ratio {rows[name][label][1]:.1%}", flush=True)
                    if not checked and label == "proxy, prefetch on":  # same bytes through every server
                        frame = f"/studies/{study}/series/{series}/instances/{sops[0]}/frames/1"
                        same_bytes({"direct": st.orthanc.dicomweb_url, "proxy": base}, frame, ACCEPT_FRAME)
                        checked = True
    load_end = os.getloadavg()
    lines = [
        f"Command: `python benchmarks/replay_nginx.py {' '.join(argv if argv is not None else sys.argv[1:])}`<br>",
        f"Date: {datetime.now(UTC).isoformat(timespec='seconds')}<br>",
        f"Code: {code_state()}<br>",
        "Software: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + "<br>",
        f"Load average (1/5/15 min): {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f} before, "
        f"{load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} after (2 cores, shared with other sessions).",
        "",
        f"{args.viewers} viewers one after the other, seconds per viewer, each server/mode from a cold cache "
        "(Orthanc's own caches warm after the first mode). Frames `transfer-syntax=*`, 6 in flight "
        f"(`curl --parallel-max 6`). CT: {len(sops)} slices of 512x512. Tiles: one JPEG multi-frame instance of "
        f"{args.tiles} 256x256 frames, viewer k asking all of them in lists of "
        + ", ".join(str(GROUPINGS[i % len(GROUPINGS)]) for i in range(args.viewers)) + " frames. "
        "nginx: `proxy_cache` keyed `$request_uri|$http_accept`, `proxy_cache_valid 200 10m`, "
        "`proxy_cache_lock on`, keepalive upstream; hit ratio from `$upstream_cache_status` in its access log. "
        "Proxy: `--cache-dir`, `--workers 2`; hit ratio from `X-Cache: HIT` on each response. "
        "Hit ratio over every response of the scenario (searches and metadata included).",
        "",
    ]
    for name, modes_rows in rows.items():
        lines += [f"**{name}**", "",
                  "| server | " + " | ".join(f"viewer {i + 1}" for i in range(args.viewers))
                  + " | total s | responses | hit ratio |",
                  "|---|" + "---|" * (args.viewers + 3)]
        for label, (times, ratio, n) in modes_rows.items():
            lines.append(f"| {label} | " + " | ".join(f"{t:.3f}" for t in times)
                         + f" | {sum(times):.3f} | {n} | {ratio:.1%} |")
        lines.append("")
    body = "\n".join(lines) + "\n"
    replace_section(args.out, "## nginx proxy_cache vs the frame cache: replay and frame lists (issue 4)", body)
    print(body)
    return 0


def _ratio(values: list[str], hit: str) -> float:
    return sum(v.upper() == hit for v in values) / len(values) if values else 0.0


def _log_ratio(log: Path) -> float:
    statuses = [line.split(" ", 1)[0] for line in log.read_text().splitlines() if line.strip()]
    return _ratio(statuses, "HIT")


if __name__ == "__main__":
    sys.exit(main())
