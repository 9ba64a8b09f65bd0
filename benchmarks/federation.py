"""Federated search latency with a slow and a dead archive (issue 3).

    python benchmarks/federation.py [--requests 30] [--delay 0.5] [--out benchmarks/RESULTS.md]

Three archives behind one proxy: Orthanc (healthy), a sample archive that answers every request
500 ms late (healthy but slow), and a "dead" archive that accepts connections and never answers
(a hung PACS: the worst kind, it costs a full deadline instead of a refused connection).
Measured, one request at a time (latency, not throughput: a Python client is fine here):
  1. each healthy archive searched directly: p50;
  2. the proxy while the dead archive's breaker is still closed (the first searches);
  3. the proxy once the breaker is open.
Target: proxy p50 with the breaker open <= slowest healthy archive p50 + 10 ms.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from stack import WORK, on_sigterm, replace_section, versions  # noqa: E402
from support import ProxyProcess  # noqa: E402

from proxy.demo.archive import ArchiveServer, Faults, SampleArchive  # noqa: E402
from proxy.demo.orthanc import OrthancServer  # noqa: E402
from proxy.demo.synth import Patient, Study, ct_series  # noqa: E402

QUERY = "/studies?PatientName=FED*"


def hung_server() -> tuple[socket.socket, int, threading.Event]:
    """A socket that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    stop = threading.Event()
    held: list[socket.socket] = []

    def loop() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    threading.Thread(target=loop, daemon=True).start()
    return sock, sock.getsockname()[1], stop


def timed(client: httpx.Client, url: str, n: int, headers: dict[str, str] | None = None) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.get(url, headers=headers)
        out.append((time.perf_counter() - t) * 1000)
        assert r.status_code in (200, 204), (url, r.status_code, r.text[:200])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--delay", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    on_sigterm()
    work = WORK / "federation"
    work.mkdir(parents=True, exist_ok=True)
    nc = {"Cache-Control": "no-cache"}  # every search goes to the archives
    studies = [list(ct_series(Study(Patient(f"FED^{i}", f"PIDF{i}")), 1, rows=32, cols=32)) for i in range(3)]
    slow = SampleArchive("SLOW", Faults(first_byte_delay=args.delay))
    slow.extend(studies[1][0:1])
    sock, dead_port, stop = hung_server()
    with OrthancServer(work / "orthanc", "FED") as orthanc, ArchiveServer(slow) as slow_server:
        orthanc.store(studies[0] + studies[2])
        config = work / "config.toml"
        config.write_text(f"""
[federation]
health_interval = 3600
[[archives]]
name = "orthanc"
url = "{orthanc.dicomweb_url}"
[[archives]]
name = "slow"
url = "{slow_server.dicomweb_url}"
profile = "generic"
search_deadline = 5
[[archives]]
name = "dead"
url = "http://127.0.0.1:{dead_port}/dicom-web"
search_deadline = 2
breaker_threshold = 3
breaker_cooldown = 3600
timeouts = {{ connect = 1, first_byte = 2, idle_read = 2 }}
""")
        with ProxyProcess({}, work, extra_args=["--config", str(config)]) as proxy, \
                httpx.Client(timeout=30, trust_env=False) as client:
            direct = {"orthanc": timed(client, orthanc.dicomweb_url + QUERY, args.requests),
                      "slow": timed(client, slow_server.dicomweb_url + QUERY, max(5, args.requests // 3))}
            before = timed(client, proxy.dicomweb_url + QUERY, 3, nc)  # the dead archive still asked
            after = timed(client, proxy.dicomweb_url + QUERY, args.requests, nc)
            last = client.get(proxy.dicomweb_url + QUERY, headers=nc)
            found = len(last.json())
            ready = client.get(proxy.url + "/readyz").json()["archives"]["dead"]
    stop.set()
    sock.close()
    p50 = {k: statistics.median(v) for k, v in direct.items()}
    slowest = max(p50.values())
    proxy_p50 = statistics.median(after)
    ok = proxy_p50 <= slowest + 10
    cmd = "python benchmarks/federation.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def row(name: str, xs: list[float]) -> str:
        return f"| {name} | {statistics.median(xs):.1f} | {min(xs):.1f} | {max(xs):.1f} | {len(xs)} |"

    def verdict(good: bool) -> str:
        return "**PASS**" if good else "**FAIL**"

    lines = [
        f"Command: `{cmd.strip()}`<br>",
        f"Date: {datetime.now(UTC).isoformat(timespec='seconds')}<br>",
        "Software: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        f"Archives: Orthanc (healthy), a sample archive answering {args.delay * 1000:.0f} ms late (healthy, slow),",
        "and a hung archive that accepts connections and never answers (search deadline 2 s, breaker after 3",
        "failures). Requests one at a time, `Cache-Control: no-cache` so every search fans out. Latency in ms.",
        "",
        "| measurement | p50 | min | max | n |",
        "|---|---|---|---|---|",
        row("Orthanc direct", direct["orthanc"]),
        row("slow archive direct", direct["slow"]),
        row("proxy, breaker still closed (first 3)", before),
        row("proxy, breaker open", after),
        "",
        "| metric | value | target | result |",
        "|---|---|---|---|",
        f"| proxy p50 − slowest healthy archive p50 (breaker open) | {proxy_p50 - slowest:+.1f} ms | ≤ 10 ms "
        f"| {verdict(ok)} |",
        f"| dead archive's breaker after the run | {ready['breaker']} | open | {verdict(ready['breaker'] == 'open')} |",
        "",
        f"Studies in the last federated answer: {found} (Orthanc 2, slow archive 1). While the breaker was closed",
        "each search waited for the dead archive's 2 s deadline; once open, the dead archive costs nothing and",
        "is named in a `Warning` instead.",
    ]
    body = "\n".join(lines) + "\n"
    replace_section(args.out, "## Federated search with a slow and a dead archive (issue 3)", body)
    print(body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
