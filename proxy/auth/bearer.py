"""OAuth2 / OIDC bearer tokens: signature against a JWKS (file or URL, cached, re-read on an unknown key
id at a bounded rate), then `iss`, `aud`, `exp` and `nbf` with a clock-skew leeway.

Only RS256 and ES256 are accepted: `none` and the HMAC family never are (with HS256 the archive's public
key would become a shared secret: the classic algorithm-confusion attack). PyJWT with the `cryptography`
backend does the JWS work; this module decides which key and which algorithm it may use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt

from proxy.upstream.egress import Egress

log = logging.getLogger("dicomweb_edge.auth")
ALGORITHMS = ("RS256", "ES256")
MAX_JWKS_BYTES = 1 << 20


class TokenError(Exception):
    """The token is not acceptable; the message is short and holds nothing from the token."""


class JwksCache:
    """The signing keys of one issuer, from a JWKS file or URL.

    Keys are kept `ttl` seconds; a token naming a key id that is not known makes the cache read the
    source again (key rotation), but never more often than once per `min_interval` seconds, so that
    made-up key ids cannot turn the proxy into a flood against the identity provider. A failed read
    keeps the keys already known.
    """

    def __init__(self, source: str, ttl: float = 300.0, min_interval: float = 30.0, timeout: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, egress: Egress | None = None) -> None:
        self.source = source
        self.egress = egress or Egress()  # the egress proxy and the CAs trusted for an https JWKS URL
        self.ttl = ttl
        self.min_interval = min_interval
        self.timeout = timeout
        self.clock = clock
        self.fetches = 0  # how many times the source was read
        self._keys: list[jwt.PyJWK] = []
        self._expires = 0.0
        self._last = float("-inf")
        self._lock = asyncio.Lock()

    async def _read(self) -> bytes:
        if self.source.startswith(("http://", "https://")):
            async with self.egress.httpx_client(self.source, self.timeout) as client:
                resp = await client.get(self.source, headers={"Accept": "application/json"})
                if resp.status_code != 200:
                    raise OSError(f"HTTP {resp.status_code}")
                return resp.content[: MAX_JWKS_BYTES + 1]
        return await asyncio.to_thread(lambda: Path(self.source).read_bytes()[: MAX_JWKS_BYTES + 1])

    async def refresh(self) -> None:
        """Read the source now (one read at a time; callers that waited reuse its result)."""
        started = self.clock()
        async with self._lock:
            if self._last >= started:
                return  # another caller read it while this one waited
            self._last = self.clock()
            self.fetches += 1
            try:
                body = await self._read()
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("larger than 1 MiB")
                keys = parse_jwks(json.loads(body))
            except (OSError, ValueError, httpx.HTTPError) as exc:
                log.warning("could not read the JWKS from %s (%s); keeping %d known key(s)", self.source,
                            type(exc).__name__ if not isinstance(exc, ValueError) else exc, len(self._keys))
                self._expires = self._last + self.min_interval  # known keys stay usable; retry later
                return
            self._keys = keys
            self._expires = self._last + self.ttl

    async def keys_for(self, kid: str | None, alg: str) -> list[jwt.PyJWK]:
        """The known keys that may have signed a token with this `kid` (all of `alg` when it names none)."""
        if self.clock() >= self._expires:
            await self.refresh()
        found = self._match(kid, alg)
        if not found and kid is not None and self.clock() - self._last >= self.min_interval:
            await self.refresh()  # perhaps the issuer rotated its keys
            found = self._match(kid, alg)
        return found

    def _match(self, kid: str | None, alg: str) -> list[jwt.PyJWK]:
        return [k for k in self._keys if (kid is None or k.key_id == kid) and k.algorithm_name == alg]


def parse_jwks(doc: Any) -> list[jwt.PyJWK]:
    """The usable signature keys of a JWKS document (encryption keys and unsupported types are skipped)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys = []
    for item in doc["keys"]:
        if not isinstance(item, dict) or item.get("use", "sig") != "sig" or "d" in item:
            continue  # an encryption key, or a private key published by mistake: not for us
        try:
            key = jwt.PyJWK(item)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError):
            continue
        if key.algorithm_name in ALGORITHMS:
            keys.append(key)
    return keys


class JwtVerifier:
    """Checks one bearer token and returns its claims."""

    def __init__(self, jwks: JwksCache, issuer: str, audience: list[str], algorithms: list[str],
                 leeway: float) -> None:
        self.jwks = jwks
        self.issuer = issuer
        self.audience = audience
        self.algorithms = [a for a in algorithms if a in ALGORITHMS]
        self.leeway = leeway

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or TokenError."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("malformed token") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise TokenError("token algorithm not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("malformed token")
        keys = await self.jwks.keys_for(kid, alg)
        if not keys:
            raise TokenError("token signed by an unknown key")
        for key in keys:
            try:
                return jwt.decode(token, key.key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                                  leeway=self.leeway, options={"require": ["exp", "iss", "aud"]})
            except jwt.InvalidSignatureError:
                continue  # no kid: try the issuer's next key of this algorithm
            except jwt.ExpiredSignatureError:
                raise TokenError("token expired") from None
            except jwt.ImmatureSignatureError:
                raise TokenError("token not yet valid") from None
            except jwt.InvalidAudienceError:
                raise TokenError("token audience not accepted") from None
            except jwt.InvalidIssuerError:
                raise TokenError("token issuer not accepted") from None
            except jwt.MissingRequiredClaimError as exc:
                raise TokenError(f"token lacks the {exc.claim!r} claim") from None
            except jwt.PyJWTError:
                raise TokenError("invalid token") from None
        raise TokenError("token signature does not verify")


def scopes_of(claims: dict[str, Any], claim: str) -> set[str]:
    """The scopes a token grants: a space-separated string (`scope`) or a list (`scp`, some issuers)."""
    value = claims.get(claim)
    if isinstance(value, str):
        return set(value.split())
    if isinstance(value, list):
        return {v for v in value if isinstance(v, str)}
    return set()
