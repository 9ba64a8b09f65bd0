"""A sequential latency probe: one keep-alive connection, one request at a time, a blocking client.

What `dicomweb-client` (requests) or a script does; wrk's event loop is a different client. On this
2-core machine the two give different added latencies for the same proxy (benchmarks/RESULTS.md), so
run.py reports both. Used by run.py; on its own: `python benchmarks/sequential.py URL [ACCEPT]`.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time
from urllib.parse import urlsplit


def _read_response(s: socket.socket) -> None:
    """Read one whole response with a Content-Length (what the probed targets send)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        more = s.recv(1 << 20)
        if not more:
            raise ConnectionError("closed before the response headers")
        buf += more
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise RuntimeError(f"HTTP {status}")
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])}
    if b"content-length" not in fields:
        raise RuntimeError("no Content-Length: the probe reads only counted bodies")
    need, got = int(fields[b"content-length"]), len(body)
    while got < need:
        more = s.recv(1 << 20)
        if not more:
            raise ConnectionError("closed inside the body")
        got += len(more)
    if got != need:
        raise RuntimeError("more bytes than the Content-Length: the probe sends one request at a time")


def probe(url: str, accept: str | None, n: int = 300, warm: int = 20) -> float:
    """Median seconds per request over `n` sequential requests (after `warm` unrecorded ones)."""
    u = urlsplit(url)
    target = u.path + (f"?{u.query}" if u.query else "")
    head = f"GET {target} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
    if accept:
        head += f"Accept: {accept}\r\n"
    request = (head + "\r\n").encode("latin-1")
    times = []
    with socket.create_connection((u.hostname, u.port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(warm + n):
            started = time.perf_counter()
            s.sendall(request)
            _read_response(s)
            if i >= warm:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


if __name__ == "__main__":
    print(f"p50 {probe(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None) * 1000:.2f} ms")
