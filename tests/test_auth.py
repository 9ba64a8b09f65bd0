"""Inbound authentication at unit level (issue 7 point 1): JWT checks against JWKS from a file and from a
local HTTP server (cache, rotation, rate limit), API keys, scope mapping, the [auth] validation, and the
pass-through access memo. Every key and token is generated here."""

from __future__ import annotations

import json
import time

import pytest
from authkeys import AUDIENCE, ISSUER, JwksServer, SigningKey, forged, jwks

from proxy.auth import access, inbound
from proxy.auth.access import AccessMemo
from proxy.auth.bearer import JwksCache, JwtVerifier, TokenError, scopes_of
from proxy.config import ConfigError, load
from proxy.errors import Problem
from proxy.runtime import build_context, check_settings
from proxy.upstream.archive import CALLER_AUTHORIZATION


@pytest.fixture(scope="module")
def rsa_key():
    return SigningKey("RS256", "rsa-1")


@pytest.fixture(scope="module")
def ec_key():
    return SigningKey("ES256", "ec-1")


@pytest.fixture()
def jwks_file(tmp_path, rsa_key, ec_key):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(rsa_key, ec_key)))
    return path


def verifier(source, leeway=0.0, **kw):
    return JwtVerifier(JwksCache(str(source), **kw), ISSUER, [AUDIENCE], ["RS256", "ES256"], leeway)


async def rejected(v, token):
    with pytest.raises(TokenError) as info:
        await v.verify(token)
    return str(info.value)


async def test_valid_rs256_and_es256_tokens_verify(jwks_file, rsa_key, ec_key):
    v = verifier(jwks_file)
    for key in (rsa_key, ec_key):
        claims = await v.verify(key.token(scope="dicomweb.read dicomweb.write"))
        assert claims["iss"] == ISSUER and scopes_of(claims, "scope") == {"dicomweb.read", "dicomweb.write"}


async def test_expired_and_not_yet_valid_tokens_are_refused_leeway_is_clock_skew(jwks_file, rsa_key):
    strict, lenient = verifier(jwks_file), verifier(jwks_file, leeway=60)
    expired = rsa_key.token(lifetime=-10)  # expired 10 s ago
    assert await rejected(strict, expired) == "token expired"
    assert (await lenient.verify(expired))["sub"] == "user-1"  # within 60 s of skew
    assert await rejected(lenient, rsa_key.token(lifetime=-120)) == "token expired"
    early = rsa_key.token(nbf=int(time.time()) + 20)
    assert await rejected(strict, early) == "token not yet valid"
    assert (await lenient.verify(early))["sub"] == "user-1"
    assert await rejected(lenient, rsa_key.token(nbf=int(time.time()) + 600)) == "token not yet valid"


async def test_wrong_issuer_audience_or_missing_claims_are_refused(jwks_file, rsa_key):
    v = verifier(jwks_file)
    assert await rejected(v, rsa_key.token(iss="https://evil.example")) == "token issuer not accepted"
    assert await rejected(v, rsa_key.token(aud="another-service")) == "token audience not accepted"
    assert "'exp'" in await rejected(v, rsa_key.token(lifetime=0, exp=None))


async def test_algorithm_confusion_and_alg_none_are_refused(jwks_file, rsa_key):
    v = verifier(jwks_file)
    # HS256 keyed with the RSA public key (what a naive verifier would accept): never.
    confused = forged({"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}, rsa_key.public_pem())
    assert await rejected(v, confused) == "token algorithm not accepted"
    assert await rejected(v, forged({"alg": "none", "typ": "JWT", "kid": rsa_key.kid}, None)) == \
        "token algorithm not accepted"
    assert await rejected(v, forged({"alg": "RS256", "kid": rsa_key.kid}, b"x")) == "token signature does not verify"
    assert await rejected(v, "not.a.token") == "malformed token"
    # An ES256 header naming the RSA key id: the key's own algorithm decides, no cross-use.
    other = SigningKey("ES256", rsa_key.kid)
    assert await rejected(v, other.token()) == "token signed by an unknown key"


async def test_jwks_url_is_cached_and_an_unknown_kid_refetches_at_a_bounded_rate(rsa_key):
    clock = [1000.0]
    with JwksServer(jwks(rsa_key)) as server:
        v = verifier(server.url, ttl=300, min_interval=30, clock=lambda: clock[0])
        for _ in range(5):
            await v.verify(rsa_key.token())
        assert server.fetches == 1  # cached
        rotated = SigningKey("RS256", "rsa-2")
        server.document = jwks(rotated)  # the issuer rotates its key
        clock[0] += 5
        assert await rejected(v, rotated.token()) == "token signed by an unknown key"
        assert server.fetches == 1  # 5 s after the last fetch: no refetch (a made-up kid cannot flood the IdP)
        clock[0] += 30
        assert (await v.verify(rotated.token()))["sub"] == "user-1"  # refetched: the new key is picked up
        assert server.fetches == 2
        assert await rejected(v, rsa_key.token()) == "token signed by an unknown key"  # the old key is gone
        clock[0] += 301
        await v.verify(rotated.token())
        assert server.fetches == 3  # the cache TTL ran out


async def test_a_failed_jwks_refresh_keeps_the_known_keys(tmp_path, rsa_key):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(rsa_key)))
    clock = [0.0]
    v = verifier(path, ttl=10, min_interval=5, clock=lambda: clock[0])
    await v.verify(rsa_key.token())
    path.write_text("{not json")
    clock[0] += 11
    await v.verify(rsa_key.token())  # the refresh failed; the key read before still verifies
    assert v.jwks.fetches == 2


def test_scopes_come_from_a_space_separated_string_or_a_list():
    assert scopes_of({"scope": "a b  c"}, "scope") == {"a", "b", "c"}
    assert scopes_of({"scp": ["a", "b", 3]}, "scp") == {"a", "b"}
    assert scopes_of({"scope": 5}, "scope") == set()


async def test_api_keys_are_matched_by_digest_with_their_scopes(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# operators\n{inbound.key_digest('s3cret-admin')} admin,read  ops team\n")
    config = inbound.parse({"mode": "api_key", "api_keys_file": str(keys_file), "api_keys": [
        {"name": "viewer", "sha256": inbound.key_digest("s3cret-read"), "scopes": ["read"]}]}, "127.0.0.1")
    a = inbound.Authenticator(config)
    assert await a.scopes("Bearer s3cret-read", None) == {"read"}
    assert await a.scopes(None, "s3cret-admin") == {"admin", "read"}
    for header, key, status in (("Bearer nope", None, 401), (None, None, 401), ("Basic s3cret-read", None, 401)):
        with pytest.raises(inbound.Denied) as info:
            await a.scopes(header, key)
        assert info.value.status == status
    assert config.api_keys[inbound.key_digest("s3cret-admin")][0] == "ops team"


async def test_jwt_scopes_map_to_read_write_admin(jwks_file, rsa_key):
    config = inbound.parse({"mode": "jwt", "issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks_file),
                         "scope_claim": "scp", "write_scope": "pacs:store"}, "127.0.0.1")
    a = inbound.Authenticator(config)
    token = rsa_key.token(scope=None, scp=["dicomweb.read", "pacs:store", "dicomweb.write"])
    assert await a.scopes(f"Bearer {token}", None) == {"read", "write"}
    with pytest.raises(inbound.Denied) as info:
        await a.scopes(f"Bearer {rsa_key.token(lifetime=-100)}", None)
    assert (info.value.status, info.value.error, info.value.metric) == (401, "invalid_token", "expired")


def test_required_scopes_by_path():
    c = inbound.AuthConfig(mode="jwt")
    trusted = ["127.0.0.1"]

    def need(method, path, client="10.0.0.5", viewer=True, relayed=False):
        return inbound.required_scope(method, path, client, c, trusted, viewer, relayed)

    assert need("GET", "/healthz") is None and need("GET", "/readyz") is None
    assert need("GET", "/dicomweb/studies") == "read" and need("POST", "/dicomweb/studies") == "write"
    assert need("GET", "/upstreams/a/dicomweb/studies") == "read"
    assert need("POST", "/admin/cache/purge") == "admin" and need("GET", "/admin/cache") == "admin"
    assert need("GET", "/metrics") == "admin" and need("GET", "/metrics", client="127.0.0.1") is None
    assert need("GET", "/metrics", client="127.0.0.1", relayed=True) == "admin"  # relayed by a front
    assert need("GET", "/") is None and need("GET", "/viewer/study") is None  # the static viewer
    assert need("GET", "/anything", viewer=False) == "read"  # no viewer: deny by default


def test_auth_settings_are_validated(tmp_path, jwks_file):
    def conf(text, host="127.0.0.1"):
        f = tmp_path / "edge.toml"
        f.write_text(f'[server]\nhost = "{host}"\n{text}\n[[archives]]\nname = "a"\nurl = "http://127.0.0.1:1/dw"\n')
        settings = load(f, environ={})
        check_settings(settings)
        return settings

    assert conf("").auth == {}
    with pytest.raises(ConfigError, match="mode 'none' while listening on 0.0.0.0"):
        conf("", host="0.0.0.0")
    assert conf("[auth]\nallow_none_on_network = true\n", host="0.0.0.0").auth["allow_none_on_network"] is True
    jwt_ok = f'[auth]\nmode = "jwt"\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\njwks_file = "{jwks_file}"\n'
    assert conf(jwt_ok, host="0.0.0.0").auth["mode"] == "jwt"
    for bad, message in (
        (jwt_ok + 'algorithms = ["HS256"]\n', "only RS256, ES256"),
        (jwt_ok + 'algorithms = ["none"]\n', "only RS256, ES256"),
        (f'[auth]\nmode = "jwt"\naudience = "x"\njwks_file = "{jwks_file}"\n', "needs issuer and audience"),
        ('[auth]\nmode = "jwt"\nissuer = "i"\naudience = "x"\n', "exactly one of jwks_file and jwks_url"),
        ('[auth]\nmode = "api_key"\n', "at least one key"),
        ('[auth]\nmode = "api_key"\napi_keys = [{ name = "k", sha256 = "plaintext-key", scopes = ["read"] }]\n',
         "SHA-256 digest of the key, not the key"),
        ('[auth]\nmode = "api_key"\napi_keys = [{ sha256 = "' + "a" * 64 + '", scopes = ["root"] }]\n',
         r'scopes \(item 1\): expected one of "admin", "read" or "write", given "root"'),
        ('[auth]\nmode = "kerberos"\n', r'\[auth\] mode: expected one of "api_key", "jwt" or "none", given "kerberos"'),
        ('[auth]\nmetrics = "public"\n', r"\[auth\] metrics: expected one of"),
        ('[auth]\ntypo = 1\n', r"\[auth\] typo: not a key of \[auth\]"),
    ):
        with pytest.raises(ConfigError, match=message):
            conf(bad)
    forwarding = ('[auth]\nmode = "api_key"\napi_keys = [{ sha256 = "' + "a" * 64 + '", scopes = ["read"] }]\n'
                  '[[archives]]\nname = "b"\nurl = "http://127.0.0.1:2/dw"\nforward_authorization = true\n')
    with pytest.raises(ConfigError, match="would receive the proxy's own API keys"):
        conf(forwarding)
    env = {"DICOMWEB_EDGE_AUTH_MODE": "jwt", "DICOMWEB_EDGE_AUTH_ISSUER": ISSUER,
           "DICOMWEB_EDGE_AUTH_AUDIENCE": AUDIENCE, "DICOMWEB_EDGE_AUTH_JWKS_FILE": str(jwks_file)}
    f = tmp_path / "env.toml"
    f.write_text('[[archives]]\nname = "a"\nurl = "http://127.0.0.1:1/dw"\n')
    assert load(f, environ=env).auth["issuer"] == ISSUER


def test_access_memo_expires_and_is_bounded():
    clock = [0.0]
    memo = AccessMemo(ttl=60, max_entries=2, clock=lambda: clock[0])
    memo.confirm("acl", "a", "1.2")
    assert memo.confirmed("acl", "a", "1.2") and not memo.confirmed("acl", "b", "1.2")
    assert not memo.confirmed("acl", "a", "1.3")
    assert not memo.confirmed("other", "a", "1.2")  # one archive's confirmation is not another's
    clock[0] = 60.5
    assert not memo.confirmed("acl", "a", "1.2")
    for study in ("1", "2", "3"):
        memo.confirm("acl", "a", study)
    assert not memo.confirmed("acl", "a", "1") and memo.confirmed("acl", "a", "3")


async def test_a_worker_remembers_confirmations_in_its_contexts_one_memo():
    """The composition root makes one AccessMemo a worker: its `/upstreams/{name}` contexts share it, `confirm`
    writes to the memo of the context it is given and `admit` reads it; another worker's memo is its own."""
    settings = load(None, {"archives": [{"name": "acl", "url": "http://127.0.0.1:9/dw",
                                         "forward_authorization": True}], "health_interval": 0}, environ={})
    ctx, other = build_context(settings), build_context(settings)  # (as two workers would)
    assert ctx.single["acl"].access_memo is ctx.access_memo is not other.access_memo
    token = CALLER_AUTHORIZATION.set("Bearer caller")
    try:
        access.confirm(ctx.single["acl"], ctx.single["acl"].archives[0], None, "/studies/1.2/series/3")
        assert ctx.access_memo.confirmed("acl", access.caller(), "1.2")
        await access.admit(ctx, "1.2", {"acl"})  # confirmed: the archive (nothing listens) is not asked
        with pytest.raises(Problem) as refused:
            await access.admit(other, "1.2", {"acl"})  # not confirmed there: asked, and it cannot be
        assert refused.value.status == 502
        access.confirm(other, other.archives[0], "1.3")
        assert other.access_memo.confirmed("acl", access.caller(), "1.3")
        assert not ctx.access_memo.confirmed("acl", access.caller(), "1.3")
    finally:
        CALLER_AUTHORIZATION.reset(token)
        for c in (ctx, other):
            await c.archives[0].close()
