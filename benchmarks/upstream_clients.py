"""Upstream HTTP client micro-benchmark: which Python client should the proxy read archives with?

    python benchmarks/upstream_clients.py [--seconds 5] [--repeat 3] [--inflight 6] [--out benchmarks/RESULTS.md]

Starts a fresh Orthanc with a few 512x512 CT slices (stack.py) and reads one frame (524 KB body,
`transfer-syntax=*`) over and over with `--inflight` requests in flight for `--seconds`, on uvloop
(as the proxy runs), with each client in turn, interleaved, `--repeat` times: httpx's default
transport, httpx with the httpx-aiohttp transport, aiohttp, and the proxy's own upstream layer
(`proxy.upstream.archive.Archive`, whatever transport it uses today). Clients whose package is not installed
are skipped. wrk on the same frame and concurrency is the C reference. The medians go into the
"## Upstream client choice" section of RESULTS.md: the figures behind the choice of transport.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import os
import shlex
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import uvloop
from run import wrk
from stack import ACCEPT_FRAME, REPO, WORK, ForeignCpu, Stack, code_state, on_sigterm, replace_section, versions

from proxy.config import ArchiveConfig
from proxy.upstream.archive import Archive

SECTION = "## Upstream client choice"
HEADERS = {"Accept": ACCEPT_FRAME}
Fetch = Callable[[], Awaitable[int]]


@asynccontextmanager
async def httpx_default(url: str) -> AsyncIterator[Fetch]:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        async def fetch() -> int:
            r = await client.get(url, headers=HEADERS)
            r.raise_for_status()
            return len(r.content)
        yield fetch


@asynccontextmanager
async def httpx_aiohttp_transport(url: str) -> AsyncIterator[Fetch]:
    from httpx_aiohttp import AiohttpTransport

    async with httpx.AsyncClient(transport=AiohttpTransport(trust_env=False), trust_env=False, timeout=30) as client:
        async def fetch() -> int:
            r = await client.get(url, headers=HEADERS)
            r.raise_for_status()
            return len(r.content)
        yield fetch


@asynccontextmanager
async def aiohttp_plain(url: str) -> AsyncIterator[Fetch]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async def fetch() -> int:
            async with session.get(url, headers=HEADERS) as r:
                r.raise_for_status()
                return len(await r.read())
        yield fetch


@asynccontextmanager
async def proxy_archive(url: str) -> AsyncIterator[Fetch]:
    """The proxy's own upstream layer: `Archive.open()` + `iter_chunks()`, with its metrics."""
    base, _, path = url.partition("/dicom-web")
    archive = Archive(ArchiveConfig("bench", base + "/dicom-web"))
    try:
        async def fetch() -> int:
            async with archive.open("GET", path, headers=HEADERS, service="frames") as r:
                n = 0
                async for chunk in r.iter_chunks():
                    n += len(chunk)
                return n
        yield fetch
    finally:
        await archive.close()


NEEDS = {httpx_aiohttp_transport: ("httpx_aiohttp", "aiohttp"), aiohttp_plain: ("aiohttp",)}
CLIENTS = {
    "httpx 0.28 default transport (httpcore), `r.content`": httpx_default,
    "httpx + httpx-aiohttp transport, `r.content`": httpx_aiohttp_transport,
    "aiohttp `ClientSession`, `await r.read()`": aiohttp_plain,
    "proxy.upstream.archive.Archive (the proxy's own upstream path)": proxy_archive,
}


async def drive(fetch: Fetch, inflight: int, seconds: float, expected: int) -> dict:
    """`inflight` loops fetching until the deadline; requests, bytes and wrong-size bodies."""
    stats = {"requests": 0, "bytes": 0, "wrong_size": 0}
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < deadline:
            n = await fetch()
            stats["requests"] += 1
            stats["bytes"] += n
            stats["wrong_size"] += n != expected

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(inflight)))
    stats["seconds"] = time.perf_counter() - started
    return stats


async def measure(url: str, args: argparse.Namespace, expected: int, pgids: set[int]) -> dict[str, list[dict]]:
    clients = {name: c for name, c in CLIENTS.items() if all(importlib.util.find_spec(m) for m in NEEDS.get(c, ()))}
    results: dict[str, list[dict]] = {name: [] for name in clients}
    for rep in range(-1, args.repeat):  # rep -1: warm-up, not recorded
        for name, client in clients.items():
            async with client(url) as fetch:
                foreign = ForeignCpu(pgids)
                foreign.start()
                r = await drive(fetch, args.inflight, 1 if rep < 0 else args.seconds, expected)
                r["other_cores"] = round(foreign.stop(), 3)
            if rep >= 0:
                results[name].append(r)
                print(f"rep {rep + 1} {name}: {r['requests'] / r['seconds']:8.1f} req/s", flush=True)
    return results


def render(args: argparse.Namespace, results: dict[str, list[dict]], ref: list[dict], info: dict) -> str:
    rows = []
    for name, runs in results.items():
        rps = [r["requests"] / r["seconds"] for r in runs]
        rows.append((name, statistics.median(rps), min(rps), max(rps),
                     statistics.median(r["bytes"] / r["seconds"] / 1e6 for r in runs),
                     sum(r["wrong_size"] for r in runs), statistics.median(r["other_cores"] for r in runs)))
    base = rows[0][1]
    best = max(rows, key=lambda row: row[1])
    wrk_rps = [r["requests"] / r["duration_us"] * 1e6 for r in ref]
    v = info["v"]
    out = [
        f"Command: `{info['command']}`  ",
        f"Date: {info['date']}  ",
        f"Machine: {v['nproc']} cores ({v['cpu']}), Python {v['python']}, uvloop {v['uvloop']}, "
        f"httpx {v['httpx']}, aiohttp {v['aiohttp']}  ",
        f"Code: `proxy.upstream.archive` from the {info['code']}  ",
        f"Load average (1 min): {info['load_start']:.2f} before, {info['load_end']:.2f} after. Other sessions "
        "may share this machine: 'other load' is the median number of cores that processes other than this "
        "client, wrk and Orthanc kept busy during the runs.",
        "",
        f"One 512x512 CT frame from a fresh Orthanc {info['orthanc']} (`frames/1`, `transfer-syntax=*`, "
        f"{info['expected']:,} B body), read repeatedly with {args.inflight} requests in flight for "
        f"{args.seconds} s on uvloop, clients interleaved, median of {args.repeat} runs (min–max) after a 1 s "
        "warm-up each. Client, Orthanc and wrk share the 2 cores.",
        "",
        "| client | req/s (min–max) | MB/s (body) | vs httpx default | wrong-size bodies | other load |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | {m:,.0f} ({lo:,.0f}–{hi:,.0f}) | {mb:,.0f} | {m / base:.2f}× | {bad} | {oth:.2f} |"
          for n, m, lo, hi, mb, bad, oth in rows],
        f"| wrk -t2 -c{args.inflight} (C reference: Orthanc's own rate) | {statistics.median(wrk_rps):,.0f} "
        f"({min(wrk_rps):,.0f}–{max(wrk_rps):,.0f}) | – | {statistics.median(wrk_rps) / base:.2f}× | – | "
        f"{statistics.median(r['other_cores'] for r in ref):.2f} |",
        "",
        f"Fastest Python client here: {best[0]} ({best[1] / base:.2f}× httpx's default transport). "
        "The `proxy.upstream.archive.Archive` row is the proxy's own upstream path (`Archive.open()` + "
        "`iter_chunks()`, with its metrics), whatever transport it uses at the code state above.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--inflight", type=int, default=6)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    on_sigterm()
    info = {"command": shlex.join(["python", "benchmarks/upstream_clients.py", *(argv or sys.argv[1:])]),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_start": os.getloadavg()[0], "v": versions(), "code": code_state()}
    with Stack(WORK / "upstream-clients", slices=4, proxy=False, nginx=False) as st:
        assert st.orthanc is not None
        url = st.orthanc.dicomweb_url + st.targets["frame"].path
        info["orthanc"] = st.orthanc_version
        info["expected"] = len(httpx.get(url, headers=HEADERS, trust_env=False).content)
        print(f"frame {url.replace(urlsplit(url).path, '/…')} body {info['expected']:,} B", flush=True)
        results = uvloop.run(measure(url, args, info["expected"], st.pgids()))
        ref = [wrk(url, ACCEPT_FRAME, args.inflight, int(args.seconds), frozenset(st.pgids()))
               for _ in range(args.repeat)]
    info["load_end"] = os.getloadavg()[0]
    body = render(args, results, ref, info)
    replace_section(args.out, SECTION, body)
    print(body)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: Orthanc has been stopped", file=sys.stderr)
        sys.exit(130)
