"""The proxy in front of the cloud DICOM services (issue 25 points 1, 2, 7), the clouds replaced by local
stand-ins that check what they check (tests/cloud_standins.py) and answer the shapes their documentation
gives (tests/data/cloud): a Google store read with a service-account key and with the GCE/GKE metadata server,
an Azure DICOM service read and written with a client secret over https. What a user notices: the search
answers, a partial store stays a 202 with its failed instances, no token or secret in the log.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from cloud_standins import Entra, GceMetadata, GoogleTokenEndpoint, Issuer, LocalCA, Recorded
from support import REPO_ROOT, ProxyProcess

GOOGLE_STORE = "/v1/projects/proj/locations/europe-west4/datasets/imaging/dicomStores/main/dicomWeb"
TENANT, CLIENT = "72f988bf-0000-4000-8000-000000000001", "5b7c1e9a-0000-4000-8000-000000000002"
STUDY = "1.2.826.0.1.3680043.8.498.10"
GOOGLE_401 = ("application/json; charset=UTF-8", "google-401.json")


def google_routes(method: str, path: str, query: dict[str, list[str]]) -> tuple[int, str, str | None]:
    if method == "GET" and path == "/studies":
        return 200, "application/dicom+json; charset=utf-8", "qido-studies.json"
    return 404, "application/json", None


def azure_routes(method: str, path: str, query: dict[str, list[str]]) -> tuple[int, str, str | None]:
    """Azure's documented answers: limit 1..200 (400 beyond), 204 for no match, 202 for a partial store."""
    if method == "GET" and path == "/studies":
        if int(query.get("limit", ["100"])[0]) > 200:
            return 400, "text/plain; charset=utf-8", "azure-limit-400.txt"
        if query.get("PatientID") == ["NOBODY"]:
            return 204, "application/dicom+json", None
        return 200, "application/dicom+json", "qido-studies.json"
    if method == "POST" and path == "/studies":
        return 202, "application/dicom+json", "azure-stow-202.json"
    return 404, "application/json", None


def start_proxy(workdir, toml: str, env: dict[str, str] | None = None) -> ProxyProcess:
    config = workdir / "edge.toml"
    config.write_text("[federation]\nhealth_interval = 0\n\n" + toml)
    return ProxyProcess({}, workdir, extra_args=["--config", str(config), "--log-level", "debug"], env=env).start()


@pytest.fixture(scope="module")
def google_key(tmp_path_factory):
    issuer = Issuer("ya29.")
    endpoint = GoogleTokenEndpoint(issuer)
    key_file = endpoint.service_account(tmp_path_factory.mktemp("google") / "sa.json")
    store = Recorded(issuer.accepts, google_routes, prefix=GOOGLE_STORE, unauthorized=GOOGLE_401)
    yield issuer, key_file, store
    store.close()
    endpoint.close()


def test_google_store_with_a_service_account_key(google_key, tmp_path):
    issuer, key_file, store = google_key
    toml = (f'[[archives]]\nname = "gcp"\nprofile = "google"\nurl = "{store.url}"\n'
            f'auth = {{ type = "google", key_file = "{key_file}" }}\n')
    proxy = start_proxy(tmp_path, toml)
    try:
        resp = httpx.get(proxy.dicomweb_url + "/studies", params={"PatientID": "PID-CLOUD-1"}, timeout=30,
                         headers={"X-Request-ID": "google-key-search"})
        assert resp.status_code == 200, resp.text
        (study,) = resp.json()
        assert study["0020000D"]["Value"] == [STUDY]
        assert study["00081190"]["Value"][0].startswith(proxy.dicomweb_url)  # the URL points at the proxy
        assert issuer.refused == []
        log = proxy.log_after("google-key-search")
        assert "obtained a google access token" in log
        assert not any(token in log for token in issuer.valid) and "PRIVATE KEY" not in log
    finally:
        proxy.stop()


def test_google_revoked_token_is_replaced_after_one_refusal(google_key, tmp_path):
    """Google answers a revoked token 401 with its JSON error: that request fails with the proxy's own 502 (the
    caller's credentials were fine), and the next one goes with a new token."""
    issuer, key_file, store = google_key
    toml = (f'[[archives]]\nname = "gcp"\nprofile = "google"\nurl = "{store.url}"\n'
            f'auth = {{ type = "google", key_file = "{key_file}" }}\n')
    proxy = start_proxy(tmp_path, toml)
    try:
        assert httpx.get(proxy.dicomweb_url + "/studies", timeout=30).status_code == 200
        fetched, refused = issuer.requests, store.refused
        issuer.valid.clear()  # revoked at Google
        first = httpx.get(proxy.dicomweb_url + "/studies", timeout=30)
        assert first.status_code == 502 and store.refused == refused + 1
        assert "UNAUTHENTICATED" not in first.text
        again = httpx.get(proxy.dicomweb_url + "/studies", timeout=30)
        assert again.status_code == 200 and issuer.requests == fetched + 1
    finally:
        proxy.stop()


def test_google_store_with_the_metadata_server(tmp_path):
    issuer = Issuer("ya29.")
    metadata = GceMetadata(issuer)
    store = Recorded(issuer.accepts, google_routes, prefix=GOOGLE_STORE)
    toml = (f'[[archives]]\nname = "gke"\nprofile = "google"\nurl = "{store.url}"\n'
            'auth = { type = "google", metadata = true }\n')
    proxy = start_proxy(tmp_path, toml, env={"GCE_METADATA_HOST": metadata.host, "GCE_METADATA_IP": metadata.host})
    try:
        resp = httpx.get(proxy.dicomweb_url + "/studies", timeout=30, headers={"X-Request-ID": "metadata-search"})
        assert resp.status_code == 200, resp.text
        assert [s["0020000D"]["Value"] for s in resp.json()] == [[STUDY]]
        assert issuer.requests == 1 and issuer.refused == []
        assert metadata.scopes_asked == ["https://www.googleapis.com/auth/cloud-healthcare"]
        assert not any(token in proxy.log_after("metadata-search") for token in issuer.valid)
    finally:
        proxy.stop()
        store.close()
        metadata.close()


@pytest.fixture(scope="module")
def azure(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("azure")
    ca = LocalCA(workdir)
    issuer = Issuer("eyJ0eXAi.")
    entra = Entra(issuer, ca, TENANT, CLIENT)
    service = Recorded(issuer.accepts, azure_routes, tls=ca.server_context(), prefix="/v2")
    (workdir / "client-secret").write_text(entra.secret + "\n")
    toml = (f'[[archives]]\nname = "azure"\nprofile = "azure"\nurl = "{service.url}"\n'
            f'tls = {{ ca_file = "{ca.ca_file}" }}\n'
            f'auth = {{ type = "azure", mode = "client_secret", tenant_id = "{TENANT}", client_id = "{CLIENT}", '
            f'client_secret_file = "{workdir / "client-secret"}", authority_host = "{entra.base}" }}\n')
    proxy = start_proxy(workdir, toml)
    yield proxy, issuer, entra, service, workdir
    proxy.stop()
    service.close()
    entra.close()


def test_azure_search_within_the_services_paging_limit(azure):
    proxy, issuer, entra, service, _ = azure
    resp = httpx.get(proxy.dicomweb_url + "/studies", params={"limit": "500"}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert [s["0020000D"]["Value"] for s in resp.json()] == [[STUDY]]
    asked = [q for m, p, q in service.seen if m == "GET" and p == "/studies"]
    assert asked and all(int(q["limit"][0]) <= 200 for q in asked)
    assert issuer.refused == []


def test_azure_empty_search_is_no_error(azure):
    proxy, *_ = azure
    resp = httpx.get(proxy.dicomweb_url + "/studies", params={"PatientID": "NOBODY"}, timeout=30)
    assert resp.status_code in (200, 204) and resp.content.strip() in (b"", b"[]")


def test_azure_partial_store_stays_202_with_the_failed_instances(azure):
    proxy, issuer, *_ = azure
    boundary = "cloud-e2e-boundary"
    part = (REPO_ROOT / "tests" / "data" / "cloud" / "qido-studies.json").read_bytes()  # (the stand-in stores nothing)
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
            + f"\r\n--{boundary}--\r\n".encode())
    resp = httpx.post(proxy.dicomweb_url + "/studies", content=body, timeout=30,
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                               "Accept": "application/dicom+json"})
    assert resp.status_code == 202, resp.text
    answer = resp.json()
    (failed,) = answer["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [45070]
    (stored,) = answer["00081199"]["Value"]
    assert stored["00081196"]["Value"] == [45063]
    assert stored["00081190"]["Value"][0].startswith(proxy.dicomweb_url + "/studies/" + STUDY)


def test_azure_secret_and_tokens_stay_out_of_the_log_and_check_config(azure):
    proxy, issuer, entra, service, workdir = azure
    httpx.get(proxy.dicomweb_url + "/studies", timeout=30, headers={"X-Request-ID": "azure-last"})
    assert issuer.requests == 1  # one token for every request so far
    log = proxy.log_after("azure-last")
    assert entra.secret not in log and not any(token in log for token in issuer.valid)
    inline = workdir / "inline.toml"
    inline.write_text((workdir / "edge.toml").read_text().replace(
        f'client_secret_file = "{workdir / "client-secret"}"', f'client_secret = "{entra.secret}"'))
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(inline)], capture_output=True,
                         text=True, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr
    assert entra.secret not in out.stdout + out.stderr and 'client_secret = "***"' in out.stdout
