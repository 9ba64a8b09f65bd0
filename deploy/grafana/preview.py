"""Render docs/images/dashboard.png: the Grafana dashboard's panels, drawn from real data.

    pip install -e '.[docs]' && python deploy/grafana/preview.py [--seconds 120]

Starts a real Orthanc holding a CT series, the proxy in front of it (two workers, cache on, plus a second
archive that is down, so that searches degrade), and a real Prometheus scraping the proxy every second
with our alert rules. Then plays viewers opening the study: cold, warm, a cache purge half-way, a burst
of bad requests. Finally every panel's queries of deploy/grafana/dashboards/dicomweb-edge.json are
evaluated over that window through Prometheus's API and drawn with matplotlib in the dashboard's layout.
(Grafana is not packaged for Debian: this is the same queries on the same data, not a screenshot.)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from prometheus_support import Prometheus  # noqa: E402
from stack import ACCEPT_FRAME, PATIENT, Stack, free_port, on_sigterm  # noqa: E402

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "dicomweb-edge.json"
OUT = REPO / "docs" / "images" / "dashboard.png"
VARS = {"$__rate_interval": "15s", "$job": ".*", "$instance": ".*"}


def play(base: str, admin: str, uids: dict[str, str], sops: list[str], seconds: float) -> None:
    """Viewers open the study again and again (6 frame requests in flight each), for `seconds`."""
    study, series = uids["study"], uids["series"]
    stop = time.monotonic() + seconds
    purged = False
    rng = random.Random(7)

    def viewer() -> None:
        with httpx.Client(trust_env=False, timeout=60) as c:
            c.get(f"{base}/studies?PatientName={PATIENT.split('^')[0]}*")
            c.get(f"{base}/studies/{study}/series")
            c.get(f"{base}/studies/{study}/series/{series}/metadata")
            with ThreadPoolExecutor(6) as pool:
                list(pool.map(lambda sop: c.get(f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/1",
                                                headers={"Accept": ACCEPT_FRAME}), sops))
            for _ in range(rng.randint(0, 3)):  # a few mistakes: unknown study, malformed UID
                c.get(f"{base}/studies/1.2.3.{rng.randint(1, 999)}/metadata")
                c.get(f"{base}/studies/not-a-uid/metadata")

    while time.monotonic() < stop:
        threads = [threading.Thread(target=viewer) for _ in range(rng.randint(1, 3))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not purged and time.monotonic() > stop - seconds / 2:
            httpx.post(f"{admin}/admin/cache/purge", trust_env=False)  # everything cold again
            purged = True
        time.sleep(rng.uniform(0.5, 2.0))


def draw(prom: Prometheus, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    cols = 3
    rows = -(-len(panels) // cols)
    plt.style.use("dark_background")
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 6.2, rows * 2.9), squeeze=False)
    fig.patch.set_facecolor("#111217")
    step = max(1.0, (end - start) / 200)
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.set_facecolor("#181b1f")
        ax.set_title(panel["title"], fontsize=9, loc="left", color="#ccccdc")
        ax.tick_params(labelsize=7, colors="#9fa7b3")
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in VARS.items():
                expr = expr.replace(var, value)
            for series in prom.query_range(expr, start, end, step):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                label = target.get("legendFormat", "")
                for k, v in series["metric"].items():
                    label = label.replace("{{" + k + "}}", v)
                ax.plot(xs, ys, linewidth=1.1, label=label[:28])
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", framealpha=0.3, ncol=2)
        ax.set_xlabel("seconds", fontsize=7, color="#9fa7b3")
        ax.grid(alpha=0.15)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("dicomweb-edge (deploy/grafana/dashboards/dicomweb-edge.json), real traffic through a real Orthanc",
                 color="#ccccdc", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0, help="how long the viewers play (default 120)")
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    on_sigterm()
    work = REPO / "benchmarks" / ".work" / "dashboard"
    gone = f"gone=http://127.0.0.1:{free_port()}/dicom-web"
    with Stack(work, slices=args.slices, workers=2, nginx=False,
               proxy_args=["--cache-dir", str(work / "cache"), "--upstream", gone]) as st:
        assert st.orthanc is not None
        with httpx.Client(trust_env=False, timeout=60) as c:
            found = c.get(f"{st.orthanc.dicomweb_url}/studies/{st.uids['study']}/series/{st.uids['series']}"
                          "/instances").json()
        sops = [r["00080018"]["Value"][0] for r in found]
        with Prometheus(work / "prometheus", f"127.0.0.1:{st.proxy_port}") as prom:
            start = time.time()
            play(f"http://127.0.0.1:{st.proxy_port}/dicomweb", f"http://127.0.0.1:{st.proxy_port}", st.uids, sops,
                 args.seconds)
            time.sleep(3)  # the last scrapes
            end = time.time()
            draw(prom, start, end, args.out)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
