"""Issue 25 points 4 and 5, end to end: archives, an OAuth2 token endpoint and a JWKS endpoint reached through
a real egress proxy (Debian's tinyproxy, with and without proxy authentication), and trusted through a
private CA made here; what a client gets when the egress proxy refuses, is down, or the CA is missing."""

from __future__ import annotations

import secrets
import subprocess
import sys

import httpx
import pytest
from authkeys import AUDIENCE, ISSUER, SigningKey, jwks
from egress_support import TinyProxy, TlsJsonServer, TlsTerminator, TokenIssuer, make_pki
from support import REPO_ROOT, ProxyProcess, free_port, instance_path, native_frame, orthanc_holding

from proxy.auth.inbound import Authenticator, Denied, parse
from proxy.demo.archive import ArchiveServer, SampleArchive
from proxy.demo.synth import Patient, Study, ct_series
from proxy.upstream.egress import Egress

PROXY_USER, PROXY_PASSWORD = "edge", "pp-" + secrets.token_hex(8)
CLIENT_ID, CLIENT_SECRET = "edge-client", "cs-" + secrets.token_hex(8)
STUDY = Study(Patient("DOE^EGRESS", "PID-EGRESS"), accession="ACC-EG")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("egress_pki"))


@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer(CLIENT_ID, CLIENT_SECRET)


@pytest.fixture(scope="module")
def servers(pki, issuer):
    """An https archive (certificate from the test CA) asking for the OAuth2 token, one asking for nothing,
    a plain http archive, the token endpoint and the JWKS endpoint (both https, same CA)."""
    signer = SigningKey("ES256", "egress")
    secure, plain, bare = SampleArchive("EGRESS_TLS"), SampleArchive("EGRESS_PLAIN"), SampleArchive("EGRESS_BARE")
    for sample in (secure, plain, bare):
        sample.extend(ct_series(STUDY, 1, rows=32, cols=32))
    secure.required_authorization = issuer.accepts
    token = TlsJsonServer(pki, issuer)
    keys = TlsJsonServer(pki, lambda *_: (200, jwks(signer)))
    tls = {"ssl_certfile": str(pki["cert"]), "ssl_keyfile": str(pki["key"])}
    with ArchiveServer(secure, tls=tls) as https_archive, ArchiveServer(plain) as http_archive, \
            ArchiveServer(bare, tls=tls) as bare_archive:
        yield {"https": https_archive, "http": http_archive, "bare": bare_archive, "token": token, "jwks": keys,
               "signer": signer}
    token.close()
    keys.close()


@pytest.fixture(scope="module")
def orthanc_series():
    return list(ct_series(Study(Patient("DOE^ORTHANC", "PID-EG-ORTHANC"), accession="ACC-EGO"), 2, rows=512,
                          cols=512, series_number=3, seed=7))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, orthanc_series, pki, servers):
    """A real Orthanc behind nginx terminating TLS with a certificate from the test CA."""
    for server in orthanc_holding(tmp_path_factory, "EGRESS", orthanc_series):
        with TlsTerminator(tmp_path_factory.mktemp("tls_front"), pki, server.port) as front:
            servers["orthanc"] = front
            yield front


@pytest.fixture(scope="module")
def tinyproxies(servers, orthanc, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tinyproxy")
    ports = [servers[n].port for n in ("https", "bare", "token", "jwks", "orthanc")]
    with TinyProxy(workdir, ports, (PROXY_USER, PROXY_PASSWORD)) as guarded, TinyProxy(workdir, ports) as open_:
        yield {"guarded": guarded, "open": open_}


def _config(servers, tinyproxies, workdir, ca: bool) -> str:
    """With `ca`: the test CA is [egress] ca_file, and callers need a JWT (its JWKS is https, that CA)."""
    (workdir / "proxy-password").write_text(PROXY_PASSWORD + "\n")
    (workdir / "client-secret").write_text(CLIENT_SECRET)
    https, guarded, down = servers["https"].dicomweb_url, tinyproxies["guarded"].url, f"http://127.0.0.1:{free_port()}"
    oauth = (f'auth = {{ type = "oauth2", token_url = "{servers["token"].url}/token", client_id = "{CLIENT_ID}", '
             f'client_secret_file = "{workdir / "client-secret"}" }}\n')
    return ("[federation]\nhealth_interval = 0\n\n"
            f'[egress]\nproxy = "{guarded}"\nproxy_username = "{PROXY_USER}"\n'
            f'proxy_password_file = "{workdir / "proxy-password"}"\n'
            + (f'ca_file = "{servers["ca"]}"\n\n[auth]\nmode = "jwt"\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n'
               f'jwks_url = "{servers["jwks"].url}/jwks.json"\n' if ca else "") +
            f'\n[[archives]]\nname = "orthanc"\nurl = "{servers["orthanc"].url}/dicom-web"\nstores = false\n'
            f'\n[[archives]]\nname = "bare"\nurl = "{servers["bare"].dicomweb_url}"\nstores = false\n\n'
            f'[[archives]]\nname = "secure"\nurl = "{https}"\n{oauth}\n'
            f'[[archives]]\nname = "plain"\nurl = "{servers["http"].dicomweb_url}"\nstores = false\n\n'
            f'[[archives]]\nname = "open"\nurl = "{https}"\nstores = false\n{oauth}'
            f'egress = {{ proxy = "{tinyproxies["open"].url}" }}\n\n'
            f'[[archives]]\nname = "wrongpw"\nurl = "{https}"\nstores = false\n'
            f'egress = {{ proxy = "{guarded}", proxy_username = "{PROXY_USER}", proxy_password = "wrong" }}\n\n'
            f'[[archives]]\nname = "nocreds"\nurl = "{https}"\nstores = false\negress = {{ proxy = "{guarded}" }}\n\n'
            f'[[archives]]\nname = "down"\nurl = "{https}"\nstores = false\negress = {{ proxy = "{down}" }}\n')


@pytest.fixture(scope="module")
def edge(servers, tinyproxies, pki, tmp_path_factory):
    servers["ca"] = pki["ca"]
    workdir = tmp_path_factory.mktemp("edge_egress")
    (workdir / "edge.toml").write_text(_config(servers, tinyproxies, workdir, ca=True))
    with ProxyProcess({}, workdir, extra_args=["--config", str(workdir / "edge.toml")]) as p:
        yield p


@pytest.fixture(scope="module")
def edge_without_ca(servers, tinyproxies, pki, tmp_path_factory):
    servers["ca"] = pki["ca"]
    workdir = tmp_path_factory.mktemp("edge_egress_noca")
    (workdir / "edge.toml").write_text(_config(servers, tinyproxies, workdir, ca=False))
    with ProxyProcess({}, workdir, extra_args=["--config", str(workdir / "edge.toml")]) as p:
        yield p


def _get(edge, servers, archive: str) -> httpx.Response:
    token = servers["signer"].token(scope="dicomweb.read")
    return httpx.get(f"{edge.url}/upstreams/{archive}/dicomweb/studies", trust_env=False, timeout=30,
                     headers={"Authorization": f"Bearer {token}"})


def test_an_https_archive_its_token_endpoint_and_the_jwks_are_reached_through_the_proxy(edge, servers, tinyproxies):
    r = _get(edge, servers, "secure")
    assert r.status_code == 200, r.text
    assert r.json()[0]["00100010"]["Value"][0]["Alphabetic"] == "DOE^EGRESS"
    guarded = tinyproxies["guarded"]
    for name in ("https", "token", "jwks"):  # each through a CONNECT tunnel of the authenticating proxy
        assert guarded.relayed(f"CONNECT 127.0.0.1:{servers[name].port} HTTP/1.1"), (name, guarded.log_text())
    assert any(v and v.startswith("Bearer ") for v in servers["https"].archive.authorizations)
    assert "Proxy-Authorization" not in str(servers["https"].archive.authorizations)


def test_a_real_orthanc_behind_tls_is_read_through_the_tunnel(edge, servers, tinyproxies, orthanc_series):
    token = servers["signer"].token(scope="dicomweb.read")
    ds = orthanc_series[1]
    url = f"{edge.url}/upstreams/orthanc/dicomweb{instance_path(ds)}/frames/1"
    r = httpx.get(url, headers={"Authorization": f"Bearer {token}",
                                "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
                  trust_env=False, timeout=30)
    assert r.status_code == 200, r.text
    assert native_frame(ds, 1) in r.content  # the frame, whole, over TLS inside the CONNECT tunnel
    assert tinyproxies["guarded"].relayed(f"CONNECT 127.0.0.1:{servers['orthanc'].port} HTTP/1.1")


def test_a_plain_http_archive_goes_through_the_proxy_in_absolute_form(edge, servers, tinyproxies):
    r = _get(edge, servers, "plain")
    assert r.status_code == 200, r.text
    assert tinyproxies["guarded"].relayed(f"GET {servers['http'].dicomweb_url}/studies")


def test_an_archive_of_its_own_proxy_without_proxy_authentication(edge, servers, tinyproxies):
    r = _get(edge, servers, "open")
    assert r.status_code == 200, r.text
    assert tinyproxies["open"].relayed(f"CONNECT 127.0.0.1:{servers['https'].port} HTTP/1.1")


def test_a_wrong_or_missing_proxy_password_is_a_502_naming_the_refusal(edge, servers):
    r = _get(edge, servers, "wrongpw")
    assert r.status_code == 502, r.text
    # (tinyproxy answers a CONNECT with wrong credentials 401, not 407: the proxy's own words are passed on)
    reason = r.json()["reason"]
    assert "egress proxy refused the tunnel (401 Unauthorized: proxy credentials missing or wrong)" in reason, r.text
    r = _get(edge, servers, "nocreds")
    assert r.status_code == 502, r.text
    assert "egress proxy refused the tunnel (407 Proxy Authentication Required" in r.json()["reason"], r.text


def test_a_proxy_that_is_down_is_a_502(edge, servers):
    r = _get(edge, servers, "down")
    assert r.status_code == 502, r.text
    assert "egress proxy unreachable" in r.json()["reason"], r.text
    metrics = httpx.get(f"{edge.url}/metrics", trust_env=False, timeout=10).text
    counted = [line for line in metrics.splitlines()
               if line.startswith("dicomweb_edge_upstream_errors_total") and 'archive="down"' in line
               and 'kind="unreachable"' in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1, counted


def test_the_proxy_password_is_never_logged_nor_printed(edge, servers):
    _get(edge, servers, "secure")
    assert PROXY_PASSWORD not in edge.log_path.read_text()
    config = edge.workdir / "edge.toml"
    config.write_text(config.read_text().replace(f'proxy_password_file = "{edge.workdir / "proxy-password"}"',
                                                 f'proxy_password = "{PROXY_PASSWORD}"'))
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(config)], cwd=REPO_ROOT,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert PROXY_PASSWORD not in out.stdout and 'proxy_password = "***"' in out.stdout
    assert 'proxy_password = "***"' in out.stdout.split("[[archives]]", 4)[-1]  # wrongpw's own, masked too


def test_without_the_private_ca_the_archive_and_its_token_endpoint_are_refused(edge, edge_without_ca, servers):
    assert _get(edge, servers, "bare").status_code == 200  # trusted with the CA ...
    bare = _get(edge_without_ca, servers, "bare")  # ... refused without it
    assert bare.status_code == 502 and "archive 'bare' is unreachable" in bare.json()["reason"], bare.text
    secure = _get(edge_without_ca, servers, "secure")
    assert secure.status_code == 502, secure.text
    assert "token endpoint for archive 'secure' unreachable" in secure.json()["reason"], secure.text


@pytest.mark.parametrize("trusted", [True, False])
async def test_the_jwks_is_fetched_through_the_proxy_with_the_private_ca_or_tokens_are_refused(
        servers, tinyproxies, pki, trusted):
    egress = Egress(tinyproxies["open"].url, ca_file=str(pki["ca"]) if trusted else None)
    table = {"mode": "jwt", "issuer": ISSUER, "audience": AUDIENCE, "jwks_url": f"{servers['jwks'].url}/jwks.json"}
    config = parse(table, "127.0.0.1")
    config.egress = egress
    authenticator = Authenticator(config)
    token = servers["signer"].token(scope="dicomweb.read")
    if trusted:
        assert "read" in await authenticator.scopes(f"Bearer {token}", None)
    else:
        with pytest.raises(Denied) as refused:
            await authenticator.scopes(f"Bearer {token}", None)
        assert refused.value.status == 401
    assert tinyproxies["open"].relayed(f"CONNECT 127.0.0.1:{servers['jwks'].port} HTTP/1.1")


def test_route_proxies_takes_a_requests_style_client_through_the_authenticating_proxy(servers, tinyproxies, pki):
    """What the cloud credential libraries (requests-based transports) are handed: `Egress.for_url`."""
    import requests

    egress = Egress(tinyproxies["guarded"].url, PROXY_USER, PROXY_PASSWORD, ca_file=str(pki["ca"]))
    route, _ = egress.for_url(servers["token"].url)
    assert route is not None
    r = requests.post(f"{servers['token'].url}/token", data={"grant_type": "client_credentials"},
                      auth=(CLIENT_ID, CLIENT_SECRET), proxies=route.proxies(), verify=egress.ca_file, timeout=30)
    assert r.status_code == 200 and r.json()["access_token"], r.text
    wrong = Egress(tinyproxies["guarded"].url, PROXY_USER, "wrong").route(servers["token"].url)
    assert wrong is not None
    with pytest.raises(requests.exceptions.ProxyError):
        requests.post(f"{servers['token'].url}/token", proxies=wrong.proxies(), verify=egress.ca_file, timeout=30)


@pytest.mark.parametrize("honoured", [True, False])
def test_https_proxy_in_the_environment_is_used_only_when_asked_for(servers, tinyproxies, pki, tmp_path, honoured):
    dead = f"http://127.0.0.1:{free_port()}"  # a proxy that is down: used, it would make every request fail
    env_proxy = tinyproxies["open"].url if honoured else dead
    (tmp_path / "edge.toml").write_text(
        f'[federation]\nhealth_interval = 0\n\n[egress]\nuse_environment = {str(honoured).lower()}\n'
        f'ca_file = "{pki["ca"]}"\n\n[[archives]]\nname = "bare"\nurl = "{servers["bare"].dicomweb_url}"\n')
    connect = f"): CONNECT 127.0.0.1:{servers['bare'].port} HTTP/1.1"
    before = tinyproxies["open"].log_text().count(connect)
    with ProxyProcess({}, tmp_path, extra_args=["--config", str(tmp_path / "edge.toml")],
                      env={"HTTPS_PROXY": env_proxy, "https_proxy": env_proxy, "NO_PROXY": ""}) as edge:
        r = httpx.get(f"{edge.url}/upstreams/bare/dicomweb/studies", trust_env=False, timeout=30)
    assert r.status_code == 200, r.text
    assert (tinyproxies["open"].log_text().count(connect) > before) == honoured
