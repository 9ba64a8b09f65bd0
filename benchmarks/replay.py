"""A viewer-like replay: Orthanc direct vs the proxy with its frame cache, with and without prefetch (issue 4).

    python benchmarks/replay.py [--viewers 4] [--slices 200] [--rounds 3]

One viewer = what OHIF does to open a CT: study search, series search, the series metadata, then every
frame of the series with 6 requests in flight (`curl --parallel --parallel-max 6`, a C client, so the
client is not what is measured). Viewers run one after the other, each timed from its first request to
its last byte. Modes, each from a cold start: Orthanc direct; the proxy with a fresh cache and prefetch
off; the proxy with a fresh cache and prefetch on.
Targets: the second viewer through the proxy >= 5x faster than against Orthanc directly; with prefetch
on, the first viewer faster than direct.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from stack import ACCEPT_FRAME, PATIENT, WORK, Stack, on_sigterm, replace_section, versions  # noqa: E402
from support import ProxyProcess  # noqa: E402


def viewer(base: str, study: str, series: str, sops: list[str], workdir: Path) -> float:
    """One viewer opening the study: seconds from the first request to the last byte."""
    cfg = workdir / "frames.curl"
    cfg.write_text("".join(f'url = "{base}/studies/{study}/series/{series}/instances/{sop}/frames/1"\n'
                           'output = "/dev/null"\n' for sop in sops))
    with httpx.Client(trust_env=False, timeout=60) as c:  # made before the clock starts: ~50 ms here, which
        t = time.perf_counter()                           # is Python's client set-up, not the viewer's work
        for path in (f"/studies?PatientName={PATIENT.split('^')[0]}*", f"/studies/{study}/series",
                     f"/studies/{study}/series/{series}/metadata"):
            r = c.get(base + path)
            assert r.status_code == 200, (path, r.status_code)
    out = subprocess.run(["curl", "-sS", "--fail", "-Z", "--parallel-max", "6", "-H", f"Accept: {ACCEPT_FRAME}",
                          "--config", str(cfg)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"curl failed: {out.stderr[:500]}")
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--viewers", type=int, default=4)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="cold starts of every mode, interleaved (medians)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    on_sigterm()
    work = WORK / "replay"
    modes = ("Orthanc direct", "proxy, cache, prefetch off", "proxy, cache, prefetch on")
    rounds: list[dict[str, list[float]]] = []
    with Stack(work, slices=args.slices, workers=2, proxy=False, nginx=False) as st:
        assert st.orthanc is not None
        study, series = st.uids["study"], st.uids["series"]
        listing = httpx.get(f"{st.orthanc.dicomweb_url}/studies/{study}/series/{series}/instances",
                            trust_env=False).json()
        # In InstanceNumber order, as a viewer walks a CT stack.
        sops = [r["00080018"]["Value"][0] for r in sorted(listing, key=lambda r: r["00200013"]["Value"][0])]
        viewer(st.orthanc.dicomweb_url, study, series, sops, work)  # unrecorded: Orthanc's own caches warm
        for n in range(args.rounds):
            times: dict[str, list[float]] = {}
            times[modes[0]] = [viewer(st.orthanc.dicomweb_url, study, series, sops, work)
                               for _ in range(args.viewers)]
            for label, prefetch in ((modes[1], "false"), (modes[2], "true")):
                run = work / f"{label.replace(', ', '-').replace(' ', '_')}-{n}"
                shutil.rmtree(run, ignore_errors=True)
                run.mkdir(parents=True)
                with ProxyProcess({"bench": st.orthanc.dicomweb_url}, run,
                                  ["--cache-dir", str(run / "cache"), "--workers", "2"],
                                  env={"DICOMWEB_EDGE_PREFETCH": prefetch}) as proxy:
                    times[label] = [viewer(proxy.dicomweb_url, study, series, sops, run)
                                    for _ in range(args.viewers)]
            rounds.append(times)
    med = {m: [statistics.median(r[m][v] for r in rounds) for v in range(args.viewers)] for m in modes}
    direct, off, on = med[modes[0]], med[modes[1]], med[modes[2]]
    second = direct[1] / off[1]
    second_on = direct[1] / on[1]  # the default configuration (prefetch on)
    first_on = direct[0] / on[0]
    per_round = [(r[modes[0]][1] / r[modes[1]][1], r[modes[0]][0] / r[modes[2]][0], r[modes[0]][1] / r[modes[2]][1])
                 for r in rounds]
    lines = [
        f"Command: `python benchmarks/replay.py {' '.join(argv if argv is not None else sys.argv[1:])}`<br>",
        f"Date: {datetime.now(UTC).isoformat(timespec='seconds')}<br>",
        "Software: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        f"One viewer: study search, series search, series metadata, then frame 1 of each of the {len(sops)} "
        "CT slices in InstanceNumber order (512x512, `transfer-syntax=*`) with 6 in flight "
        "(`curl --parallel-max 6`). Viewers one after the other; seconds per viewer. A round runs every "
        "mode once, each proxy mode from a cold start (new proxy, empty cache); Orthanc's own caches are "
        f"warm (one unrecorded viewer first). {args.rounds} rounds; the table gives the median of each "
        "cell over the rounds, the verdicts are on those medians, and each round's own ratios follow.",
        "",
        "| mode | " + " | ".join(f"viewer {i + 1}" for i in range(args.viewers)) + " |",
        "|---|" + "---|" * args.viewers,
    ]
    lines += [f"| {k} | " + " | ".join(f"{t:.3f}" for t in v) + " |" for k, v in med.items()]
    lines += ["", "| metric | value (median) | per round | target | result |", "|---|---|---|---|---|",
              f"| second viewer, direct / proxy (prefetch off: the cache alone) | {second:.1f}x | "
              + ", ".join(f"{a:.1f}x" for a, _, _ in per_round)
              + f" | ≥ 5x | **{'PASS' if second >= 5 else 'FAIL'}** |",
              f"| second viewer, direct / proxy (prefetch on, the default) | {second_on:.1f}x | "
              + ", ".join(f"{c:.1f}x" for _, _, c in per_round)
              + f" | ≥ 5x | **{'PASS' if second_on >= 5 else 'FAIL'}** |",
              f"| first viewer with prefetch, direct / proxy | {first_on:.2f}x | "
              + ", ".join(f"{b:.2f}x" for _, b, _ in per_round)
              + f" | > 1x | **{'PASS' if first_on > 1 else 'FAIL'}** |"]
    body = "\n".join(lines) + "\n"
    replace_section(args.out, "## Viewer replay: Orthanc direct vs the frame cache (issue 4)", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
