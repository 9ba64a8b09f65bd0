"""The cloud archives' credential sources (issue 25 points 1, 2, 7), in process, against local stand-ins that
check what Google's and Microsoft's identity services check (tests/cloud_standins.py): google-auth and
azure-identity unmodified, pointed at the stand-ins through their documented settings (a key file's
token_uri, GOOGLE_APPLICATION_CREDENTIALS, an authority host, IDENTITY_ENDPOINT / IDENTITY_HEADER).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sys
import time

import pytest
from cloud_standins import (
    AppServiceIdentity,
    Entra,
    GoogleTokenEndpoint,
    Imds,
    Issuer,
    LocalCA,
)
from support import REPO_ROOT

from proxy.config import ConfigError, load
from proxy.runtime import check_settings
from proxy.upstream.cloud_auth import AzureToken, GoogleToken, check_auth, credentials
from proxy.upstream.credentials import CredentialError

TENANT, CLIENT = "72f988bf-0000-4000-8000-000000000001", "5b7c1e9a-0000-4000-8000-000000000002"


@pytest.fixture
def google(tmp_path):
    issuer = Issuer("ya29.")
    endpoint = GoogleTokenEndpoint(issuer)
    yield endpoint, issuer, endpoint.service_account(tmp_path / "sa.json")
    endpoint.close()


@pytest.fixture
def entra(tmp_path):
    ca = LocalCA(tmp_path)
    issuer = Issuer("eyJ0eXAi.")
    service = Entra(issuer, ca, TENANT, CLIENT)
    yield service, issuer, {"ca_file": str(ca.ca_file)}
    service.close()


async def test_google_key_file_one_token_for_concurrent_requests(google):
    endpoint, issuer, key_file = google
    source = credentials({"type": "google", "key_file": str(key_file)}, "gcp")
    assert isinstance(source, GoogleToken)
    values = await asyncio.gather(*[source.authorization() for _ in range(20)])
    assert len(set(values)) == 1 and issuer.accepts(values[0])
    assert issuer.requests == 1 and issuer.refused == []


async def test_google_token_is_renewed_before_it_expires(google):
    endpoint, issuer, key_file = google
    issuer.lifetime = 3.0
    source = GoogleToken({"type": "google", "key_file": str(key_file)}, "gcp")
    first = await source.authorization()
    deadline = time.monotonic() + 10
    while issuer.requests < 2:  # every header handed out meanwhile is one the service still takes
        value = await source.authorization()
        assert issuer.accepts(value), "a token was used past its expiry"
        assert time.monotonic() < deadline, "the token was never renewed"
        await asyncio.sleep(0.05)
    assert await source.authorization() != first and issuer.accepts(await source.authorization())
    assert issuer.life_left[0] > 0, "renewed only once the old token had expired"


async def test_google_key_unknown_to_the_token_endpoint_is_refused_without_leaking_it(google, tmp_path, caplog):
    endpoint, issuer, _ = google
    stranger = endpoint.service_account(tmp_path / "stranger.json", registered=False)
    source = GoogleToken({"type": "google", "key_file": str(stranger)}, "gcp")
    with caplog.at_level(logging.INFO), pytest.raises(CredentialError) as refused:
        await source.authorization()
    assert issuer.refused == ["Invalid JWT Signature."]
    assert "gcp" in str(refused.value) and "PRIVATE KEY" not in str(refused.value)
    assert "PRIVATE KEY" not in caplog.text and "Invalid JWT Signature" in caplog.text
    with pytest.raises(CredentialError):  # a failure is not retried on every request
        await source.authorization()
    assert issuer.requests == 1


async def test_google_401_fetches_a_new_token(google):
    endpoint, issuer, key_file = google
    source = GoogleToken({"type": "google", "key_file": str(key_file)}, "gcp")
    first = await source.authorization()
    issuer.valid.clear()  # revoked
    source.rejected()
    second = await source.authorization()
    assert second != first and issuer.accepts(second)


async def test_google_application_default_credentials(google, monkeypatch):
    endpoint, issuer, key_file = google
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    source = GoogleToken({"type": "google", "adc": True}, "gcp")
    assert issuer.accepts(await source.authorization())


def test_google_configuration_is_checked(google, tmp_path):
    _, _, key_file = google
    check_auth({"type": "google", "key_file": str(key_file)}, "archive 'gcp'")
    check_auth({"type": "google", "metadata": True}, "archive 'gcp'")
    (tmp_path / "not-a-key.json").write_text('{"type": "authorized_user"}')
    for bad, said in (({"type": "google"}, "exactly one of"),
                      ({"type": "google", "adc": True, "metadata": True}, "exactly one of"),
                      ({"type": "google", "key_file": str(tmp_path / "not-a-key.json")}, "not a service-account"),
                      ({"type": "google", "adc": True, "token": "x"}, "unknown auth key")):
        with pytest.raises(ValueError, match=said):
            check_auth(bad, "archive 'gcp'")


def test_a_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.oauth2.service_account", None)
    monkeypatch.setitem(sys.modules, "azure.identity", None)
    with pytest.raises(ConfigError, match=r"profile google with credentials=adc needs `pip install "
                                          r"dicomweb-edge\[google\]`"):
        check_auth({"type": "google", "adc": True}, "archive 'gcp'")
    with pytest.raises(ConfigError, match=r"needs `pip install dicomweb-edge\[azure\]`"):
        AzureToken({"type": "azure", "mode": "managed_identity"}, "az")


async def test_azure_client_secret(entra):
    service, issuer, tls = entra
    auth = {"type": "azure", "mode": "client_secret", "tenant_id": TENANT, "client_id": CLIENT,
            "client_secret": service.secret, "authority_host": service.base}
    source = credentials(auth, "az", tls)
    values = await asyncio.gather(*[source.authorization() for _ in range(10)])
    assert len(set(values)) == 1 and issuer.accepts(values[0]) and issuer.refused == []
    assert issuer.requests == 1


async def test_azure_wrong_secret_or_scope_is_refused_and_the_secret_never_shown(entra, caplog):
    service, issuer, tls = entra
    auth = {"type": "azure", "mode": "client_secret", "tenant_id": TENANT, "client_id": CLIENT,
            "client_secret": "not-the-secret-0123", "authority_host": service.base}
    with caplog.at_level(logging.DEBUG, logger="dicomweb_edge"), pytest.raises(CredentialError) as refused:
        await AzureToken(auth, "az", tls).authorization()
    assert issuer.refused[-1].startswith("AADSTS7000215")
    assert "not-the-secret-0123" not in str(refused.value) + caplog.text
    wrong_scope = {**auth, "client_secret": service.secret, "scope": "https://management.azure.com/.default"}
    with pytest.raises(CredentialError):
        await AzureToken(wrong_scope, "az", tls).authorization()
    assert issuer.refused[-1].startswith("AADSTS1002012")


async def test_azure_authority_needs_a_trusted_certificate(entra):
    service, issuer, _ = entra
    auth = {"type": "azure", "mode": "client_secret", "tenant_id": TENANT, "client_id": CLIENT,
            "client_secret": service.secret, "authority_host": service.base}
    with pytest.raises(CredentialError):  # the test CA is not among the system's
        await AzureToken(auth, "az").authorization()
    assert issuer.requests == 0


async def test_azure_workload_identity(entra, tmp_path):
    service, issuer, tls = entra
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(service.federated_token())
    auth = {"type": "azure", "mode": "workload_identity", "tenant_id": TENANT, "client_id": CLIENT,
            "federated_token_file": str(token_file), "authority_host": service.base}
    assert issuer.accepts(await AzureToken(auth, "az", tls).authorization())
    token_file.write_text(service.federated_token(audience="api://someone-else"))
    with pytest.raises(CredentialError):
        await AzureToken(auth, "az", tls).authorization()
    assert "InvalidAudienceError" in issuer.refused[-1]


async def test_azure_managed_identity_app_service(monkeypatch):
    issuer = Issuer("eyJ0eXAi.")
    endpoint = AppServiceIdentity(issuer)
    try:
        monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.endpoint)
        monkeypatch.setenv("IDENTITY_HEADER", endpoint.header)
        value = await AzureToken({"type": "azure", "mode": "managed_identity"}, "az").authorization()
        assert issuer.accepts(value) and issuer.refused == []
        monkeypatch.setenv("IDENTITY_HEADER", "a-guess")
        with pytest.raises(CredentialError):
            await AzureToken({"type": "azure", "mode": "managed_identity"}, "az").authorization()
        assert issuer.refused == ["X-IDENTITY-HEADER"]
    finally:
        endpoint.close()


async def test_azure_managed_identity_of_a_vm(monkeypatch):
    issuer = Issuer("eyJ0eXAi.")
    imds = Imds(issuer)
    try:
        for variable in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "MSI_SECRET",
                         "AZURE_FEDERATED_TOKEN_FILE"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds.base)  # azure-identity's IMDS address setting
        source = AzureToken({"type": "azure", "mode": "managed_identity"}, "az")
        values = await asyncio.gather(*[source.authorization() for _ in range(5)])
        assert len(set(values)) == 1 and issuer.accepts(values[0]) and issuer.refused == []
        assert issuer.requests == 1
    finally:
        imds.close()


def test_azure_configuration_is_checked(tmp_path):
    check_auth({"type": "azure", "mode": "managed_identity"}, "archive 'az'")
    check_auth({"type": "azure", "mode": "client_secret", "tenant_id": TENANT, "client_id": CLIENT,
                "client_secret_env": "AZ_SECRET"}, "archive 'az'", {"AZ_SECRET": "x"})
    for bad, said in (({"type": "azure", "mode": "client_secret", "tenant_id": TENANT, "client_id": CLIENT},
                       "exactly one of auth.client_secret"),
                      ({"type": "azure", "mode": "client_secret", "client_id": CLIENT, "client_secret": "x"},
                       "auth.tenant_id is required"),
                      ({"type": "azure", "mode": "managed_identity", "client_secret": "x"}, "unknown auth key"),
                      ({"type": "azure", "mode": "workload_identity"}, "workload identity needs auth.tenant_id")):
        with pytest.raises(ValueError, match=said):
            check_auth(bad, "archive 'az'", {})


def test_google_store_url_from_its_project_location_dataset_and_store(tmp_path):
    store = 'google_store = { project = "my-project", location = "europe-west4", dataset = "imaging", ' \
            'dicom_store = "ct" }\n'
    path = tmp_path / "edge.toml"
    path.write_text('[[archives]]\nname = "gcp"\nprofile = "google"\n' + store)
    assert load(path, environ={}).archives[0].url == ("https://healthcare.googleapis.com/v1/projects/my-project/"
                                                      "locations/europe-west4/datasets/imaging/dicomStores/ct/dicomWeb")
    path.write_text('[[archives]]\nname = "gcp"\nprofile = "google"\nurl = "http://127.0.0.1:9/g/dicomWeb"\n' + store)
    assert load(path, environ={}).archives[0].url == "http://127.0.0.1:9/g/dicomWeb"  # an explicit url wins
    path.write_text('[[archives]]\nname = "gcp"\nprofile = "google"\n' + store.replace("my-project", "my/../x"))
    with pytest.raises(ConfigError, match="google_store.project"):
        load(path, environ={})


@pytest.mark.parametrize("section", ["## Google Cloud Healthcare", "## Azure DICOM service"])
def test_the_readme_cloud_examples_are_working_configs(section, google, tmp_path):
    """README's example for each cloud loads and passes the checks `serve` makes (its files put in place)."""
    text = (REPO_ROOT / "README.md").read_text().split(section + "\n", 1)[1]
    example = re.search(r"```toml\n(.*?)```", text, re.S)
    assert example, f"README {section}: no toml example"
    (tmp_path / "azure-secret").write_text("s3cr3t\n")
    toml = example.group(1).replace("/run/secrets/gcp-sa.json", str(google[2])).replace(
        "/run/secrets/azure-secret", str(tmp_path / "azure-secret"))
    (tmp_path / "edge.toml").write_text(toml)
    settings = load(tmp_path / "edge.toml", environ={})
    check_settings(settings)
    (archive,) = settings.archives
    assert archive.url.startswith("https://") and archive.auth is not None and archive.profile in ("google", "azure")


async def test_a_token_endpoint_that_never_answers_fails_requests_quickly(tmp_path):
    """A token endpoint that accepts the connection and says nothing: requests fail within the proxy's own
    bound (the libraries would wait minutes), and the next ones at once until the pause is over."""
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        endpoint = GoogleTokenEndpoint(Issuer("ya29."))
        key_file = endpoint.service_account(tmp_path / "sa.json")
        endpoint.close()
        doc = json.loads(key_file.read_text())
        key_file.write_text(json.dumps({**doc, "token_uri": f"http://127.0.0.1:{silent.getsockname()[1]}/token"}))
        source = GoogleToken({"type": "google", "key_file": str(key_file)}, "gcp")
        source.timeout = 1.0
        started = time.monotonic()
        with pytest.raises(CredentialError):
            await source.authorization()
        with pytest.raises(CredentialError):
            await source.authorization()
        assert time.monotonic() - started < 5.0
    finally:
        silent.close()


async def test_google_token_requests_go_through_the_egress_proxy(google, tmp_path):
    """With [egress] proxy set, the service-account token request goes through it (tinyproxy's log has it)
    and still gets a token the endpoint accepts; a metadata server's link-local address never would."""
    from egress_support import TinyProxy

    from proxy.upstream.cloud_auth import _link_local
    from proxy.upstream.egress import Egress

    endpoint, issuer, key_file = google
    token_uri = json.loads(key_file.read_text())["token_uri"]
    with TinyProxy(tmp_path, ports=[]) as proxy:
        source = GoogleToken({"type": "google", "key_file": str(key_file)}, "gcp", None, Egress(proxy=proxy.url))
        assert issuer.accepts(await source.authorization())
        assert proxy.relayed(f"POST {token_uri}"), proxy.log_text()
    assert _link_local("http://169.254.169.254/computeMetadata/v1/") and not _link_local(token_uri)
