"""Inbound authentication and a cache that cannot leak, through a real proxy process (issue 7 points 1-2).

API keys with the proxy's own archive credentials, in front of a real Orthanc: scopes for read / write
(STOW) / admin, open probes, viewer and CORS preflights, /metrics for a local scraper only, and every
reader sharing the cache.
JWT with token pass-through to an archive that decides per token (the sample archive's access rule,
since Orthanc has no per-token study ACL): token B never gets from the cache what only token A may see
(frames, metadata, instances, bulk data, renderings, searches), while A keeps its hits and B gets hits
for a study it may see.
"""

from __future__ import annotations

import json

import httpx
import pytest
from authkeys import AUDIENCE, ISSUER, SigningKey, jwks
from prometheus_client.parser import text_string_to_metric_families
from support import ProxyProcess, orthanc_holding, split_multipart

from proxy.auth.inbound import key_digest
from proxy.demo.archive import ArchiveServer, SampleArchive
from proxy.demo.synth import Patient, Study, multiframe_native, to_part10

FRAMES = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
KEYS = {"reader1": ["read"], "reader2": ["read"], "writer": ["read", "write"], "admin": ["admin"]}
ORIGIN = "http://viewer.test"


def key(name):
    return {"Authorization": f"Bearer key-{name}-0123456789"}


def frame_url(base, ds, n=1):
    return (f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
            f"/frames/{n}")


def frame_bytes(ds, n=1):
    size = ds.Rows * ds.Columns * 2
    return ds.PixelData[(n - 1) * size : n * size]


def payload(r):
    return split_multipart(r.content, r.headers["content-type"])[1][0][1]


def stow_body(ds):
    boundary = "authTestBoundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_part10(ds)
            + f"\r\n--{boundary}--\r\n".encode())
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def studies_of(r):
    return {rec["0020000D"]["Value"][0] for rec in r.json()} if r.status_code == 200 else set()


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30.0, trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def shared_dataset():
    return multiframe_native(Study(Patient("KEY^SHARED", "PIDK1")), n_frames=3, rows=32, cols=32)


@pytest.fixture(scope="module")
def shared_archive(tmp_path_factory, shared_dataset):
    """A real Orthanc, read with the proxy's own credentials (none here)."""
    yield from orthanc_holding(tmp_path_factory, "KEYS", [shared_dataset])


@pytest.fixture(scope="module")
def key_proxy(shared_archive, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("auth_keys")
    (workdir / "viewer").mkdir()
    (workdir / "viewer" / "index.html").write_text("<!doctype html><title>viewer</title>")
    entries = ", ".join(f'{{ name = "{n}", sha256 = "{key_digest(key(n)["Authorization"][7:])}", '
                        f'scopes = {json.dumps(s)} }}' for n, s in KEYS.items())
    (workdir / "edge.toml").write_text(
        f'[server]\ncors_origins = ["{ORIGIN}"]\n[cache]\ndir = "cache"\n[viewer]\ndir = "{workdir / "viewer"}"\n'
        f'[auth]\nmode = "api_key"\napi_keys = [{entries}]\n'
        f'[[archives]]\nname = "own"\nurl = "{shared_archive.dicomweb_url}"\n')
    with ProxyProcess({}, workdir, ["--config", str(workdir / "edge.toml")]) as proxy:
        yield proxy


def test_api_keys_and_scopes(key_proxy, client):
    base = key_proxy.dicomweb_url
    r = client.get(f"{base}/studies")
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="dicomweb-edge"'
    assert r.json() == {"status": 401, "reason": "authentication required"}
    r = client.get(f"{base}/studies", headers={"Authorization": "Bearer key-reader1-wrong"})
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    assert client.get(f"{base}/studies", headers=key("reader1")).status_code == 200
    assert client.get(f"{base}/studies", headers={"X-API-Key": "key-reader2-0123456789"}).status_code == 200
    assert client.get(f"{key_proxy.url}/upstreams/own/dicomweb/studies").status_code == 401

    ds = multiframe_native(Study(Patient("KEY^STORED", "PIDK2")), n_frames=1, rows=16, cols=16)
    body, headers = stow_body(ds)
    r = client.post(f"{base}/studies", content=body, headers={**headers, **key("reader1")})
    challenge = r.headers["www-authenticate"]
    assert r.status_code == 403 and 'error="insufficient_scope"' in challenge and 'scope="dicomweb.write"' in challenge
    assert client.post(f"{base}/studies", content=body, headers={**headers, **key("writer")}).status_code == 200

    purge = f"{key_proxy.url}/admin/cache/purge"
    assert client.post(purge).status_code == 401
    assert client.post(purge, headers=key("writer")).status_code == 403
    assert client.post(purge, headers=key("admin")).status_code == 200
    assert client.get(f"{key_proxy.url}/admin/cache", headers=key("admin")).json()["writable"] is True
    assert client.get(f"{base}/studies", headers=key("admin")).status_code == 403  # admin does not imply read


def test_probes_viewer_preflight_and_metrics_stay_reachable(key_proxy, client):
    assert client.get(f"{key_proxy.url}/healthz").status_code == 200
    assert client.get(f"{key_proxy.url}/readyz").status_code == 200
    r = client.get(f"{key_proxy.url}/")
    assert r.status_code == 200 and "<title>viewer</title>" in r.text
    r = client.options(f"{key_proxy.dicomweb_url}/studies", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = client.get(f"{key_proxy.dicomweb_url}/studies", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN  # the viewer can read it
    metrics = client.get(f"{key_proxy.url}/metrics")  # a scraper on a trusted address
    assert metrics.status_code == 200 and 'dicomweb_edge_auth_failures_total{reason="missing"}' in metrics.text
    assert client.get(f"{key_proxy.url}/metrics", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 401
    assert client.get(f"{key_proxy.url}/metrics", headers={"X-Forwarded-For": "203.0.113.9", **key("admin")}
                      ).status_code == 200
    for attempt in (key("reader1"), {"Authorization": "Bearer key-reader1-wrong"}, {"X-API-Key": "key-reader1-0123"}):
        client.get(f"{key_proxy.dicomweb_url}/studies", headers={**attempt, "X-Request-ID": "keys-in-log"})
    assert "key-reader1" not in key_proxy.log_after("keys-in-log")  # keys never reach the log, good or bad


def test_with_the_proxys_own_credentials_every_reader_shares_the_cache(key_proxy, shared_dataset, client):
    ds = shared_dataset
    url = frame_url(key_proxy.dicomweb_url, ds, 2)
    r = client.get(url, headers={**FRAMES, **key("reader1")})
    assert r.headers["x-cache"] == "MISS"
    frames_before = upstream_requests(key_proxy, "frames")
    r = client.get(url, headers={**FRAMES, **key("reader2")})
    assert r.status_code == 200 and r.headers["x-cache"] == "HIT" and payload(r) == frame_bytes(ds, 2)
    assert upstream_requests(key_proxy, "frames") == frames_before  # the archive was not asked
    meta = f"{key_proxy.dicomweb_url}/studies/{ds.StudyInstanceUID}/metadata"
    assert client.get(meta, headers=key("reader1")).headers["x-cache"] == "MISS"
    assert client.get(meta, headers=key("reader2")).headers["x-cache"] == "HIT"


def upstream_requests(proxy, service):
    """The proxy's own count of requests it sent its archives for `service` (its /metrics)."""
    text = httpx.get(f"{proxy.url}/metrics", headers=key("admin"), trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "dicomweb_edge_upstream_requests_total" and s.labels.get("service") == service)


# -- token pass-through ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signer():
    return SigningKey("RS256", "edge-test")


@pytest.fixture(scope="module")
def tokens(signer):
    return {name: signer.token(sub=name, lifetime=3600) for name in ("a", "b", "stranger")}


@pytest.fixture(scope="module")
def studies():
    only_a = multiframe_native(Study(Patient("SECRET^ONLYA", "PIDA1")), n_frames=2, rows=32, cols=32, seed=3)
    both = multiframe_native(Study(Patient("OPEN^BOTH", "PIDAB")), n_frames=2, rows=32, cols=32, seed=4)
    return only_a, both


@pytest.fixture(scope="module")
def acl_archive(studies, tokens):
    only_a, both = studies
    archive = SampleArchive("ACL")
    archive.extend([only_a, both])
    archive.access = {tokens["a"]: {only_a.StudyInstanceUID, both.StudyInstanceUID},
                      tokens["b"]: {both.StudyInstanceUID}}
    with ArchiveServer(archive) as server:
        yield server


@pytest.fixture(scope="module")
def jwt_proxy(acl_archive, signer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("auth_jwt")
    (workdir / "jwks.json").write_text(json.dumps(jwks(signer)))
    (workdir / "edge.toml").write_text(
        f'[cache]\ndir = "cache"\nprefetch = false\n'
        f'[auth]\nmode = "jwt"\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\njwks_file = "jwks.json"\n'
        f'[[archives]]\nname = "acl"\nurl = "{acl_archive.dicomweb_url}"\nforward_authorization = true\n')
    with ProxyProcess({}, workdir, ["--config", str(workdir / "edge.toml")]) as proxy:
        yield proxy


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_jwt_checks_at_the_door(jwt_proxy, signer, client):
    base = jwt_proxy.dicomweb_url
    r = client.get(f"{base}/studies", headers=bearer(signer.token(lifetime=-120)))
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == ('Bearer realm="dicomweb-edge", error="invalid_token", '
                                             'error_description="token expired"')
    r = client.get(f"{base}/studies", headers=bearer(signer.token(scope="openid profile")))
    assert r.status_code == 403 and r.headers["www-authenticate"].endswith('scope="dicomweb.read"')
    other = SigningKey("RS256", "edge-test")  # same kid, another key: the signature does not verify
    assert client.get(f"{base}/studies", headers=bearer(other.token())).status_code == 401
    assert client.get(f"{jwt_proxy.url}/admin/cache", headers=bearer(signer.token())).status_code == 403
    admin = signer.token(scope="dicomweb.admin")
    assert client.get(f"{jwt_proxy.url}/admin/cache", headers=bearer(admin)).status_code == 200


def test_token_b_never_reads_from_the_cache_what_only_token_a_may_see(jwt_proxy, acl_archive, studies, tokens,
                                                                     client):
    only_a, both = studies
    a, b, log = bearer(tokens["a"]), bearer(tokens["b"]), acl_archive.archive
    secret = frame_url(jwt_proxy.dicomweb_url, only_a, 1)
    r = client.get(secret, headers={**FRAMES, **a})
    assert (r.status_code, r.headers["x-cache"]) == (200, "MISS") and payload(r) == frame_bytes(only_a, 1)
    r = client.get(secret, headers={**FRAMES, **a})
    assert r.headers["x-cache"] == "HIT" and payload(r) == frame_bytes(only_a, 1)  # A keeps its hits

    for _ in range(2):  # no memo of a refusal: asked again, refused again
        r = client.get(secret, headers={**FRAMES, **b})
        assert r.status_code == 404 and frame_bytes(only_a, 1) not in r.content and "x-cache" not in r.headers
    r = client.get(secret, headers={**FRAMES, **bearer(tokens["stranger"])})  # a valid JWT the archive rejects
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]

    meta = f"{jwt_proxy.dicomweb_url}/studies/{only_a.StudyInstanceUID}/metadata"
    r = client.get(meta, headers=a)
    assert r.status_code == 200 and r.headers["x-cache"] == "MISS" and "ONLYA" in r.text
    assert client.get(meta, headers=a).headers["x-cache"] == "HIT"
    r = client.get(meta, headers=b)
    assert r.status_code == 404 and "ONLYA" not in r.text

    rendered = frame_url(jwt_proxy.dicomweb_url, only_a, 1) + "/rendered"
    r = client.get(rendered, headers={"Accept": "image/png", **a})
    assert (r.status_code, r.headers["x-cache"]) == (200, "MISS") and r.content.startswith(b"\x89PNG")
    assert client.get(rendered, headers={"Accept": "image/png", **a}).headers["x-cache"] == "HIT"
    r = client.get(rendered, headers={"Accept": "image/png", **b})
    assert r.status_code == 404 and not r.content.startswith(b"\x89PNG")

    instance = frame_url(jwt_proxy.dicomweb_url, only_a).rsplit("/frames/", 1)[0]
    for url, accept in ((instance, 'multipart/related; type="application/dicom"; transfer-syntax=*'),
                        (instance + "/bulk/7fe00010", 'multipart/related; type="application/octet-stream"')):
        assert client.get(url, headers={"Accept": accept, **a}).headers["x-cache"] == "MISS"
        assert client.get(url, headers={"Accept": accept, **a}).headers["x-cache"] == "HIT"
        r = client.get(url, headers={"Accept": accept, **b})
        assert r.status_code == 404 and frame_bytes(only_a, 1) not in r.content

    searches = f"{jwt_proxy.dicomweb_url}/studies"
    r = client.get(searches, headers=a)
    assert studies_of(r) == {only_a.StudyInstanceUID, both.StudyInstanceUID}
    r = client.get(searches, headers=b)  # the same query: A's cached answer must not come back
    assert studies_of(r) == {both.StudyInstanceUID} and "x-cache" not in r.headers and "ONLYA" not in r.text
    r = client.get(searches, headers=b)
    assert r.headers["x-cache"] == "HIT" and studies_of(r) == {both.StudyInstanceUID}
    r = client.get(searches, headers=a)
    assert r.headers["x-cache"] == "HIT" and studies_of(r) == {only_a.StudyInstanceUID, both.StudyInstanceUID}

    # A study both may see, cached by A: B is served from the cache after one check with the archive.
    shared = frame_url(jwt_proxy.dicomweb_url, both, 2)
    assert client.get(shared, headers={**FRAMES, **a}).headers["x-cache"] == "MISS"
    checks, frames = log.requests["qido"], log.requests["frames"]
    r = client.get(shared, headers={**FRAMES, **b})
    assert (r.status_code, r.headers["x-cache"]) == (200, "HIT") and payload(r) == frame_bytes(both, 2)
    assert (log.requests["qido"], log.requests["frames"]) == (checks + 1, frames)
    assert client.get(shared, headers={**FRAMES, **b}).headers["x-cache"] == "HIT"
    assert log.requests["qido"] == checks + 1  # remembered: no second check within access_ttl
    client.get(shared, headers={**FRAMES, **a, "X-Request-ID": "token-in-log"})
    assert tokens["a"] not in jwt_proxy.log_after("token-in-log")


@pytest.fixture(scope="module")
def public():
    return multiframe_native(Study(Patient("PUBLIC^OWNCREDS", "PIDO1")), n_frames=2, rows=32, cols=32, seed=5)


@pytest.fixture(scope="module")
def open_archive(public):
    archive = SampleArchive("OPEN")
    archive.add(public)
    with ArchiveServer(archive) as server:
        yield server


@pytest.fixture(scope="module")
def mixed_proxy(acl_archive, open_archive, signer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("auth_mixed")
    (workdir / "jwks.json").write_text(json.dumps(jwks(signer)))
    (workdir / "edge.toml").write_text(
        f'[cache]\ndir = "cache"\nprefetch = false\n'
        f'[auth]\nmode = "jwt"\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\njwks_file = "jwks.json"\n'
        f'[[archives]]\nname = "acl"\nurl = "{acl_archive.dicomweb_url}"\nforward_authorization = true\n'
        f'[[archives]]\nname = "open"\nurl = "{open_archive.dicomweb_url}"\n')
    with ProxyProcess({}, workdir, ["--config", str(workdir / "edge.toml")]) as proxy:
        yield proxy


def test_the_token_goes_only_to_the_pass_through_archive(mixed_proxy, acl_archive, open_archive, public, studies,
                                                          tokens, client):
    only_a, both = studies
    a, b = bearer(tokens["a"]), bearer(tokens["b"])
    r = client.get(f"{mixed_proxy.dicomweb_url}/studies", headers=a)
    assert studies_of(r) == {only_a.StudyInstanceUID, both.StudyInstanceUID, public.StudyInstanceUID}
    r = client.get(f"{mixed_proxy.dicomweb_url}/studies", headers=b)
    assert studies_of(r) == {both.StudyInstanceUID, public.StudyInstanceUID}
    assert acl_archive.archive.authorizations[f"Bearer {tokens['a']}"] > 0
    assert set(open_archive.archive.authorizations) == {None}  # never a caller's token

    # A study only the own-credentials archive holds: cached for A, shared with B without asking "acl".
    url = frame_url(mixed_proxy.dicomweb_url, public, 1)
    assert client.get(url, headers={**FRAMES, **a}).headers["x-cache"] == "MISS"
    checks = acl_archive.archive.requests["qido"]
    r = client.get(url, headers={**FRAMES, **b})
    assert (r.status_code, r.headers["x-cache"]) == (200, "HIT") and payload(r) == frame_bytes(public, 1)
    assert acl_archive.archive.requests["qido"] == checks
    # ... while what only A may see, cached through this proxy too, stays A's.
    secret = frame_url(mixed_proxy.dicomweb_url, only_a, 2)
    assert client.get(secret, headers={**FRAMES, **a}).headers["x-cache"] == "MISS"
    assert client.get(secret, headers={**FRAMES, **a}).headers["x-cache"] == "HIT"
    r = client.get(secret, headers={**FRAMES, **b})
    assert r.status_code == 404 and frame_bytes(only_a, 2) not in r.content
