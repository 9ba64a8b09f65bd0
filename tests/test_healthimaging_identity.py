"""The `aws` archive's credentials from the web identity step of botocore's chain (a Kubernetes service
account's projected token, IRSA): botocore, unmodified, trades the identity provider's token for temporary
credentials at a local stand-in of AWS STS (tests/sts_standin.py, reached through botocore's documented
AWS_ENDPOINT_URL_STS), off the event loop; the proxy signs with them, reuses them while fresh and trades
again when botocore says they need a refresh. The signatures are checked by the HealthImaging stand-in.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytest.importorskip("botocore")  # the optional `aws` extra (requirements/test.txt installs it)

from botocore.credentials import Credentials  # noqa: E402
from healthimaging_standin import HealthImagingStandIn  # noqa: E402
from sts_standin import StsStandIn  # noqa: E402

from proxy.upstream import healthimaging  # noqa: E402
from proxy.upstream.credentials import CredentialError  # noqa: E402

ROLE = "arn:aws:iam::123456789012:role/dicomweb-edge"
IDENTITY_TOKEN = "eyJ.projected-service-account-token.sig"
UNDOCUMENTED = "/studies/1.2.3/metadata"  # signed right: 400 from the stand-in; signed wrong: 403


@pytest.fixture
def web_identity(monkeypatch, tmp_path):
    def arrange(sts: StsStandIn, token: str = IDENTITY_TOKEN) -> None:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                     "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
            monkeypatch.delenv(name, raising=False)
        (tmp_path / "token").write_text(token)
        for name, value in {"AWS_ROLE_ARN": ROLE, "AWS_WEB_IDENTITY_TOKEN_FILE": str(tmp_path / "token"),
                            "AWS_ENDPOINT_URL_STS": sts.url, "AWS_REGION": "eu-west-1",
                            "AWS_CONFIG_FILE": str(tmp_path / "none"),
                            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                            "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(name, value)
    return arrange


def signed(signer: healthimaging.SigV4, url: str) -> dict[str, str]:
    return asyncio.run(signer.headers("GET", url, {}))


def test_web_identity_credentials_sign_and_are_reused(web_identity):
    with StsStandIn(ROLE, IDENTITY_TOKEN) as sts, HealthImagingStandIn("http://127.0.0.1:9/unused", [],
                                                                         region="eu-west-1") as service:
        web_identity(sts)
        signer = healthimaging.SigV4({"type": "aws", "region": "eu-west-1"}, "aws", "127.0.0.1")
        url = service.url + UNDOCUMENTED
        headers = [signed(signer, url) for _ in range(3)]
        assert len(sts.issued) == 1  # one trade for three requests: the credentials are reused while fresh
        service.keys.update({c.access_key: c for c in sts.issued})
        for h in headers:
            assert httpx.get(url, headers=h, trust_env=False, timeout=10.0).status_code == 400
        assert service.refused == []


def test_a_slow_identity_round_trip_does_not_stop_the_event_loop(web_identity):
    """Other requests go on while the credentials are fetched: the loop keeps ticking."""
    with StsStandIn(ROLE, IDENTITY_TOKEN, delay=0.6) as sts:
        web_identity(sts)
        signer = healthimaging.SigV4({"type": "aws", "region": "eu-west-1"}, "aws", "127.0.0.1")

        async def race() -> int:
            ticks = 0
            signing = asyncio.ensure_future(signer.headers("GET", "http://127.0.0.1:1/datastore/x/studies", {}))
            while not signing.done():
                await asyncio.sleep(0.01)
                ticks += 1
            await signing
            return ticks

        ticks = asyncio.run(race())
        assert len(sts.issued) == 1
        assert ticks >= 20  # 0.6 s of STS: about 60 ticks of 10 ms when the loop is free, 0-1 when blocked


def test_credentials_about_to_expire_are_traded_again(web_identity):
    # The first set expires in 14 minutes: inside botocore's 15-minute advisory refresh window.
    with StsStandIn(ROLE, IDENTITY_TOKEN, lifetimes=(14 * 60, 3600)) as sts, \
            HealthImagingStandIn("http://127.0.0.1:9/unused", [], region="eu-west-1") as service:
        web_identity(sts)
        signer = healthimaging.SigV4({"type": "aws", "region": "eu-west-1"}, "aws", "127.0.0.1")
        url = service.url + UNDOCUMENTED
        first = signed(signer, url)
        second = signed(signer, url)
        third = signed(signer, url)
        assert len(sts.issued) == 2
        service.keys.update({c.access_key: c for c in sts.issued})
        assert sts.issued[1].access_key in second["Authorization"] and second["Authorization"] != first[
            "Authorization"]
        assert sts.issued[1].access_key in third["Authorization"]
        for h in (first, second, third):
            assert httpx.get(url, headers=h, trust_env=False, timeout=10.0).status_code == 400


def test_a_token_sts_refuses_is_a_credential_error_without_the_token(web_identity):
    with StsStandIn(ROLE, IDENTITY_TOKEN) as sts:
        web_identity(sts, token="eyJ.some-other-token.sig")
        signer = healthimaging.SigV4({"type": "aws", "region": "eu-west-1"}, "aws", "127.0.0.1")
        with pytest.raises(CredentialError) as caught:
            signed(signer, "http://127.0.0.1:1/datastore/x/studies")
        assert sts.refused == ["InvalidIdentityToken"]
        assert "some-other-token" not in str(caught.value) and "aws" in str(caught.value)


def test_a_failed_trade_is_not_repeated_for_every_request(web_identity):
    with StsStandIn(ROLE, IDENTITY_TOKEN) as sts:
        web_identity(sts, token="eyJ.some-other-token.sig")
        signer = healthimaging.SigV4({"type": "aws", "region": "eu-west-1"}, "aws", "127.0.0.1")
        for _ in range(5):
            with pytest.raises(CredentialError):
                signed(signer, "http://127.0.0.1:1/datastore/x/studies")
        assert sts.refused == ["InvalidIdentityToken"]  # one trade; the next requests fail at once


def test_a_rotated_key_is_taken_once_the_service_refuses_the_old_one(monkeypatch, tmp_path):
    old = Credentials("AKIDEDGEOLD0000001", "old-secret-0123456789abcdefghijklmnopqrst")
    new = Credentials("AKIDEDGENEW0000002", "new-secret-0123456789abcdefghijklmnopqrst")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    shared = tmp_path / "credentials"
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    def write(c: Credentials) -> None:
        shared.write_text(f"[imaging]\naws_access_key_id = {c.access_key}\naws_secret_access_key = {c.secret_key}\n")

    write(old)
    with HealthImagingStandIn("http://127.0.0.1:9/unused", [new], region="eu-west-1") as service:
        signer = healthimaging.SigV4({"type": "aws", "region": "eu-west-1", "profile": "imaging"}, "aws",
                                     "127.0.0.1")
        url = service.url + UNDOCUMENTED
        assert httpx.get(url, headers=signed(signer, url), trust_env=False, timeout=10.0).status_code == 403
        write(new)  # the operator rotates the key
        signer.rejected()  # (Archive.open does this on the 403)
        assert httpx.get(url, headers=signed(signer, url), trust_env=False, timeout=10.0).status_code == 400
