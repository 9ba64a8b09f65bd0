"""Does each optimisation pay? The proxy with everything on, and with one mechanism changed, in one run.

    python benchmarks/mechanisms.py [--rounds 3] [--duration 3] [--workers 1,2] [--only NAME,...] [--against REV]

Every variant runs the work-tree proxy in front of the same fresh Orthanc (a 200-slice CT), from a cold
start, with what a user notices:

- `viewer 1` / `viewer 2`: seconds for a viewer opening the series (study and series search, series
  metadata, every frame with 6 in flight; replay.py's viewer), the first from an empty cache (prefetch on,
  the default), the second right after it (every frame a hit);
- `hit c=1` / `hit c=32`: req/s of one cached 512 KB frame (`wrk`), after those viewers;
- `series MB/s`, `series c=4 MB/s`: the 105 MB series retrieve with 1 and 4 connections through a second
  proxy without a cache (the relay path: with a cache a retrieve tees into it and is never spliced);
- `search req/s`: a study search with one match at c=1 through that proxy.

Variants: `defaults`, then each entry of `[server] disable` on its own (`DICOMWEB_EDGE_DISABLE`), and heap
warming off (`warm_bytes = 0`); with `--against REV`, that revision's proxy (a clean export of its
`proxy/`) with its defaults: a before/after. Within a round the variants run in order, reversed every other round. The
report gives per figure the median over the rounds, the variant against `defaults` (> 1: the variant is
better), and each round's own ratio: the spread. A mechanism pays when switching it off makes a figure
worse by at least 10 % beyond that spread.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from replay import viewer  # noqa: E402
from run import wrk  # noqa: E402
from stack import (  # noqa: E402
    ACCEPT_FRAME,
    ACCEPT_SERIES,
    PATIENT,
    WORK,
    Stack,
    code_state,
    export,
    on_sigterm,
    replace_section,
    versions,
)
from support import ProxyProcess  # noqa: E402

VARIANTS: dict[str, dict[str, str]] = {
    "defaults": {},
    "hit_lane off": {"DICOMWEB_EDGE_DISABLE": "hit_lane"},
    "server_protocol off": {"DICOMWEB_EDGE_DISABLE": "server_protocol"},
    "splice off": {"DICOMWEB_EDGE_DISABLE": "splice"},
    "handover off": {"DICOMWEB_EDGE_DISABLE": "handover"},
    "claims off": {"DICOMWEB_EDGE_DISABLE": "claims"},
    "heap warming off": {"DICOMWEB_EDGE_MEMORY_WARM_BYTES": "0"},
}
FIGURES = ("viewer 1 s", "viewer 2 s", "hit c=1 req/s", "hit c=32 req/s", "series MB/s", "series c=4 MB/s",
           "search req/s")
LOWER_IS_BETTER = {"viewer 1 s", "viewer 2 s"}
SECTION = "## Mechanisms: each optimisation on and off in one run (issue 23)"


def one(st: Stack, work: Path, env: dict[str, str], workers: int, duration: int, pg: frozenset[int],
        uids: tuple[str, str, list[str]]) -> dict[str, float]:
    """Every figure of one variant, from cold starts."""
    study, series, sops = uids
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    assert st.orthanc is not None
    up = {"bench": st.orthanc.dicomweb_url}
    out: dict[str, float] = {}
    cached = ProxyProcess(up, work / "cached", ["--cache-dir", str(work / "cache"), "--workers", str(workers)],
                          env=env)
    relay = ProxyProcess(up, work / "relay", ["--workers", str(workers)], env=env)
    for process in (cached, relay):
        if "PYTHONPATH" in env:
            process.env["PYTHONPATH"] = env["PYTHONPATH"]  # that revision's package, not the work tree's
    with cached as proxy:
        out["viewer 1 s"] = viewer(proxy.dicomweb_url, study, series, sops)
        out["viewer 2 s"] = viewer(proxy.dicomweb_url, study, series, sops)
        frame = f"{proxy.dicomweb_url}/studies/{study}/series/{series}/instances/{sops[0]}/frames/1"
        r = httpx.get(frame, headers={"Accept": ACCEPT_FRAME}, trust_env=False, timeout=60)
        assert r.status_code == 200 and r.headers.get("x-cache") == "HIT", (r.status_code, dict(r.headers))
        for conc in (1, 32):
            res = wrk(frame, ACCEPT_FRAME, conc, duration, pg)
            out[f"hit c={conc} req/s"] = res["requests"] / res["duration_us"] * 1e6
    with relay as proxy:
        url = f"{proxy.dicomweb_url}/studies/{study}/series/{series}"
        wrk(url, ACCEPT_SERIES, 1, 1, pg)  # warm-up, not recorded
        res = wrk(url, ACCEPT_SERIES, 1, duration, pg)
        out["series MB/s"] = res["bytes"] / res["duration_us"]
        res = wrk(url, ACCEPT_SERIES, 4, duration, pg)
        out["series c=4 MB/s"] = res["bytes"] / res["duration_us"]
        search = f"{proxy.dicomweb_url}/studies?PatientName={PATIENT.split('^')[0]}*"
        res = wrk(search, None, 1, duration, pg)
        out["search req/s"] = res["requests"] / res["duration_us"] * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--only", help="variants to run besides defaults, comma-separated ('none': defaults alone)")
    ap.add_argument("--against", metavar="REV", help="also run another revision's proxy with its defaults: a "
                    "before/after in the same run")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    on_sigterm()
    names = ["defaults"] + [n for n in VARIANTS if n != "defaults"
                            and (not args.only or n in args.only.split(","))]
    counts = [int(w) for w in args.workers.split(",")]
    work = WORK / "mechanisms"
    if args.against:
        rev, path = export(args.against)
        VARIANTS[f"at {rev}"] = {"PYTHONPATH": str(path)}
        names.append(f"at {rev}")
    rounds: list[dict[tuple[str, int], dict[str, float]]] = []
    with Stack(work, slices=200, workers=2, proxy=False, nginx=False) as st:
        assert st.orthanc is not None
        study, series = st.uids["study"], st.uids["series"]
        listing = httpx.get(f"{st.orthanc.dicomweb_url}/studies/{study}/series/{series}/instances",
                            trust_env=False, timeout=60).json()
        sops = [r["00080018"]["Value"][0] for r in sorted(listing, key=lambda r: r["00200013"]["Value"][0])]
        viewer(st.orthanc.dicomweb_url, study, series, sops)  # unrecorded: Orthanc's own caches warm
        pg = frozenset(st.pgids())
        for n in range(args.rounds):
            order = [(v, w) for w in counts for v in names]
            got: dict[tuple[str, int], dict[str, float]] = {}
            for variant, workers in (order if n % 2 == 0 else order[::-1]):
                got[(variant, workers)] = one(st, work / "run", VARIANTS[variant], workers, args.duration, pg,
                                              (study, series, sops))
                print(n, workers, variant, {k: round(v, 3) for k, v in got[(variant, workers)].items()}, flush=True)
            rounds.append(got)
    body = report(args, argv, rounds, names, counts)
    replace_section(args.out, SECTION, body)
    print(body)
    return 0


def report(args: argparse.Namespace, argv: list[str] | None, rounds: list[dict[tuple[str, int], dict[str, float]]],
           names: list[str], counts: list[int]) -> str:
    def med(v: str, w: int, f: str) -> float:
        return statistics.median(r[(v, w)][f] for r in rounds)

    def gain(v: str, w: int, f: str, r: dict[tuple[str, int], dict[str, float]]) -> float:
        """> 1: the variant is better than the defaults on this figure."""
        a, b = r[(v, w)][f], r[("defaults", w)][f]
        return b / a if f in LOWER_IS_BETTER else a / b

    lines = [
        f"Command: `python benchmarks/mechanisms.py {' '.join(argv if argv is not None else sys.argv[1:])}`<br>",
        f"Date: {datetime.now(UTC).isoformat(timespec='seconds')}<br>",
        f"Code: {code_state()}<br>",
        "Software: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        "Each cell: the median over the rounds; below it, the variant against `defaults` on the medians "
        "(> 1: the variant is better, < 1: the mechanism it switches off was paying) and each round's own ratio. "
        "Client, Orthanc and proxy share 2 cores.",
        "",
    ]
    for w in counts:
        lines += [f"### {w} worker{'s' if w > 1 else ''}", "",
                  "| variant | " + " | ".join(FIGURES) + " |", "|---|" + "---|" * len(FIGURES)]
        for v in names:
            cells = []
            for f in FIGURES:
                m = med(v, w, f)
                cell = f"{m:.3f}" if f in LOWER_IS_BETTER else f"{m:,.0f}"
                if v != "defaults":
                    each = ", ".join(f"{gain(v, w, f, r):.2f}" for r in rounds)
                    ratio = med("defaults", w, f) / m if f in LOWER_IS_BETTER else m / med("defaults", w, f)
                    cell += f"<br>{ratio:.2f}x ({each})"
                cells.append(cell)
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
