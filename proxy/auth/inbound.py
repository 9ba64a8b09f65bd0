"""Inbound authentication and scopes: who may read (QIDO/WADO), write (STOW) and administer (cache, metrics).

Modes (`[auth] mode`): `none` (refused unless the proxy listens on loopback only, or the operator says
an authenticating front does the job), `api_key` (keys stored as SHA-256 digests, each with its scopes)
and `jwt` (OAuth2/OIDC bearer tokens, see jwtauth.py). The middleware runs before routing: /healthz and
/readyz stay open for probes, a static viewer at / stays open, everything under /dicomweb and /upstreams
needs `read` (`write` for POST), /admin needs `admin`, and /metrics is open to trusted addresses or needs
`admin` (setting `metrics`). Credentials are never logged: the access record only says why one failed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.auth.bearer import ALGORITHMS, JwksCache, JwtVerifier, TokenError, scopes_of
from proxy.errors import error_response
from proxy.observability import logs, metrics
from proxy.upstream.archive import CALLER_AUTHORIZATION
from proxy.upstream.credentials import is_loopback
from proxy.upstream.egress import Egress

MODES = ("none", "api_key", "jwt")
SCOPES = ("read", "write", "admin")
METRICS_ACCESS = ("trusted", "open", "admin")
REALM = 'realm="dicomweb-edge"'
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_PROTECTED = ("/dicomweb", "/upstreams", "/admin")


@dataclass
class AuthConfig:
    """The `[auth]` table, validated (see deploy/config.example.toml for every key)."""

    mode: str = "none"
    allow_none_on_network: bool = False
    api_keys: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)  # digest → (name, scopes)
    api_keys_file: str | None = None
    issuer: str | None = None
    audience: list[str] = field(default_factory=list)
    algorithms: list[str] = field(default_factory=lambda: list(ALGORITHMS))
    jwks_file: str | None = None
    jwks_url: str | None = None
    jwks_cache_ttl: float = 300.0
    jwks_refetch_interval: float = 30.0
    egress: Egress = field(default_factory=Egress)  # how the JWKS URL is reached ([egress]: proxy, CAs)
    leeway: float = 30.0
    scope_claim: str = "scope"
    scope_names: dict[str, str] = field(default_factory=lambda: {s: f"dicomweb.{s}" for s in SCOPES})
    metrics: str = "trusted"
    access_ttl: float = 60.0


KEYS = {"mode", "allow_none_on_network", "api_keys", "api_keys_file", "issuer", "audience", "algorithms",
        "jwks_file", "jwks_url", "jwks_cache_ttl", "jwks_refetch_interval", "leeway", "scope_claim",
        "read_scope", "write_scope", "admin_scope", "metrics", "access_ttl"}


def _scopes(value: Any, where: str) -> frozenset[str]:
    scopes = [value] if isinstance(value, str) else value
    if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
        raise ValueError(f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)}")
    return frozenset(scopes)


def _key_entry(digest: Any, scopes: Any, name: Any, where: str) -> tuple[str, tuple[str, frozenset[str]]]:
    if not isinstance(digest, str) or not _DIGEST.match(digest.lower()):
        raise ValueError(f"{where}: sha256 must be the 64-hex-digit SHA-256 digest of the key, not the key")
    return digest.lower(), (str(name or "key"), _scopes(scopes, where))


def read_keys_file(path: str) -> dict[str, tuple[str, frozenset[str]]]:
    """API keys from a file: one per line, `<sha256 hex> <scope>[,<scope>...] [name]`; `#` starts a comment."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"auth.api_keys_file {path!r}: cannot read it ({type(exc).__name__})") from None
    keys = {}
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(f"auth.api_keys_file line {n}: expected '<sha256> <scopes> [name]'")
        digest, entry = _key_entry(fields[0], fields[1].split(","), " ".join(fields[2:]), f"api_keys_file line {n}")
        keys[digest] = entry
    return keys


def _number(table: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    try:
        value = float(table.get(key, default))
    except (TypeError, ValueError):
        raise ValueError(f"auth.{key} must be a number") from None
    if not low <= value <= high:
        raise ValueError(f"auth.{key} {value:g} must be between {low:g} and {high:g}")
    return value


def parse(table: Mapping[str, Any], host: str, forwarding: bool = False) -> AuthConfig:
    """Validate the `[auth]` table for a proxy bound to `host`; ValueError says what is wrong."""
    if not isinstance(table, Mapping):
        raise ValueError("[auth] must be a table")
    unknown = set(table) - KEYS
    if unknown:
        raise ValueError(f"[auth]: unknown key(s) {sorted(unknown)}")
    c = AuthConfig(mode=str(table.get("mode", "none")))
    if c.mode not in MODES:
        raise ValueError(f"auth.mode {c.mode!r} must be one of {', '.join(MODES)}")
    flag = table.get("allow_none_on_network", False)
    c.allow_none_on_network = flag is True or str(flag).lower() in ("1", "true", "yes", "on")
    if c.mode == "none" and not is_loopback(host) and not c.allow_none_on_network:
        raise ValueError(f"auth.mode 'none' while listening on {host}: anyone who reaches the port reads every "
                         "study. Configure api_key or jwt, listen on 127.0.0.1, or set auth.allow_none_on_network "
                         "= true when an authenticating front (or a private network) does the job")
    c.metrics = str(table.get("metrics", "trusted"))
    if c.metrics not in METRICS_ACCESS:
        raise ValueError(f"auth.metrics {c.metrics!r} must be one of {', '.join(METRICS_ACCESS)}")
    c.access_ttl = _number(table, "access_ttl", 60.0, 0, 3600)
    for scope in SCOPES:
        name = table.get(f"{scope}_scope", c.scope_names[scope])
        if not isinstance(name, str) or not name or " " in name:
            raise ValueError(f"auth.{scope}_scope must be one scope name without spaces")
        c.scope_names[scope] = name
    if c.mode == "api_key":
        if forwarding:
            raise ValueError("forward_authorization needs auth.mode 'jwt' or 'none': in api_key mode the "
                             "archive would receive the proxy's own API keys")
        for i, item in enumerate(table.get("api_keys", [])):
            if not isinstance(item, Mapping) or set(item) - {"name", "sha256", "scopes"}:
                raise ValueError(f"auth.api_keys[{i}]: expected {{ name, sha256, scopes }}")
            digest, entry = _key_entry(item.get("sha256"), item.get("scopes"), item.get("name"), f"api_keys[{i}]")
            c.api_keys[digest] = entry
        if table.get("api_keys_file"):
            c.api_keys_file = str(table["api_keys_file"])
            c.api_keys.update(read_keys_file(c.api_keys_file))
        if not c.api_keys:
            raise ValueError("auth.mode 'api_key' needs api_keys or an api_keys_file with at least one key")
    if c.mode == "jwt":
        _parse_jwt(table, c)
    return c


def _parse_jwt(table: Mapping[str, Any], c: AuthConfig) -> None:
    c.issuer = table.get("issuer")
    audience = table.get("audience")
    c.audience = [audience] if isinstance(audience, str) else list(audience or [])
    if not isinstance(c.issuer, str) or not c.issuer or not c.audience or not all(
            isinstance(a, str) and a for a in c.audience):
        raise ValueError("auth.mode 'jwt' needs issuer and audience (tokens for other issuers or audiences are "
                         "refused)")
    algorithms = table.get("algorithms", list(ALGORITHMS))
    algorithms = [algorithms] if isinstance(algorithms, str) else algorithms
    if not isinstance(algorithms, list) or not algorithms or any(a not in ALGORITHMS for a in algorithms):
        raise ValueError(f"auth.algorithms {algorithms!r}: only {', '.join(ALGORITHMS)} are accepted (never none "
                         "or HS*: with a public key as HMAC secret anyone could mint tokens)")
    c.algorithms = list(algorithms)
    c.jwks_file, c.jwks_url = table.get("jwks_file"), table.get("jwks_url")
    if (c.jwks_file is None) == (c.jwks_url is None):
        raise ValueError("auth.mode 'jwt' needs exactly one of jwks_file and jwks_url")
    if c.jwks_url is not None and not str(c.jwks_url).startswith(("https://", "http://")):
        raise ValueError("auth.jwks_url must be an http(s) URL (https unless the identity provider is local)")
    if c.jwks_file is not None and not Path(str(c.jwks_file)).is_file():
        raise ValueError(f"auth.jwks_file {c.jwks_file!r} is not a file")
    c.jwks_cache_ttl = _number(table, "jwks_cache_ttl", 300.0, 1, 86400)
    # At least 1 s: tokens with made-up key ids must not re-read the JWKS on every request.
    c.jwks_refetch_interval = _number(table, "jwks_refetch_interval", 30.0, 1, 3600)
    c.leeway = _number(table, "leeway", 30.0, 0, 600)
    c.scope_claim = str(table.get("scope_claim", "scope"))


def key_digest(key: str) -> str:
    """The SHA-256 hex digest of an API key (what the configuration stores)."""
    return hashlib.sha256(key.encode()).hexdigest()


class Denied(Exception):
    """Authentication or authorization failed: `status` 401 or 403, `error` the RFC 6750 code."""

    def __init__(self, status: int, error: str | None, reason: str, metric: str) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason, self.metric = status, error, reason, metric


class Authenticator:
    """Turns the credentials of a request into the set of proxy scopes it holds."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.verifier: JwtVerifier | None = None
        if config.mode == "jwt":
            source = str(config.jwks_url or config.jwks_file)
            jwks = JwksCache(source, config.jwks_cache_ttl, config.jwks_refetch_interval, egress=config.egress)
            self.verifier = JwtVerifier(jwks, config.issuer or "", config.audience, config.algorithms, config.leeway)

    async def scopes(self, authorization: str | None, api_key: str | None) -> set[str]:
        """The proxy scopes (read, write, admin) of the caller; Denied(401) without valid credentials."""
        scheme, _, credential = (authorization or "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            credential = ""
        if self.config.mode == "api_key":
            credential = credential or (api_key or "").strip()
            if not credential:
                raise Denied(401, None, "authentication required", "missing")
            entry = self.config.api_keys.get(key_digest(credential))
            if entry is None:
                raise Denied(401, "invalid_token", "unknown API key", "invalid")
            logs.annotate("principal", entry[0])  # the key's configured name, never the key
            return set(entry[1])
        assert self.verifier is not None
        if not credential:
            raise Denied(401, None, "authentication required", "missing")
        try:
            claims = await self.verifier.verify(credential)
        except TokenError as exc:
            raise Denied(401, "invalid_token", str(exc), "expired" if "expired" in str(exc) else "invalid") from None
        granted = scopes_of(claims, self.config.scope_claim)
        return {s for s in SCOPES if self.config.scope_names[s] in granted}


def required_scope(method: str, path: str, client: str | None, config: AuthConfig, trusted: Container[str],
                   viewer: bool, relayed: bool = False) -> str | None:
    """The proxy scope a request needs, or None when it is open (probes, viewer files).

    /metrics with `metrics = "trusted"` is open to a trusted address asking directly (a scraper), not to a
    request a front relayed from elsewhere (it carries Forwarded / X-Forwarded-For).
    """
    if path in ("/healthz", "/readyz"):
        return None
    if path == "/metrics":
        if config.metrics == "open" or (config.metrics == "trusted" and client in trusted and not relayed):
            return None
        return "admin"
    if path.startswith("/admin"):
        return "admin"
    if path.startswith(_PROTECTED[:2]):
        return "write" if method == "POST" else "read"
    return None if viewer else "read"  # deny by default; a viewer's static files are open


class AuthMiddleware:
    """Authenticate before routing; hand the caller's Authorization to pass-through archives."""

    def __init__(self, app: ASGIApp, config: AuthConfig, trusted: Container[str], viewer: bool,
                 forwarding: bool) -> None:
        self.app = app
        self.config = config
        self.trusted = trusted
        self.viewer = viewer
        self.forwarding = forwarding
        self.authenticator = Authenticator(config) if config.mode != "none" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorization = api_key = origin = preflight = None
        relayed = False
        for k, v in scope["headers"]:
            if k == b"authorization":
                authorization = v.decode("latin-1")
            elif k == b"x-api-key":
                api_key = v.decode("latin-1")
            elif k == b"origin":
                origin = v
            elif k == b"access-control-request-method":
                preflight = v
            elif k in (b"forwarded", b"x-forwarded-for"):
                relayed = True
        token = CALLER_AUTHORIZATION.set(authorization if self.forwarding else None)
        try:
            if self.authenticator is not None and not (scope["method"] == "OPTIONS" and origin and preflight):
                client = scope.get("client")
                need = required_scope(scope["method"], scope["path"], client[0] if client else None, self.config,
                                      self.trusted, self.viewer, relayed)
                if need is not None:
                    try:
                        granted = await self.authenticator.scopes(authorization, api_key)
                        if need not in granted:
                            raise Denied(403, "insufficient_scope", f"this needs the {need} scope", "scope")
                    except Denied as exc:
                        await self._deny(exc, need, scope, receive, send)
                        return
            await self.app(scope, receive, send)
        finally:
            CALLER_AUTHORIZATION.reset(token)

    async def _deny(self, exc: Denied, need: str, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.child(metrics.AUTH_FAILURES, exc.metric).inc()
        logs.annotate("auth", exc.metric)
        challenge = f"Bearer {REALM}"
        if exc.error:
            challenge += f', error="{exc.error}", error_description="{exc.reason}"'
        if exc.status == 403:
            challenge += f', scope="{self.config.scope_names[need]}"'
        await error_response(exc.status, exc.reason, {"WWW-Authenticate": challenge})(scope, receive, send)
