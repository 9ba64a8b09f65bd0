"""Requests after idle gaps to an https archive: what keep-alive per archive saves (issue 25 point 6).

A cloud archive is reached over TLS and keeps idle connections for minutes; a viewer asks, pauses (the
reader looks at the image), and asks again. With the connection dropped after 0.75 s (the proxy's fixed
keep-alive before, right for Orthanc, which closes idle connections at 1 s), every request after a pause
pays a new TCP connection and a full TLS handshake. Here the archive is nginx terminating TLS (keepalive
75 s) in front of Orthanc; each round asks every variant for the same frame once, in a shuffled order,
then waits `--gap` seconds. No cache: every request goes to the archive.

Variants (one proxy each, same worker count): `keepalive 0.75 s` (before) and `keepalive 30 s` (an
archive's `keepalive`, the profile default for cloud profiles), plus two baselines in the same run:
nginx asked directly on a kept connection (the floor) and on a new TLS connection per request (what
each request through the proxy cost before, plus the proxy's own hop).

    python benchmarks/idle_gaps.py [--rounds 30] [--gap 1.5] [--out benchmarks/RESULTS.md]

Not done, with the reason: TLS session resumption (a reconnect after a pause longer than the archive keeps
connections would skip part of the handshake: the whole new TLS connection costs ~5 ms here, the two nginx
rows) — with keep-alive per archive such reconnects are rare, asyncio offers no session argument, and the
gain could not reach the 10% an optimisation must show on a user's path; HTTP/2 — the upstream client
speaks HTTP/1.1 with one request per connection at a time, and no archive here offers HTTP/2 to measure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import random
import shutil
import ssl
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from stack import WORK, free_port, on_sigterm, replace_section, spawn, versions, wait_http  # noqa: E402

sys.path.insert(0, str(REPO))
from proxy.demo.orthanc import OrthancServer  # noqa: E402
from proxy.demo.synth import Patient, Study, ct_series  # noqa: E402

ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
HEADING = "## Requests after idle gaps to an https archive (issue 25 point 6)"


def _pki(where: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idle-gaps CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    paths = where / "ca.pem", where / "cert.pem", where / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def _nginx(stack: ExitStack, work: Path, orthanc_port: int, cert: Path, key: Path) -> int:
    port = free_port()
    (work / "nginx").mkdir()
    conf = work / "nginx" / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
error_log {work}/nginx/error.log warn;
pid {work}/nginx/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx/body; proxy_temp_path {work}/nginx/proxy;
    fastcgi_temp_path {work}/nginx/fastcgi; uwsgi_temp_path {work}/nginx/uwsgi; scgi_temp_path {work}/nginx/scgi;
    upstream orthanc {{ server 127.0.0.1:{orthanc_port}; keepalive 8; keepalive_timeout 500ms; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert}; ssl_certificate_key {key};
        keepalive_timeout 75s;
        location / {{ proxy_pass http://orthanc; proxy_http_version 1.1; proxy_set_header Connection "";
                      proxy_buffering off; }}
    }}
}}
""")
    proc = spawn(stack, [shutil.which("nginx") or "/usr/sbin/nginx", "-e", str(work / "nginx" / "error.log"),
                         "-p", str(work / "nginx"), "-c", str(conf), "-g", "daemon off;"], work / "nginx.log")
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            httpx.get(f"https://127.0.0.1:{port}/", verify=False, timeout=1)
            return port
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"nginx did not start:\n{(work / 'nginx' / 'error.log').read_text()}")


def _proxy(stack: ExitStack, work: Path, name: str, archive: str, ca: Path, keepalive: float) -> str:
    port = free_port()
    config = work / f"{name}.toml"
    config.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n\n[federation]\nhealth_interval = 0\n\n'
                      f'[[archives]]\nname = "cloud"\nurl = "{archive}"\nprofile = "generic"\n'
                      f'keepalive = {keepalive}\ntls = {{ ca_file = "{ca}" }}\n')
    proc = spawn(stack, [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)], work / f"{name}.log")
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, name, work / f"{name}.log")
    return f"http://127.0.0.1:{port}/dicomweb"


def _study(orthanc: OrthancServer) -> str:
    study = Study(Patient("IDLE^GAPS", "IDLE01"), accession="IDLE01")
    datasets = list(ct_series(study, 4))
    orthanc.store(datasets)
    ds = datasets[0]
    return f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/1"


def _measure(args: argparse.Namespace, bases: dict[str, str], path: str, ca: Path) -> dict[str, list[float]]:
    verify = ssl.create_default_context(cafile=str(ca))
    kept = httpx.Client(verify=verify, trust_env=False, timeout=30)
    times: dict[str, list[float]] = {name: [] for name in bases}
    for _ in range(args.rounds):
        for name in random.sample(list(bases), len(bases)):
            fresh = name == "nginx, new TLS connection per request"
            client = httpx.Client(verify=verify, trust_env=False, timeout=30) if fresh else kept
            started = time.perf_counter()
            r = client.get(bases[name] + path, headers={"Accept": ACCEPT})
            times[name].append(time.perf_counter() - started)
            assert r.status_code == 200, (name, r.status_code, r.text[:200])
            if fresh:
                client.close()
        time.sleep(args.gap)
    kept.close()
    return times


def _machine() -> str:
    v = versions()
    return f"{v['nproc']} cores, {v['cpu']}, Python {v['python']}, {v['nginx']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--gap", type=float, default=1.5, help="seconds of idle time before each round")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args()
    on_sigterm()
    work = WORK / "idle_gaps"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with ExitStack() as stack:
        orthanc = OrthancServer(work / "orthanc", "IDLE")
        stack.callback(orthanc.stop)
        orthanc.start()
        path = _study(orthanc)
        ca, cert, key = _pki(work)
        archive = f"https://127.0.0.1:{_nginx(stack, work, orthanc.port, cert, key)}/dicom-web"
        bases = {"proxy, keepalive 0.75 s (before)": _proxy(stack, work, "short", archive, ca, 0.75),
                 "proxy, keepalive 30 s": _proxy(stack, work, "long", archive, ca, 30.0),
                 "nginx, kept connection (floor)": archive,
                 "nginx, new TLS connection per request": archive}
        times = _measure(args, bases, path, ca)
    before = statistics.median(times["proxy, keepalive 0.75 s (before)"])
    rows = ["| variant | median ms | p90 ms | median / before |", "|---|---:|---:|---:|"]
    for name, values in times.items():
        values.sort()
        median = statistics.median(values)
        rows.append(f"| {name} | {median * 1000:.2f} | {values[int(len(values) * 0.9)] * 1000:.2f} | "
                    f"{median / before:.2f} |")
    body = "\n".join([
        f"`python benchmarks/idle_gaps.py --rounds {args.rounds} --gap {args.gap}` "
        f"({dt.date.today().isoformat()}; {_machine()}).",
        "",
        f"One frame (64 KB) per variant per round, {args.gap} s idle before each round, {args.rounds} rounds; "
        "the archive is nginx terminating TLS in front of Orthanc (no proxy cache).",
        "",
        *rows,
    ])
    print(body)
    replace_section(args.out, HEADING, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
