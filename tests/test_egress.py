"""The egress settings (upstream/egress.py): which URL goes through which proxy, the environment only when
asked, the CAs an outbound TLS context trusts, the [egress] section's checks and masking."""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import subprocess
import sys

import pytest
from support import REPO_ROOT

from proxy.config import ConfigError, load
from proxy.upstream.egress import Egress, Route, client_context
from proxy.upstream.pool import Pool
from proxy.upstream.transport import ConnectTimeout
from proxy.upstream.tunnel import EgressError

ENV = {"HTTPS_PROXY": "http://envproxy:3128", "HTTP_PROXY": "http://plainproxy:8080", "NO_PROXY": "pacs.lan,.internal"}


def test_the_environment_is_ignored_unless_asked_for():
    assert Egress(environ=ENV).route("https://archive.example.org/dicom-web") is None
    honoured = Egress(use_environment=True, environ=ENV)
    assert honoured.route("https://archive.example.org/rs") == Route("envproxy", 3128)
    assert honoured.route("http://archive.example.org/rs") == Route("plainproxy", 8080)
    assert honoured.route("https://pacs.lan/rs") is None
    assert honoured.route("https://a.b.internal/rs") is None
    lower = Egress(use_environment=True, environ={"https_proxy": "http://lower:1"})
    assert lower.route("https://x.org") == Route("lower", 1)


def test_a_configured_proxy_with_no_proxy_and_an_archive_of_its_own():
    egress = Egress("http://egress.lan:3128", "edge", "s3cret", no_proxy=("pacs.lan", ".internal"))
    route = egress.route("https://cloud.example.org/rs")
    assert route is not None and (route.host, route.port) == ("egress.lan", 3128)
    assert route.authorization == "Basic " + base64.b64encode(b"edge:s3cret").decode()
    assert "s3cret" not in repr(route) and "s3cret" not in repr(egress)
    assert egress.route("https://pacs.lan/rs") is None and egress.route("https://x.internal/rs") is None
    assert egress.for_archive({"proxy": "direct"}).route("https://cloud.example.org/rs") is None
    own = egress.for_archive({"proxy": "http://u:p@other:8080"}).route("https://cloud.example.org/rs")
    assert own == Route("other", 8080, "Basic " + base64.b64encode(b"u:p").decode())
    route, ctx = Egress("http://egress.lan:3128", "ed ge", "p@ss:w").for_url("https://oauth2.googleapis.com/token")
    assert route is not None and ctx.verify_mode == ssl.CERT_REQUIRED
    assert route.proxies() == {"http": "http://ed%20ge:p%40ss%3Aw@egress.lan:3128",
                               "https": "http://ed%20ge:p%40ss%3Aw@egress.lan:3128"}  # (for requests-style clients)
    assert "p@ss" not in repr(route)


def test_one_context_builder_trusts_the_ca_file_and_optionally_the_system_store(tmp_path):
    from egress_support import make_pki

    pki = make_pki(tmp_path)
    system = client_context().cert_store_stats()["x509_ca"]
    only = client_context(str(pki["ca"])).cert_store_stats()["x509_ca"]
    both = client_context(str(pki["ca"]), system_ca=True).cert_store_stats()["x509_ca"]
    assert only == 1 and system > 10 and both == system + 1
    ctx = Egress(ca_file=str(pki["ca"])).ssl_context({"ca_file": str(pki["ca"]), "verify": False})
    assert ctx.verify_mode == ssl.CERT_NONE


def test_the_egress_section_is_checked(tmp_path):
    base = '[[archives]]\nname = "a"\nurl = "https://a.example.org/rs"\n'
    f = tmp_path / "edge.toml"
    f.write_text('[egress]\nproxy = "https://egress:3128"\n' + base)
    with pytest.raises(ConfigError, match="must be an http://host:port URL"):
        load(f, environ={})
    f.write_text('[egress]\nproxy = "http://egress:3128"\nproxy_password = "x"\nproxy_password_env = "Y"\n' + base)
    with pytest.raises(ConfigError, match="at most one of proxy_password"):
        load(f, environ={})
    f.write_text('[egress]\nproxy_password = "***"\n' + base)
    with pytest.raises(ConfigError, match="expected the secret itself"):
        load(f, environ={})
    f.write_text(base + 'egress = { proxy = "http://egress:3128", proxy_password_file = "/nonexistent" }\n')
    with pytest.raises(ConfigError, match="is not a readable file"):
        load(f, environ={})
    f.write_text('[egress]\nuse_environment = true\nno_proxy = ["pacs.lan"]\n' + base)
    s = load(f, environ={})
    assert Egress.from_settings(s).use_environment and s.egress_no_proxy == ["pacs.lan"]


def test_check_config_masks_a_password_in_the_proxy_url(tmp_path):
    f = tmp_path / "edge.toml"
    f.write_text('[egress]\nproxy = "http://edge:urlsecret@egress:3128"\n\n'
                 '[[archives]]\nname = "a"\nurl = "https://a.example.org/rs"\n'
                 'egress = { proxy = "http://egress:3128", proxy_username = "u", proxy_password = "inlinesecret" }\n')
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(f)], cwd=REPO_ROOT,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "urlsecret" not in out.stdout and "inlinesecret" not in out.stdout
    assert 'proxy = "http://edge:***@egress:3128"' in out.stdout and 'proxy_password = "***"' in out.stdout


async def _silent_proxy() -> tuple[asyncio.Server, int]:
    """A proxy that accepts connections and never answers (a hung egress proxy)."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_hung_egress_proxy_is_a_connect_timeout_not_a_hang():
    server, port = await _silent_proxy()
    async with server:
        pool = Pool("https", "archive.example.org", 443, route=Route("127.0.0.1", port))
        with pytest.raises(ConnectTimeout):
            await asyncio.wait_for(pool.request("GET", "/rs/studies", {}, connect_timeout=0.5), 10)


@pytest.mark.parametrize(("answer", "reason"), [
    (b"HTTP/1.1 403 Forbidden", "403 Forbidden"),
    (b"HTTP/1.0 407 Proxy Authentication Required",
     "407 Proxy Authentication Required: proxy credentials missing or wrong")])
async def test_a_refusing_and_a_down_proxy_are_named(answer, reason):
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        pool = Pool("https", "archive.example.org", 443, route=Route("127.0.0.1", port))
        with pytest.raises(EgressError, match=re.escape(f"egress proxy refused the tunnel ({reason})")):
            await pool.request("GET", "/rs/studies", {}, connect_timeout=5)
    pool = Pool("https", "archive.example.org", 443, route=Route("127.0.0.1", port))
    with pytest.raises(EgressError, match="egress proxy unreachable"):
        await pool.request("GET", "/rs/studies", {}, connect_timeout=5)


def test_the_readme_egress_example_loads(tmp_path):
    """README's "Egress proxy and private CAs" block is a complete, valid configuration."""
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"### Egress proxy and private CAs.*?```toml\n(.*?)```", text, re.S)
    assert block, "README: no egress example"
    config = block.group(1)
    for path in sorted(set(re.findall(r'"(/(?:run|etc)/[^"]+)"', config))):
        local = tmp_path / path.rsplit("/", 1)[1]
        local.write_text("x")
        config = config.replace(f'"{path}"', f'"{local}"')
    f = tmp_path / "edge.toml"
    f.write_text(config)
    s = load(f, environ={})
    egress = Egress.from_settings(s)
    assert egress.proxy_password == "x" and egress.route("https://healthcare.example.com/v1") is not None
    assert egress.for_archive(s.archives[1].egress).route(s.archives[1].url) is None


def test_the_proxy_password_from_a_variable(tmp_path, monkeypatch):
    f = tmp_path / "edge.toml"
    f.write_text('[egress]\nproxy = "http://egress:3128"\nproxy_username = "edge"\n'
                 'proxy_password_env = "EDGE_EGRESS_PW"\n[[archives]]\nname = "a"\nurl = "https://a.example.org/rs"\n')
    with pytest.raises(ConfigError, match="EDGE_EGRESS_PW"):
        load(f, environ={})  # not set: refused at start, not at the first request
    monkeypatch.setenv("EDGE_EGRESS_PW", "from-env")
    route = Egress.from_settings(load(f, environ={})).route("https://a.example.org/rs")
    assert route is not None and route.authorization == "Basic " + base64.b64encode(b"edge:from-env").decode()


def test_one_function_builds_every_outbound_tls_context():
    """egress.client_context is the only place the package makes an SSLContext (no second way to trust)."""
    makers = re.compile(r"create_default_context\(|SSLContext\(|load_verify_locations\(|verify=False")
    found = [f"{path.relative_to(REPO_ROOT)}:{n}" for path in sorted((REPO_ROOT / "proxy").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if makers.search(line) and path.name != "egress.py"]
    assert found == [], found
