"""The cloud archives' credentials: Google Cloud Healthcare (`auth.type = "google"`, through google-auth) and
Azure Health Data Services DICOM (`auth.type = "azure"`, through azure-identity), behind credentials.Credentials.

Both libraries are optional extras (`pip install dicomweb-edge[google]`, `[azure]`), imported here only, the
first time an archive needs them; a missing one is a ConfigError naming the extra. Their calls block, so a
token is obtained in a thread (asyncio.to_thread), one renewal at a time per worker, shared by every request
of that worker to the archive, and renewed before it expires (a failed renewal keeps the token while it is
still valid). A token is never logged; a failure is logged with the library's reason (an error code, never
a credential).

The HTTP these libraries send (token endpoints, the metadata server, IMDS) goes through one requests
Session made by `http_session`: the one place to route it through an egress proxy or another trust store.
Trusted there: the system's CAs, or the archive's `tls.ca_file` when it has one (as for OAuth2).
"""

from __future__ import annotations

import abc
import asyncio
import ipaddress
import json
import logging
import os
import time
from collections.abc import Mapping
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

from proxy.config import ConfigError
from proxy.upstream import credentials as outbound
from proxy.upstream.credentials import REFRESH_MARGIN, RETRY_AFTER_FAILURE, CredentialError, Credentials, _secret
from proxy.upstream.egress import Egress

log = logging.getLogger("dicomweb_edge")

GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-healthcare"
AZURE_SCOPE = "https://dicom.healthcareapis.azure.com/.default"
GOOGLE_SOURCES = ("key_file", "adc", "metadata")
TOKEN_TIMEOUT = 10.0  # seconds a token request may take (the libraries' own allow minutes) before requests fail
AZURE_KEYS = {  # mode → (required keys, optional keys); client_secret may come as client_secret_file / _env
    "client_secret": ({"tenant_id", "client_id", "client_secret"}, {"authority_host", "scope"}),
    "workload_identity": (set(), {"tenant_id", "client_id", "federated_token_file", "authority_host", "scope"}),
    "managed_identity": (set(), {"client_id", "scope"}),
}


def _needs(extra: str, what: str) -> ConfigError:
    return ConfigError(f"{what} needs `pip install dicomweb-edge[{extra}]`")


def check_auth(auth: Mapping[str, Any], where: str, environ: Mapping[str, str] | None = None) -> None:
    """credentials.check_auth, and the google and azure types: ValueError (ConfigError for a missing extra)."""
    kind = auth.get("type")
    if kind == "google":
        _check_google(auth, where)
    elif kind == "azure":
        _check_azure(auth, where, os.environ if environ is None else environ)
    else:
        outbound.check_auth(auth, where, environ)


def _check_google(auth: Mapping[str, Any], where: str) -> None:
    given = [k for k in GOOGLE_SOURCES if k in auth and auth[k] is not False]
    if len(given) != 1:
        raise ValueError(f"{where}: auth type 'google' takes exactly one of key_file, adc = true, metadata = true")
    unknown = set(auth) - {"type", "scopes", *GOOGLE_SOURCES}
    if unknown:
        raise ValueError(f"{where}: unknown auth key(s) {sorted(unknown)} for type 'google'")
    if "key_file" in auth:
        try:
            with open(str(auth["key_file"]), encoding="utf-8") as fh:
                info = json.load(fh)
        except (OSError, ValueError):
            raise ValueError(f"{where}: auth.key_file {auth['key_file']!r} is not a readable JSON key file") from None
        if not isinstance(info, dict) or info.get("type") != "service_account" or "private_key" not in info:
            raise ValueError(f"{where}: auth.key_file {auth['key_file']!r} is not a service-account key")
    _google_library(f"{where}: profile google with credentials={given[0]}")


def _check_azure(auth: Mapping[str, Any], where: str, env: Mapping[str, str]) -> None:
    mode = auth.get("mode")
    if mode not in AZURE_KEYS:
        raise ValueError(f"{where}: auth.mode must be one of {', '.join(AZURE_KEYS)} for type 'azure'")
    required, optional = AZURE_KEYS[mode]
    secrets = {"client_secret", "client_secret_file", "client_secret_env"} if "client_secret" in required else set()
    unknown = set(auth) - {"type", "mode"} - required - optional - secrets
    if unknown:
        raise ValueError(f"{where}: unknown auth key(s) {sorted(unknown)} for type 'azure', mode {mode!r}")
    if secrets:  # the secret's three forms (inline, _file, _env), judged by the OAuth2 check of the same key
        given = {k: auth[k] for k in secrets & set(auth)}
        outbound.check_auth({"type": "oauth2", "token_url": "https://-", "client_id": "-", **given}, where, env)
    for key in sorted(required - {"client_secret"}):
        if not auth.get(key):
            raise ValueError(f"{where}: auth.{key} is required for type 'azure', mode {mode!r}")
    if mode == "workload_identity":
        for key, variable in (("tenant_id", "AZURE_TENANT_ID"), ("client_id", "AZURE_CLIENT_ID"),
                              ("federated_token_file", "AZURE_FEDERATED_TOKEN_FILE")):
            if not auth.get(key) and not env.get(variable):
                raise ValueError(f"{where}: workload identity needs auth.{key} or {variable} (set by the AKS "
                                 "workload identity webhook)")
    _azure_library(f"{where}: profile azure with mode={mode}")


def _google_library(what: str) -> Any:
    try:
        import google.auth
        import google.auth.compute_engine
        import google.auth.transport.requests
        import google.oauth2.service_account
    except ImportError:
        raise _needs("google", what) from None
    return google


def _azure_library(what: str) -> Any:
    try:
        import azure.core.pipeline.transport
        import azure.identity
    except ImportError:
        raise _needs("azure", what) from None
    return azure


def http_session(tls: Mapping[str, Any] | None, egress: Egress | None = None) -> Any:
    """The requests Session every cloud credential source sends its HTTP through (the one place): each request
    goes the way `egress` routes its URL (the egress proxy, or straight; a metadata server, at a link-local
    address, always straight), trusting the archive's `tls.ca_file`, else `[egress]
    ca_file`, else the OS store. Proxy variables of the environment are followed only as `egress` says."""
    import requests

    way = egress or Egress()

    class Routed(requests.Session):
        def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            route = None if _link_local(url) else way.route(url)
            kwargs.setdefault("proxies", route.proxies() if route is not None else {})
            return super().request(method, url, *args, **kwargs)

    session = Routed()
    session.trust_env = False
    session.verify = (tls or {}).get("ca_file") or way.ca_file or True
    return session


def _link_local(url: str) -> bool:
    """A link-local address (169.254.169.254: the GCE and Azure metadata servers): never proxied."""
    try:
        address = ipaddress.ip_address(urlsplit(url).hostname or "")
    except ValueError:
        return False
    return address.is_link_local


class CloudToken(Credentials, abc.ABC):
    """A bearer token from a cloud identity library: cached, renewed before expiry by one caller at a time
    (the others wait for it, then reuse it), obtained off the event loop. Subclasses say how (`_obtain`)."""

    source = "cloud"
    timeout = TOKEN_TIMEOUT

    def __init__(self, archive: str) -> None:
        self.archive = archive
        self._token: str | None = None
        self._renew_at = 0.0
        self._expires_at = 0.0
        self._failed: tuple[float, CredentialError] | None = None
        self._lock = asyncio.Lock()
        self._fresh = False  # after a 401: start over (a library's own cache would hand back the same token)
        self.fetched = 0  # tokens obtained (for tests and debugging; never the token itself)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.archive!r}, token=***)"

    async def authorization(self) -> str | None:
        if self._token is None or time.monotonic() >= self._renew_at:
            async with self._lock:
                if self._token is None or time.monotonic() >= self._renew_at:
                    try:
                        await self._renew()
                    except CredentialError:
                        if self._token is None or time.monotonic() >= self._expires_at:
                            raise
                        # renewal failed, but the current token is still valid
        return f"Bearer {self._token}"

    def rejected(self) -> None:
        self._renew_at = self._expires_at = 0.0
        self._fresh = True

    async def _renew(self) -> None:
        if self._failed is not None and time.monotonic() < self._failed[0]:
            raise self._failed[1]
        fresh, self._fresh = self._fresh, False
        try:
            async with asyncio.timeout(self.timeout):  # (the thread may go on; its answer is then dropped)
                token, expires = await asyncio.to_thread(self._obtain, fresh)
        except Exception as exc:  # noqa: BLE001 (whatever the library raises: the archive is not asked)
            reason = f"no answer within {self.timeout:g} s" if isinstance(exc, TimeoutError) else \
                str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            log.warning("archive '%s': the %s credential could not obtain a token (%s: %s)",
                        self.archive, self.source, type(exc).__name__, reason)
            error = CredentialError(f"archive '{self.archive}': the {self.source} credential could not obtain "
                                    f"a token ({type(exc).__name__})")
            self._failed = (time.monotonic() + RETRY_AFTER_FAILURE, error)
            raise error from None
        lifetime = max(expires - time.time(), 1.0)
        self._token = token
        self._expires_at = time.monotonic() + lifetime
        self._renew_at = self._expires_at - min(REFRESH_MARGIN, lifetime / 10)
        self._failed = None
        self.fetched += 1
        log.info("archive '%s': obtained a %s access token valid for %.0f s", self.archive, self.source, lifetime)

    @abc.abstractmethod
    def _obtain(self, fresh: bool) -> tuple[str, float]:
        """(token, expiry as a Unix time), in a worker thread; `fresh`: the last token was refused."""


class GoogleToken(CloudToken):
    """Google OAuth2 access tokens: from a service-account key (a JWT assertion signed with its key, sent to
    the key file's token_uri), Application Default Credentials, or the GCE/GKE metadata server."""

    source = "google"

    def __init__(self, auth: Mapping[str, Any], archive: str, tls: Mapping[str, Any] | None = None,
                 egress: Egress | None = None) -> None:
        super().__init__(archive)
        self._auth = dict(auth)
        self._scopes = list(auth.get("scopes") or [GOOGLE_SCOPE])
        self._which = next(k for k in GOOGLE_SOURCES if k in auth and auth[k] is not False)
        self._google = _google_library(f"archive {archive!r}: profile google with credentials={self._which}")
        self._session = http_session(tls, egress)
        self._credential: Any = None

    def _make(self) -> Any:
        google = self._google
        if self._which == "key_file":
            return google.oauth2.service_account.Credentials.from_service_account_file(
                str(self._auth["key_file"]), scopes=self._scopes)
        if self._which == "adc":
            found, _project = google.auth.default(scopes=self._scopes,
                                                  request=google.auth.transport.requests.Request(self._session))
            return found
        return google.auth.compute_engine.Credentials(scopes=self._scopes)

    def _obtain(self, fresh: bool) -> tuple[str, float]:
        if self._credential is None:
            self._credential = self._make()
        self._credential.refresh(self._google.auth.transport.requests.Request(self._session))
        expiry = self._credential.expiry  # naive UTC (google-auth's convention)
        return str(self._credential.token), expiry.replace(tzinfo=UTC).timestamp()


class AzureToken(CloudToken):
    """Microsoft Entra ID access tokens for the DICOM service (scope AZURE_SCOPE): client secret, workload
    identity (a federated token file, as AKS mounts it) or managed identity (IMDS, App Service)."""

    source = "azure"

    def __init__(self, auth: Mapping[str, Any], archive: str, tls: Mapping[str, Any] | None = None,
                 egress: Egress | None = None) -> None:
        super().__init__(archive)
        self._auth = dict(auth)
        self._egress = egress
        self._scope = str(auth.get("scope") or AZURE_SCOPE)
        self._azure = _azure_library(f"archive {archive!r}: profile azure with mode={auth['mode']}")
        self._tls = tls
        self._secret = _secret(auth, "client_secret") if auth["mode"] == "client_secret" else None
        self._credential: Any = None

    def _transport(self) -> Any:
        """azure-core's transport over http_session (azure-core passes its own `verify`, so it is given too)."""
        session = http_session(self._tls, self._egress)
        return self._azure.core.pipeline.transport.RequestsTransport(
            session=session, session_owner=False, connection_verify=session.verify,
            connection_timeout=TOKEN_TIMEOUT, read_timeout=TOKEN_TIMEOUT)

    def _make(self) -> Any:
        identity, auth = self._azure.identity, self._auth
        common: dict[str, Any] = {"transport": self._transport()}
        if auth["mode"] == "managed_identity":
            return identity.ManagedIdentityCredential(client_id=auth.get("client_id"), **common)
        if "authority_host" in auth:  # a sovereign cloud or Azure Stack: no discovery through the public cloud
            common.update(authority=str(auth["authority_host"]), disable_instance_discovery=True)
        if auth["mode"] == "client_secret":
            return identity.ClientSecretCredential(str(auth["tenant_id"]), str(auth["client_id"]), self._secret,
                                                   **common)
        return identity.WorkloadIdentityCredential(tenant_id=auth.get("tenant_id"), client_id=auth.get("client_id"),
                                                   token_file_path=auth.get("federated_token_file"), **common)

    def _obtain(self, fresh: bool) -> tuple[str, float]:
        if self._credential is None or fresh:
            self._credential = self._make()
        token = self._credential.get_token(self._scope)
        return str(token.token), float(token.expires_on)


def credentials(auth: Mapping[str, Any] | None, archive: str, tls: Mapping[str, Any] | None = None,
                egress: Egress | None = None) -> Credentials:
    """The credential provider an archive's `auth` table describes: the cloud types here, the others
    credentials.credentials."""
    kind = (auth or {}).get("type")
    if auth and kind == "google":
        return GoogleToken(auth, archive, tls, egress)
    if auth and kind == "azure":
        return AzureToken(auth, archive, tls, egress)
    return outbound.credentials(auth, archive, tls, egress)
