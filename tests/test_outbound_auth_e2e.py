"""The proxy's own credentials towards each archive (issue 7 point 3).

Four sample archives behind one proxy: one wants an OAuth2 client-credentials token from a token endpoint
run here (short-lived tokens, every token request counted), one Basic (password from a file), one a static
bearer token (from an environment variable), one nothing. Each archive refuses a request without its own
credential, as a secured PACS does. A credential must reach its own archive only, never the log, never
`check-config`'s output; the caller's Authorization header is not passed on.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import httpx
import pytest
from support import REPO_ROOT, ProxyProcess

from proxy.demo.archive import ArchiveServer, SampleArchive
from proxy.demo.synth import Patient, Study, ct_series
from proxy.upstream.credentials import CredentialError, OAuth2ClientCredentials

LIFETIME = 2.0  # seconds an issued token is valid: the proxy must renew it before that
GRACE = 0.5  # the archive's allowance for a request in transit on a busy machine (far below LIFETIME)
CLIENT_ID, CLIENT_SECRET = "edge-client", "cs-" + secrets.token_hex(12)
PASSWORD, BEARER = "pw-" + secrets.token_hex(12), "bt-" + secrets.token_hex(12)
NAMES = ("oauth", "basic", "bearer", "open")


class TokenEndpoint:
    """An OAuth2 token endpoint (client credentials, client authenticated with Basic) on 127.0.0.1."""

    def __init__(self) -> None:
        self.requests = 0
        self.valid: dict[str, float] = {}  # token -> monotonic expiry
        self.issued: list[str] = []
        self.failing = False  # answer 500 to every token request
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                endpoint.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if endpoint.failing:
                    self._answer(500, {"error": "temporarily_unavailable"})
                    return
                form = parse_qs(body.decode())
                expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
                if self.headers.get("Authorization") != expected or form.get("grant_type") != ["client_credentials"]:
                    self._answer(401, {"error": "invalid_client"})
                    return
                token = secrets.token_hex(16)
                endpoint.valid[token] = time.monotonic() + LIFETIME
                endpoint.issued.append(token)
                self._answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": LIFETIME})

            def _answer(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/oauth2/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        return scheme == "Bearer" and self.valid.get(token, 0) + GRACE > time.monotonic()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tokens():
    endpoint = TokenEndpoint()
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def archives(tokens):
    basic = "Basic " + base64.b64encode(f"edge:{PASSWORD}".encode()).decode()
    rules = {"oauth": tokens.accepts, "basic": lambda v: v == basic, "bearer": lambda v: v == f"Bearer {BEARER}",
             "open": None}
    servers = {}
    for i, name in enumerate(NAMES):
        archive = SampleArchive(name.upper())
        archive.extend(ct_series(Study(Patient(f"DOE^{name.upper()}", f"PID-AUTH-{i}"), accession=f"ACC-A{i}"),
                                 1, rows=32, cols=32))
        archive.required_authorization = rules[name]
        servers[name] = ArchiveServer(archive).start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def config(archives, tokens, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("proxy_outbound")
    (workdir / "pacs-password").write_text(PASSWORD + "\n")
    (workdir / "client-secret").write_text(CLIENT_SECRET)
    path = workdir / "edge.toml"
    path.write_text(
        "[federation]\nhealth_interval = 0\n\n"
        f'[[archives]]\nname = "oauth"\nurl = "{archives["oauth"].dicomweb_url}"\n'
        f'auth = {{ type = "oauth2", token_url = "{tokens.url}", client_id = "{CLIENT_ID}", '
        f'client_secret_file = "{workdir / "client-secret"}", scope = "dicomweb" }}\n\n'
        f'[[archives]]\nname = "basic"\nurl = "{archives["basic"].dicomweb_url}"\n'
        f'auth = {{ type = "basic", username = "edge", password_file = "{workdir / "pacs-password"}" }}\n\n'
        f'[[archives]]\nname = "bearer"\nurl = "{archives["bearer"].dicomweb_url}"\n'
        'auth = { type = "bearer", token_env = "TEST_PACS_TOKEN" }\n\n'
        f'[[archives]]\nname = "open"\nurl = "{archives["open"].dicomweb_url}"\n')
    return path


@pytest.fixture(scope="module")
def proxy(config):
    with ProxyProcess({}, config.parent, extra_args=["--config", str(config), "--log-level", "debug"],
                      env={"TEST_PACS_TOKEN": BEARER}) as p:
        yield p


def test_one_token_for_concurrent_first_requests(proxy, tokens, archives):
    assert tokens.requests == 0  # nothing asked before the first request (no health probes here)
    url = f"{proxy.url}/upstreams/oauth/dicomweb/studies"
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: httpx.get(url, trust_env=False, timeout=10).status_code, range(8)))
    assert statuses == [200] * 8
    assert tokens.requests == 1  # single flight: eight requests, one token


def test_token_is_renewed_before_it_expires(proxy, tokens):
    url = f"{proxy.url}/upstreams/oauth/dicomweb/studies"
    first = tokens.requests
    deadline = time.monotonic() + 4 * LIFETIME
    while tokens.requests < first + 2:  # two renewals, every request answered 200 meanwhile
        r = httpx.get(url, trust_env=False, timeout=10)
        assert r.status_code == 200, r.text
        assert time.monotonic() < deadline, "the proxy did not renew its token"
        time.sleep(0.05)


def test_each_archive_gets_its_own_credential_and_no_other(proxy, archives):
    r = httpx.get(f"{proxy.dicomweb_url}/studies", headers={"Authorization": "Bearer caller-token"},
                  trust_env=False, timeout=10)
    assert r.status_code == 200 and "warning" not in r.headers, (r.status_code, r.headers.get("warning"))
    names = sorted(s["00100010"]["Value"][0]["Alphabetic"] for s in r.json())
    assert names == sorted(f"DOE^{name.upper()}" for name in NAMES)  # each archive's own study, once
    for secret in (PASSWORD, BEARER, CLIENT_SECRET, "caller-token"):
        assert secret not in r.text  # no credential in any rewritten URL
    seen = {name: set(server.archive.authorizations) for name, server in archives.items()}
    assert seen["open"] == {None}, seen["open"]  # neither the caller's token nor another archive's credential
    assert all(v.startswith("Bearer ") and "caller-token" not in v for v in seen["oauth"]), seen["oauth"]
    assert seen["basic"] == {"Basic " + base64.b64encode(f"edge:{PASSWORD}".encode()).decode()}
    assert seen["bearer"] == {f"Bearer {BEARER}"}


def test_a_refused_credential_is_a_502_naming_the_archive(proxy, archives):
    archive = archives["basic"].archive
    rule, archive.required_authorization = archive.required_authorization, lambda v: False
    try:
        r = httpx.get(f"{proxy.url}/upstreams/basic/dicomweb/studies/1.2.3/metadata", trust_env=False, timeout=10)
    finally:
        archive.required_authorization = rule
    assert r.status_code == 502 and "credentials" in r.json()["reason"], r.text


def test_secrets_never_reach_the_log_or_check_config(proxy, tokens, config):
    httpx.get(f"{proxy.dicomweb_url}/studies", trust_env=False, timeout=10)
    log = proxy.log_path.read_text()
    assert "obtained an OAuth2 access token" in log  # the log is there and talks about tokens, without them
    for secret in (PASSWORD, BEARER, CLIENT_SECRET, *tokens.issued,
                   base64.b64encode(f"edge:{PASSWORD}".encode()).decode()):
        assert secret not in log
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(config)], cwd=REPO_ROOT,
                         env={"PATH": "/usr/bin:/bin", "TEST_PACS_TOKEN": BEARER, "PYTHONPATH": str(REPO_ROOT)},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "password_file" in out.stdout and "token_env" in out.stdout and "client_secret_file" in out.stdout
    for secret in (PASSWORD, BEARER, CLIENT_SECRET):
        assert secret not in out.stdout


def test_inline_secrets_are_printed_redacted(tmp_path):
    cfg = tmp_path / "inline.toml"
    cfg.write_text('[[archives]]\nname = "a"\nurl = "http://127.0.0.1:1/dicom-web"\n'
                   f'auth = {{ type = "basic", username = "edge", password = "{PASSWORD}" }}\n')
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(cfg)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert PASSWORD not in out.stdout and 'password = "***"' in out.stdout


@pytest.mark.parametrize("auth, message", [
    ('{ type = "oauth2", token_url = "http://login.example.org/token", client_id = "x", client_secret = "y" }',
     "https"),
    ('{ type = "basic", username = "edge" }', "password"),
    ('{ type = "bearer", token_env = "SURELY_UNSET_VARIABLE_4711" }', "not set"),
    ('{ type = "kerberos" }', "auth.type"),
    (None, "no credentials in the url"),
])
def test_unusable_credentials_are_configuration_errors(tmp_path, auth, message):
    cfg = tmp_path / "bad.toml"
    if auth is None:
        cfg.write_text('[[archives]]\nname = "a"\nurl = "http://edge:secret@127.0.0.1:1/dicom-web"\n')
    else:
        cfg.write_text(f'[[archives]]\nname = "a"\nurl = "http://127.0.0.1:1/dicom-web"\nauth = {auth}\n')
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(cfg)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and message in out.stderr, out.stderr


async def test_a_failing_token_endpoint_is_not_hammered_and_a_valid_token_is_kept():
    """Renewal fails: the current token is used until it really expires; then requests fail at once,
    without a token request each, until the retry pause is over. (Renewal and expiry are brought forward
    by setting the provider's clock marks, so nothing here waits.)"""
    endpoint = TokenEndpoint()
    try:
        creds = OAuth2ClientCredentials({"token_url": endpoint.url, "client_id": CLIENT_ID,
                                         "client_secret": CLIENT_SECRET}, "x")
        first = await creds.authorization()
        endpoint.failing = True
        creds._renew_at = 0.0  # renewal is due; the token itself is valid for LIFETIME more seconds
        for _ in range(5):
            assert await creds.authorization() == first
        assert endpoint.requests == 2  # one failed renewal, then a pause instead of one request per call
        creds._expires_at = 0.0  # now it has expired
        for _ in range(5):
            with pytest.raises(CredentialError, match="HTTP 500"):
                await creds.authorization()
        assert endpoint.requests == 2
    finally:
        endpoint.close()
