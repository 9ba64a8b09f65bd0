"""For the egress tests: a private CA made here, TLS stand-ins (an OAuth2 token endpoint, a JWKS endpoint)
serving certificates from it, and a real tinyproxy (Debian's) on a free loopback port."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import secrets
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import free_port, require_binary


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA ("ca") and a server certificate for 127.0.0.1/localhost it signed ("cert", "key")."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dicomweb-edge egress test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


class TlsJsonServer:
    """An https server on 127.0.0.1 (certificate from `make_pki`) answering each request with
    `answer(method, path, headers, body) -> (status, document)`; counts the requests it answered."""

    def __init__(self, pki: dict[str, Path], answer: Callable[[str, str, Any, bytes], tuple[int, Any]]) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
                outer.requests += 1
                status, doc = answer(self.command, self.path, self.headers, body)
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve  # noqa: N815 (http.server's naming)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pki["cert"]), str(pki["key"]))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_port}"
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TokenIssuer:
    """The checks an OAuth2 token endpoint makes (client-credentials grant, client authenticated with
    Basic): a wrong client or grant gets 401; a right one a fresh token, which `accepts` then knows."""

    def __init__(self, client_id: str, client_secret: str) -> None:
        self.expected = "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        self.issued: set[str] = set()

    def __call__(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        form = parse_qs(body.decode())
        if method != "POST" or headers.get("Authorization") != self.expected or \
                form.get("grant_type") != ["client_credentials"]:
            return 401, {"error": "invalid_client"}
        token = secrets.token_hex(16)
        self.issued.add(token)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600}

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        return scheme == "Bearer" and token in self.issued


class TinyProxy:
    """Debian's tinyproxy on a free loopback port, in the foreground, logging every request it relays.
    `ports`: the ports CONNECT may reach (tinyproxy refuses the others); `auth`: (user, password) it asks for."""

    def __init__(self, workdir: Path, ports: Iterable[int], auth: tuple[str, str] | None = None) -> None:
        self.binary = require_binary("tinyproxy")
        self.port = free_port()
        self.log = workdir / f"tinyproxy-{self.port}.log"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Allow 127.0.0.1", "Timeout 30", f'LogFile "{self.log}"',
                 "LogLevel Info", "MaxClients 50", *(f"ConnectPort {p}" for p in ports)]
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        self.config = workdir / f"tinyproxy-{self.port}.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TinyProxy:
        self._proc = subprocess.Popen([self.binary, "-d", "-c", str(self.config)], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(self.url, timeout=1, trust_env=False)
                return self
            except httpx.TransportError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tinyproxy did not start: {self.log_text()}") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def relayed(self, line: str) -> bool:
        """Whether the proxy logged a request line (`CONNECT 127.0.0.1:PORT`, `GET http://...`)."""
        return f"): {line}" in self.log_text()


NGINX_TLS = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log {dir}/access.log;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp;
  fastcgi_temp_path {dir}/tmp; uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    client_max_body_size 0;
    location / {{
      proxy_pass http://127.0.0.1:{upstream};
      proxy_http_version 1.1;
      proxy_set_header Host $http_host;
      proxy_buffering off;
    }}
  }}
}}
"""


class TlsTerminator:
    """Debian's nginx on a free loopback port terminating TLS (certificate from `make_pki`) in front of a
    plain http server on 127.0.0.1:`upstream`."""

    def __init__(self, workdir: Path, pki: dict[str, Path], upstream: int) -> None:
        self.binary = require_binary("nginx")
        self.port = free_port()
        self.dir = workdir / f"nginx-{self.port}"
        (self.dir / "tmp").mkdir(parents=True)
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(NGINX_TLS.format(dir=self.dir, port=self.port, cert=pki["cert"], key=pki["key"],
                                              upstream=upstream))
        self.url = f"https://127.0.0.1:{self.port}"
        self._ca = str(pki["ca"])
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TlsTerminator:
        args = [self.binary, "-e", str(self.dir / "error.log"), "-p", str(self.dir), "-c", str(self.conf)]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 15
        trust = ssl.create_default_context(cafile=self._ca)
        while True:
            try:
                httpx.get(self.url + "/", timeout=1, trust_env=False, verify=trust)
                return self
            except httpx.TransportError:
                error_log = self.dir / "error.log"
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {error_log.read_text() if error_log.exists() else ''}"
                                       ) from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
