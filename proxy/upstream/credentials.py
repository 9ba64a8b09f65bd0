"""The proxy's own credentials towards one archive: Basic, a static bearer token, OAuth2 client
credentials (cached, refreshed before expiry, one refresh at a time), and client TLS certificates.

Secrets come from the config, a file (`*_file`) or an environment variable (`*_env`), are read in the
process that uses them, and are only ever put on requests to their own archive (`Archive.open`). They
are never logged and `check-config` prints them as `***` (proxy.config.messages.masked).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from proxy.config.schema import ARCHIVE_SECRETS
from proxy.upstream.egress import Egress

log = logging.getLogger("dicomweb_edge")

AUTH_TYPES = {  # type → (required keys, optional keys); a secret key may instead come as KEY_file / KEY_env
    "basic": ({"username", "password"}, set()),
    "bearer": ({"token"}, set()),
    "oauth2": ({"token_url", "client_id", "client_secret"}, {"scope", "audience"}),
    "aws": (set(), {"region", "profile", "service"}),  # SigV4 from botocore's credential chain (healthimaging.py)
}
SECRETS = frozenset(ARCHIVE_SECRETS)  # the keys whose value is a secret (config masks them, refuses ***)
TLS_KEYS = {"ca_file", "cert_file", "key_file", "verify"}
REFRESH_MARGIN = 30.0  # seconds before expiry an OAuth2 token is replaced (or a tenth of its life if shorter)
RETRY_AFTER_FAILURE = 5.0  # after a failed token request, requests fail at once for this long (no hammering)


class CredentialError(Exception):
    """The credential could not be obtained (the token endpoint failed); the archive is not asked."""


def check_auth(auth: Mapping[str, Any], where: str, environ: Mapping[str, str] | None = None) -> None:
    """Raise ValueError for an unusable `auth` table: unknown type or key, missing secret, bad token URL."""
    env = os.environ if environ is None else environ
    kind = auth.get("type")
    if kind not in AUTH_TYPES:
        raise ValueError(f"{where}: auth.type must be one of {', '.join(AUTH_TYPES)}")
    required, optional = AUTH_TYPES[kind]
    allowed = {"type"} | required | optional | {f"{s}{x}" for s in required & SECRETS for x in ("_file", "_env")}
    unknown = set(auth) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown auth key(s) {sorted(unknown)} for type {kind!r}")
    for key in sorted(required):
        given = [k for k in (key, f"{key}_file", f"{key}_env") if k in auth]
        if key not in SECRETS and not given:
            raise ValueError(f"{where}: auth.{key} is required for type {kind!r}")
        if key in SECRETS and len(given) != 1:
            raise ValueError(f"{where}: give exactly one of auth.{key}, auth.{key}_file, auth.{key}_env")
        if f"{key}_file" in auth and not os.access(str(auth[f"{key}_file"]), os.R_OK):
            raise ValueError(f"{where}: auth.{key}_file {auth[f'{key}_file']!r} is not a readable file")
        if f"{key}_env" in auth and not env.get(str(auth[f"{key}_env"])):
            raise ValueError(f"{where}: auth.{key}_env names {auth[f'{key}_env']!r}, which is not set")
    if kind == "oauth2":
        u = urlsplit(str(auth["token_url"]))
        if u.scheme != "https" and not (u.scheme == "http" and is_loopback(u.hostname or "")):
            raise ValueError(f"{where}: auth.token_url must be https (plain http only on a loopback address)")


def check_tls(tls: Mapping[str, Any], where: str) -> None:
    """Raise ValueError for an unusable `tls` table."""
    unknown = set(tls) - TLS_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown tls key(s) {sorted(unknown)}; allowed: {', '.join(sorted(TLS_KEYS))}")
    if not isinstance(tls.get("verify", True), bool):
        raise ValueError(f"{where}: tls.verify must be true or false")
    if "key_file" in tls and "cert_file" not in tls:
        raise ValueError(f"{where}: tls.key_file needs tls.cert_file")
    for key in ("ca_file", "cert_file", "key_file"):
        if key in tls and not os.access(str(tls[key]), os.R_OK):
            raise ValueError(f"{where}: tls.{key} {tls[key]!r} is not a readable file")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _secret(auth: Mapping[str, Any], key: str) -> str:
    if key in auth:
        return str(auth[key])
    if f"{key}_file" in auth:
        with open(str(auth[f"{key}_file"]), encoding="utf-8") as fh:
            return fh.read().strip()
    return os.environ.get(str(auth[f"{key}_env"]), "")


class Credentials:
    """Produces the Authorization header value for one archive's requests (None: no credential)."""

    refused: tuple[int, ...] = (401,)  # the archive's answers that mean "this credential is no longer good"

    async def authorization(self) -> str | None:
        """The header value to send now."""
        return None

    async def headers(self, method: str, url: str, headers: Mapping[str, str], body: Any = None) -> dict[str, str]:
        """The headers this credential adds to one request: Authorization (a request-signing scheme more,
        computed from the method, URL, headers and body: upstream/healthimaging.py)."""
        value = await self.authorization()
        return {} if value is None else {"Authorization": value}

    def rejected(self) -> None:
        """The archive answered 401: a cached token is dropped so the next request fetches a new one."""

    async def close(self) -> None:
        """Release resources."""


class Static(Credentials):
    """Basic or a static bearer token: the same header on every request."""

    def __init__(self, value: str) -> None:
        self._value = value

    async def authorization(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "Static(***)"


class OAuth2ClientCredentials(Credentials):
    """The client-credentials grant (RFC 6749 §4.4): one token, cached until shortly before it expires."""

    def __init__(self, auth: Mapping[str, Any], archive: str, tls: Mapping[str, Any] | None = None,
                 egress: Egress | None = None) -> None:
        self.token_url = str(auth["token_url"])
        self.archive = archive
        self._form = {"grant_type": "client_credentials"}
        for key in ("scope", "audience"):
            if key in auth:
                self._form[key] = str(auth[key])
        self._client = (str(auth["client_id"]), _secret(auth, "client_secret"))
        self._tls = tls
        self._egress = egress or Egress()
        self._token: str | None = None
        self._renew_at = 0.0
        self._expires_at = 0.0
        self._failed: tuple[float, CredentialError] | None = None  # (until, error) after a failed fetch
        self._lock = asyncio.Lock()
        self.fetched = 0  # tokens obtained (for tests and debugging; never the token itself)

    def __repr__(self) -> str:
        return f"OAuth2ClientCredentials({self.token_url!r}, client_id={self._client[0]!r}, secret=***)"

    async def authorization(self) -> str | None:
        if self._token is None or time.monotonic() >= self._renew_at:
            async with self._lock:  # single flight: the first caller refreshes, the others reuse its token
                if self._token is None or time.monotonic() >= self._renew_at:
                    try:
                        if self._failed is not None and time.monotonic() < self._failed[0]:
                            raise self._failed[1]
                        try:
                            await self._fetch()
                        except CredentialError as exc:
                            self._failed = (time.monotonic() + RETRY_AFTER_FAILURE, exc)
                            raise
                    except CredentialError:
                        if self._token is None or time.monotonic() >= self._expires_at:
                            raise
                        return f"Bearer {self._token}"  # renewal failed, but the current token is still valid
                    self._failed = None
        return f"Bearer {self._token}"

    def rejected(self) -> None:
        self._renew_at = self._expires_at = 0.0

    async def _fetch(self) -> None:
        import httpx

        # The archive's CAs (not its client certificate: that is for the archive alone) and egress proxy.
        tls = {"ca_file": self._tls["ca_file"]} if self._tls and "ca_file" in self._tls else None
        basic = base64.b64encode(f"{self._client[0]}:{self._client[1]}".encode()).decode()
        try:
            async with self._egress.httpx_client(self.token_url, 10.0, tls) as c:
                resp = await c.post(self.token_url, content=urlencode(self._form).encode(),
                                    headers={"Authorization": f"Basic {basic}",
                                             "Content-Type": "application/x-www-form-urlencoded",
                                             "Accept": "application/json"})
        except httpx.ProxyError as exc:
            raise CredentialError(f"token endpoint for archive '{self.archive}': egress proxy refused "
                                  f"the tunnel ({str(exc)[:80]})") from None
        except httpx.HTTPError as exc:
            raise CredentialError(f"token endpoint for archive '{self.archive}' unreachable "
                                  f"({type(exc).__name__})") from None
        try:
            doc = json.loads(resp.content) if resp.status_code == 200 else None
        except ValueError:
            doc = None
        token = doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise CredentialError(f"token endpoint for archive '{self.archive}' refused the client "
                                  f"(HTTP {resp.status_code})")
        lifetime = doc.get("expires_in", 3600) if isinstance(doc, dict) else 3600
        lifetime = float(lifetime) if isinstance(lifetime, int | float) and lifetime > 0 else 3600.0
        self._token = token
        self._expires_at = time.monotonic() + lifetime
        self._renew_at = self._expires_at - min(REFRESH_MARGIN, lifetime / 10)
        self.fetched += 1
        log.info("archive '%s': obtained an OAuth2 access token valid for %.0f s", self.archive, lifetime)


def credentials(auth: Mapping[str, Any] | None, archive: str, tls: Mapping[str, Any] | None = None,
                egress: Egress | None = None) -> Credentials:
    """The credential provider an `[[archives]] auth` table describes."""
    if not auth:
        return Credentials()
    kind = auth["type"]
    if kind == "basic":
        pair = f"{auth['username']}:{_secret(auth, 'password')}".encode()
        return Static("Basic " + base64.b64encode(pair).decode())
    if kind == "bearer":
        return Static("Bearer " + _secret(auth, "token"))
    return OAuth2ClientCredentials(auth, archive, tls, egress)
