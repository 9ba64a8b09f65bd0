"""How the proxy reaches the outside: through which HTTP(S) egress proxy (if any) and trusting which CAs.

One `Egress` per process, from the `[egress]` section (an archive's own `egress` table overrides its proxy).
Every outbound connection asks it: archives (pool.py, which tunnels with CONNECT, tunnel.py), OAuth2 token
endpoints (credentials.py) and JWKS fetches (auth/bearer.py). `client_context` is the one function that
builds an outbound SSLContext.

The proxy ignores HTTPS_PROXY / HTTP_PROXY / NO_PROXY unless `use_environment = true`: an edge proxy in a
hospital network should not start routing patient data through whatever a shell happened to export.
The proxy password is a secret: never logged, printed as *** by check-config.
"""

from __future__ import annotations

import base64
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, unquote, urlsplit

PROXY_KEYS = ("proxy", "proxy_username", "proxy_password", "proxy_password_file", "proxy_password_env")
DIRECT = "direct"  # an archive's `egress.proxy = "direct"`: no egress proxy for it, whatever [egress] says


def client_context(ca_file: str | None = None, system_ca: bool = False, cert_file: str | None = None,
                   key_file: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """The TLS client context of every outbound connection. Trusted: `ca_file` when given (plus the
    operating system's store when `system_ca`), else the operating system's store (OpenSSL's default
    paths: /etc/ssl/certs on Debian). `cert_file`/`key_file`: a client certificate (mutual TLS)."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if ca_file is not None and system_ca:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def read_secret(table: Mapping[str, Any], key: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The secret `key` of a config table: inline, from `KEY_file` or from the variable `KEY_env`."""
    env = os.environ if environ is None else environ
    if table.get(key) is not None:
        return str(table[key])
    if table.get(f"{key}_file") is not None:
        with open(str(table[f"{key}_file"]), encoding="utf-8") as fh:
            return fh.read().strip()
    if table.get(f"{key}_env") is not None:
        return env.get(str(table[f"{key}_env"]), "")
    return None


@dataclass(frozen=True)
class Route:
    """An egress proxy to go through: where it is and the Proxy-Authorization it wants (None: none)."""

    host: str
    port: int
    authorization: str | None = None
    username: str | None = field(default=None, compare=False)
    password: str | None = field(default=None, compare=False)  # a secret: never logged (see __repr__)

    def __repr__(self) -> str:
        return f"Route({self.host!r}, {self.port}, authorization={'***' if self.authorization else None})"

    def proxies(self) -> dict[str, str]:
        """The route as the `proxies` mapping of requests-style clients (google-auth's requests transport,
        azure-core's transports): the proxy URL with its credentials, for http and https alike."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = "" if self.username is None else quote(self.username, safe="") + (
            "" if self.password is None else ":" + quote(self.password, safe="")) + "@"
        return dict.fromkeys(("http", "https"), f"http://{user}{host}:{self.port}")

    @property
    def url(self) -> str:
        """The proxy's URL, without credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def httpx_proxy(self) -> Any:
        """The route as an httpx.Proxy (CONNECT for https URLs, absolute-form for http ones)."""
        import httpx

        headers = {"Proxy-Authorization": self.authorization} if self.authorization else None
        return httpx.Proxy(self.url, headers=headers)


def route_to(proxy_url: str, username: str | None = None, password: str | None = None) -> Route:
    """The Route for an `http://[user[:password]@]host[:port]` proxy URL; explicit credentials win."""
    u = urlsplit(proxy_url if "://" in proxy_url else f"http://{proxy_url}")
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"egress proxy {proxy_url.split('@')[-1]!r} must be an http://host:port URL")
    user = username if username is not None else (unquote(u.username) if u.username else None)
    secret = password if password is not None else (unquote(u.password) if u.password else None)
    authorization = None
    if user is not None:
        pair = f"{user}:{secret or ''}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode()
    return Route(u.hostname, u.port or 3128, authorization, user, secret)


@dataclass(frozen=True)
class Egress:
    """The egress settings of a process (or of one archive, `for_archive`)."""

    proxy: str | None = None  # http://host:port of the egress proxy; None: none (or the environment's)
    proxy_username: str | None = None
    proxy_password: str | None = None  # the secret itself, read from the config, a file or a variable
    use_environment: bool = False  # honour HTTPS_PROXY / HTTP_PROXY / NO_PROXY
    no_proxy: tuple[str, ...] = ()  # hosts (or .domain suffixes) reached directly
    ca_file: str | None = None  # trusted CAs for every outbound TLS connection (an archive's tls.ca_file wins)
    system_ca: bool = False  # trust the operating system's store as well as ca_file
    environ: Mapping[str, str] | None = None  # (tests: the environment to read instead of os.environ)

    def __repr__(self) -> str:
        return (f"Egress(proxy={self.proxy!r}, username={self.proxy_username!r}, password="
                f"{'***' if self.proxy_password else None}, use_environment={self.use_environment})")

    @classmethod
    def from_settings(cls, settings: Any) -> Egress:
        """The `[egress]` section of a Settings object."""
        table = {"proxy_password": settings.egress_proxy_password,
                 "proxy_password_file": settings.egress_proxy_password_file,
                 "proxy_password_env": settings.egress_proxy_password_env}
        return cls(settings.egress_proxy or None, settings.egress_proxy_username, read_secret(table, "proxy_password"),
                   settings.egress_use_environment, tuple(settings.egress_no_proxy), settings.egress_ca_file,
                   settings.egress_system_ca)

    def for_archive(self, table: Mapping[str, Any] | None) -> Egress:
        """These settings with an archive's `egress` table applied (its own proxy, or "direct")."""
        if not table or "proxy" not in table:
            return self
        if table["proxy"] == DIRECT:
            return replace(self, proxy=None, use_environment=False)
        return replace(self, proxy=str(table["proxy"]), proxy_username=table.get("proxy_username"),
                       proxy_password=read_secret(table, "proxy_password"), use_environment=False)

    def route(self, url: str) -> Route | None:
        """The egress proxy to reach `url` through, or None: straight there."""
        u = urlsplit(url)
        host = u.hostname or ""
        if self.proxy is not None:
            if _bypassed(host, self.no_proxy):
                return None
            return route_to(self.proxy, self.proxy_username, self.proxy_password)
        if not self.use_environment:
            return None
        env = os.environ if self.environ is None else self.environ
        found = {k.lower(): v for k, v in env.items() if k.lower() in ("https_proxy", "http_proxy", "no_proxy")}
        proxy = found.get(f"{u.scheme}_proxy")
        if not proxy:
            return None
        no_proxy = tuple(n.strip() for n in found.get("no_proxy", "").split(",") if n.strip())
        if _bypassed(host, self.no_proxy + no_proxy):
            return None
        return route_to(proxy)

    def ssl_context(self, tls: Mapping[str, Any] | None = None) -> ssl.SSLContext:
        """The client context for a TLS connection, with an archive's `tls` table (its ca_file wins)."""
        tls = tls or {}
        return client_context(tls.get("ca_file") or self.ca_file, self.system_ca, tls.get("cert_file"),
                              tls.get("key_file"), bool(tls.get("verify", True)))

    def for_url(self, url: str, tls: Mapping[str, Any] | None = None) -> tuple[Route | None, ssl.SSLContext]:
        """What other code needs to reach `url`: the egress proxy route (or None) and the SSLContext.
        A client library that takes a proxy URL gets `route.proxies()`; one that takes a CA bundle path
        gets `self.ca_file` (None: the OS store)."""
        return self.route(url), self.ssl_context(tls)

    def httpx_client(self, url: str, timeout: float, tls: Mapping[str, Any] | None = None) -> Any:
        """An httpx.AsyncClient that reaches `url` the configured way (never the environment's own way:
        trust_env stays off, and the route is this module's)."""
        import httpx

        route, ctx = self.for_url(url, tls)
        return httpx.AsyncClient(timeout=timeout, trust_env=False, verify=ctx, follow_redirects=False,
                                 proxy=route.httpx_proxy() if route is not None else None)


def _bypassed(host: str, patterns: tuple[str, ...]) -> bool:
    """Whether `host` matches a NO_PROXY-style entry: `*`, a host, or a domain (`.example.org` or
    `example.org`, which also covers its subdomains)."""
    host = host.lower().strip("[]")
    for pattern in patterns:
        p = pattern.lower().strip().lstrip("*")
        if pattern.strip() == "*":
            return True
        if p and (host == p.lstrip(".") or host.endswith(p if p.startswith(".") else f".{p}")):
            return True
    return False


__all__ = ("DIRECT", "PROXY_KEYS", "Egress", "Route", "client_context", "read_secret", "route_to")
