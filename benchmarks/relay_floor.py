"""What one more hop costs a series retrieve on this machine, with the least work a relay can do (issue 2).

    python benchmarks/relay_floor.py [--rounds 4] [--duration 5] [--slices 200]

Issue 2 asks a series retrieve through the proxy for >= 0.8x the archive's own throughput. This puts the
proxy beside two references in front of the same Orthanc, wrk at one connection, interleaved rounds:

- nginx-proxy: nginx `proxy_pass` (the stack of run.py), a C reverse proxy copying through its buffers;
- floor: `serve_floor` below, the smallest relay that does the proxy's job: one blocking thread, one
  connection, the multipart re-framed under its own boundary with a Content-Type and Content-Location per
  part, payloads spliced socket → pipe → socket, no timeouts, no metrics, no error handling. Nothing in
  Python can relay with less; it is a measuring stick, never a server to run.

Per round and server: MB/s, and per series retrieved the CPU of the relay (proxy workers, nginx workers
or the floor), of Orthanc and of wrk, softirq time, and packets on the loopback interface. The section
"## One more hop: the floor (issue 2)" of benchmarks/RESULTS.md is replaced with the results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from stack import ACCEPT_SERIES, REPO, WORK, Stack, free_port, on_sigterm, replace_section, spawn, tail  # noqa: E402

SECTION = "## One more hop: the floor (issue 2)"
SERVERS = ("orthanc", "proxy", "nginx-proxy", "floor")
TICK = os.sysconf("SC_CLK_TCK")


def serve_floor(port: int, upstream: str, prefix: str) -> None:
    """The floor relay: `GET /dicomweb/...` → `GET {prefix}/...` at `upstream` (host:port), re-framed."""
    host, up_port = upstream.rsplit(":", 1)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(8)
    while True:
        r, w = os.pipe()  # a fresh pipe per client: one cut mid-relay may leave bytes in the old one
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1024 * 1024)  # as the proxy asks (splice.PIPE_SIZE)
        client, _ = srv.accept()
        up: socket.socket | None = None
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            buf = b""
            while True:
                head, buf = _head(client, buf)
                path = head.split(b" ", 2)[1].replace(b"/dicomweb", prefix.encode(), 1)
                accept = re.search(rb"(?im)^accept: *(.*?)\r\n", head)
                up = socket.create_connection((host, int(up_port)))
                up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                up.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nAccept: %s\r\n\r\n"
                           % (path, upstream.encode(), accept.group(1) if accept else b"*/*"))
                up_head, pending = _head(up, b"")
                boundary = re.search(rb'boundary="?([^";\r\n]+)', up_head)
                if boundary is None:
                    raise ConnectionError("not multipart")
                delim = b"--" + boundary.group(1)
                client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: multipart/related; "
                               b"type=\"application/dicom\"; boundary=floor\r\nTransfer-Encoding: chunked\r\n\r\n")
                first = True
                while True:
                    while True:  # the next delimiter and its part's headers (or the closing delimiter)
                        i = pending.find(delim)
                        if i >= 0 and (pending[i + len(delim):i + len(delim) + 2] == b"--"
                                       or pending.find(b"\r\n\r\n", i) >= 0):
                            break
                        more = up.recv(65536)
                        if not more:
                            raise ConnectionError("archive closed mid-body")
                        pending += more
                    if pending[i + len(delim):i + len(delim) + 2] == b"--":
                        break
                    j = pending.find(b"\r\n\r\n", i)
                    fields = pending[i:j]
                    n = int(re.search(rb"(?i)content-length: *(\d+)", fields).group(1))
                    ctype = re.search(rb"(?i)content-type: *([^\r\n]+)", fields).group(1)
                    ours = b"%s--floor\r\nContent-Type: %s\r\nContent-Location: http://floor/x\r\n\r\n" % (
                        b"" if first else b"\r\n", ctype)
                    first = False
                    pending = pending[j + 4:]
                    have, pending = pending[:n], pending[n:]
                    client.sendmsg([b"%x\r\n" % (len(ours) + n), ours, have])
                    left = n - len(have)
                    while left:
                        moved = os.splice(up.fileno(), w, left)
                        if not moved:
                            raise ConnectionError("archive closed mid-part")
                        left -= moved
                        while moved:
                            moved -= os.splice(r, client.fileno(), moved)
                    client.sendall(b"\r\n")  # (the chunk's CRLF)
                up.close()
                close = b"\r\n--floor--\r\n"
                client.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(close), close))
        except (ConnectionError, OSError, AttributeError, ValueError):
            pass
        finally:
            for s in (client, up):
                if s is not None:
                    s.close()
            os.close(r)
            os.close(w)


def _head(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    while b"\r\n\r\n" not in buf:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed")
        buf += more
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def _wait_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the floor relay exited:\n{tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the floor relay did not listen")


def _cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) of `pids` so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def _softirq() -> float:
    with open("/proc/stat") as f:
        return int(f.readline().split()[7]) / TICK


def _lo_packets() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[1])
    return 0


def one_run(url: str, relay: list[int], orthanc: list[int], duration: int) -> dict:
    """wrk -c1 on `url` for `duration` s: MB/s and per-series CPU of each party, softirq and packets."""
    before = (_cpu(relay), _cpu(orthanc), _softirq(), _lo_packets())
    out = subprocess.run(["/usr/bin/time", "-f", "WRK %U %S", "wrk", "-t1", "-c1", f"-d{duration}s", "--timeout",
                          "30s", "-H", f"Accept: {ACCEPT_SERIES}", url], capture_output=True, text=True,
                         timeout=duration + 90)
    after = (_cpu(relay), _cpu(orthanc), _softirq(), _lo_packets())
    text = out.stdout + out.stderr
    req = int(re.search(r"(\d+) requests in", text).group(1))
    nbytes = re.search(r"requests in [\d.]+s, ([\d.]+)([KMG]?B) read", text)
    if nbytes is None:
        raise RuntimeError(f"wrk said:\n{text}")
    scale = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[nbytes.group(2)]
    wrk_cpu = sum(map(float, re.search(r"WRK ([\d.]+) ([\d.]+)", text).groups()))
    per = max(req, 1)
    return {"req": req, "mb_s": float(nbytes.group(1)) * scale / 1e6 / duration,
            "relay_ms": 1000 * (after[0] - before[0]) / per, "orthanc_ms": 1000 * (after[1] - before[1]) / per,
            "wrk_ms": 1000 * wrk_cpu / per, "softirq_ms": 1000 * (after[2] - before[2]) / per,
            "packets": (after[3] - before[3]) / per}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--slices", type=int, default=200)
    p.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    p.add_argument("--serve", nargs=3, metavar=("PORT", "UPSTREAM", "PREFIX"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve_floor(int(args.serve[0]), args.serve[1], args.serve[2])
        return 0
    on_sigterm()
    command = shlex.join(["python", "benchmarks/relay_floor.py", *(sys.argv[1:] if argv is None else argv)])
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    workdir = WORK / "floor"
    print(f"setting up in {workdir} …", flush=True)
    with Stack(workdir, slices=args.slices, workers=2) as st:
        assert st.orthanc is not None and st.nginx is not None
        floor_port = free_port()
        upstream, prefix = st.orthanc.dicomweb_url.split("/", 3)[2:]
        floor = spawn(st.stack, [sys.executable, str(Path(__file__)), "--serve", str(floor_port), upstream,
                                 "/" + prefix], workdir / "floor.log")
        _wait_port(floor_port, floor, workdir / "floor.log")
        nginx_workers = [int(x) for x in subprocess.run(["pgrep", "-P", str(st.nginx.pid)], capture_output=True,
                                                         text=True).stdout.split()]
        relays = {"orthanc": [], "proxy": st.worker_pids(), "nginx-proxy": nginx_workers, "floor": [floor.pid]}
        urls = {s: st.url(s, "series") for s in SERVERS[:3]}
        urls["floor"] = f"http://127.0.0.1:{floor_port}/dicomweb{st.targets['series'].path}"
        for s in SERVERS:  # warm-up, not recorded
            one_run(urls[s], relays[s], [st.orthanc.pid], 1)
        runs: dict[str, list[dict]] = {s: [] for s in SERVERS}
        for i in range(args.rounds):
            for s in SERVERS:
                runs[s].append(one_run(urls[s], relays[s], [st.orthanc.pid], args.duration))
                r = runs[s][-1]
                print(f"round {i + 1} {s:12} {r['mb_s']:8.1f} MB/s  relay {r['relay_ms']:5.1f}  orthanc "
                      f"{r['orthanc_ms']:5.1f}  wrk {r['wrk_ms']:5.1f}  softirq {r['softirq_ms']:5.1f} ms/series",
                      flush=True)
    body = render(runs, command, date, code, args)
    replace_section(args.out, SECTION, body)
    print(body)
    return 0


def render(runs: dict[str, list[dict]], command: str, date: str, code: str, args: argparse.Namespace) -> str:
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    direct = [r["mb_s"] for r in runs["orthanc"]]
    lines = [f"Command: `{command}`<br>", f"Date: {date}, code at {code}", "",
             f"wrk -t1 -c1 -d{args.duration}s on the series retrieve ({args.slices} CT slices, ~105 MB, "
             f"`transfer-syntax=*`), the four servers interleaved in each of {args.rounds} rounds after a 1 s "
             "warm-up, in front of the same Orthanc. Medians; ratio per round against that round's Orthanc. "
             "CPU in ms per series retrieved; 'relay' is the proxy's workers, nginx's workers or the floor "
             "relay; softirq is the whole machine's (loopback TCP is processed there).", "",
             "| server | MB/s | / direct (per round) | relay CPU | Orthanc CPU | wrk CPU | softirq | lo packets |",
             "|---|---|---|---|---|---|---|---|"]
    for s in SERVERS:
        m = med[s]
        ratios = [r["mb_s"] / d for r, d in zip(runs[s], direct, strict=True)]
        lines.append(f"| {s} | {m['mb_s']:,.0f} | {statistics.median(ratios):.2f} "
                     f"({', '.join(f'{x:.2f}' for x in ratios)}) | {m['relay_ms']:.0f} | {m['orthanc_ms']:.0f} | "
                     f"{m['wrk_ms']:.0f} | {m['softirq_ms']:.0f} | {m['packets']:,.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
