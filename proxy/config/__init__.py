"""Typed settings: a TOML file, then `DICOMWEB_EDGE_*` environment variables, then CLI flags.

```toml
[server]
host = "127.0.0.1"
port = 8080
workers = 1
public_url = "https://imaging.example.org"   # optional
trusted_proxies = ["127.0.0.1", "10.0.0.0/8"] # hops (addresses, CIDRs) whose Forwarded / X-Forwarded-* we believe

[cache]
dir = "/var/cache/dicomweb-edge"

[[archives]]
name = "pacs"
url = "http://127.0.0.1:8042/dicom-web"
profile = "orthanc"
```

The dataclasses below are the schema: each field's annotation is its type, with its bounds and unit
(schema.py), and schema.SECTIONS says in which section of the file it lives. `load` checks a file against
them (document.py: wrong type, unknown key, key in the wrong section, bad choice, out of range, each one
line naming file, section, key, expected and given: messages.py); `validate` then checks what types cannot
say (URLs, files, names). `to_toml` prints the effective configuration, secrets as `***`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.config import document, toml
from proxy.config.document import ENV_PREFIX, Document, FileSchema
from proxy.config.messages import ConfigError, redact
from proxy.config.schema import (
    OPTIONAL,
    PROFILES,
    AtLeastOne,
    ByteRate,
    Bytes,
    Connections,
    EmptySearchStatus,
    Failures,
    Grace,
    HeaderBytes,
    HeaderCount,
    LogFormat,
    LogLevel,
    Optimisation,
    Port,
    PositiveBytes,
    PositiveSeconds,
    Profile,
    RedisTimeout,
    RequestRate,
    Requests,
    Retention,
    Seconds,
    Timeout,
    WarmBytes,
)

__all__ = ("ENV_PREFIX", "OPTIONAL", "PROFILES", "SETTINGS_ENV", "ArchiveConfig", "ConfigError", "Settings",
           "Timeouts", "Trusted", "load", "load_file", "parse_upstream_flag", "redact", "to_toml", "validate")

SETTINGS_ENV = "DICOMWEB_EDGE__SETTINGS_JSON"  # how the CLI hands the settings to worker processes
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(entries: object) -> tuple[Network, ...]:
    """`trusted_proxies` as networks: each entry an address or a CIDR, IPv4 or IPv6. ConfigError for a
    string instead of a list (it would be read letter by letter) or an entry that is neither."""
    if isinstance(entries, str) or not isinstance(entries, list | tuple):
        raise ConfigError(f"trusted_proxies must be a list of addresses or CIDRs, like [\"10.0.0.0/8\", "
                          f"\"::1\"]; got {entries!r}")
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"trusted_proxies: {entry!r} is not an IP address or CIDR") from None
    return tuple(networks)


class Trusted:
    """The hops whose forwarding headers are believed (and who may scrape /metrics), by network:
    `address in trusted` is true when the address lies in one of the configured networks (an IPv4 address
    seen as IPv4-mapped IPv6, `::ffff:10.0.0.1`, counts as itself). Anything that is not an address is not
    trusted. Answers are remembered per address (this runs on every request behind a front)."""

    REMEMBERED = 4096  # addresses remembered; then forgotten all at once

    def __init__(self, entries: list[str]) -> None:
        self.networks = trusted_networks(entries)
        self._seen: dict[str, bool] = {}

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        known = self._seen.get(address)
        if known is None:
            known = self._judge(address)
            if len(self._seen) >= self.REMEMBERED:
                self._seen.clear()
            self._seen[address] = known
        return known

    def _judge(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip().strip("[]").split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in self.networks)


@dataclass
class Timeouts:
    """Per-archive timeouts in seconds: connect, first byte, and idle time between body reads."""

    connect: PositiveSeconds = 5.0
    first_byte: PositiveSeconds = 30.0
    idle_read: PositiveSeconds = 30.0


@dataclass
class ArchiveConfig:
    """One upstream DICOMweb archive."""

    name: str
    url: str
    profile: Profile = "orthanc"
    priority: int = 0
    stores: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_connections: Connections = 64
    url_aliases: list[str] = field(default_factory=list)  # other bases the archive writes into URLs
    search_deadline: PositiveSeconds = 10.0  # a federated search gives up on this archive after this long
    breaker_threshold: Failures = 3  # consecutive failures that open the circuit breaker
    breaker_cooldown: PositiveSeconds = 10.0  # seconds before an open breaker lets a trial request through
    health_interval: Seconds | None = None  # seconds between this archive's health probes (None: the server's)
    keepalive: Seconds | None = None  # seconds an idle connection is kept (None: the profile's; 0: none)
    forward_authorization: bool = False  # token pass-through: send the caller's Authorization to this archive
    auth: dict[str, Any] | None = None  # the proxy's credential towards this archive (outbound.py)
    tls: dict[str, Any] | None = None  # ca_file, cert_file, key_file, verify for an https archive
    google_store: dict[str, str] | None = None  # project, location, dataset, dicom_store: the url when none is given
    egress: dict[str, Any] | None = None  # this archive's own egress proxy (upstream/egress.py)


@dataclass
class Settings:
    """Everything the proxy needs to run."""

    host: str = "127.0.0.1"
    port: Port = 8080
    workers: AtLeastOne = 1
    shutdown_grace: Grace = 30.0  # on SIGTERM, seconds in-flight responses get to finish before they are cut
    public_url: str | None = None
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])  # addresses and CIDRs
    cors_origins: list[str] = field(default_factory=list)  # origins (or "*") whose pages may call the proxy
    tls_cert_file: str | None = None  # serve https with this certificate chain (PEM) ...
    tls_key_file: str | None = None  # ... and this private key
    cache_dir: str | None = None  # the frame cache is on when this is set
    cache_size_bytes: Bytes = 10 * 1024**3  # disk tier bound (least recently used entries go first)
    memory_cache_bytes: Bytes = 256 * 1024**2  # in-process tier bound, per worker
    memory_warm_bytes: WarmBytes = 128 * 1024**2  # heap touched at worker start for the memory tier (heap.py; 0: off)
    metadata_cache_ttl: Seconds = 30.0  # cached study/series/instance metadata lives this long (0: never cached)
    stale_if_error: Retention = 86400.0  # expired metadata is kept this long, served (stale) while the archive fails
    prefetch: bool = True  # series metadata requests fetch the series into the cache in the background
    prefetch_concurrency: AtLeastOne = 2  # series prefetched at once, per worker
    prefetch_ttl: Seconds = 600.0  # a series is not prefetched again within this many seconds
    max_json_bytes: PositiveBytes = 256 * 1024 * 1024
    max_stow_bytes: PositiveBytes = 4 * 1024 * 1024 * 1024
    client_request_rate: RequestRate = 0.0  # requests per second per client address (0: unlimited); over it: 429
    client_request_burst: Requests = 200  # requests a client may make at once before the rate applies
    client_byte_rate: ByteRate = 0.0  # response bytes per second per client address (0: unlimited)
    client_byte_burst: PositiveBytes = 1024**3  # bytes a client may receive at once before the byte rate applies
    max_header_bytes: HeaderBytes = 32 * 1024  # request line plus headers; larger gets 431
    max_header_count: HeaderCount = 100  # request headers; more gets 431
    header_timeout: Timeout = 10.0  # a request's headers must arrive within this many seconds (else 408)
    keepalive_timeout: Timeout = 5.0  # an idle client connection is closed after this many seconds
    send_timeout: Timeout = 60.0  # a client that reads nothing of its response for this long is cut off
    queue_timeout: Timeout = 10.0  # a request waits this long for a free connection to its archive, then 503
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"  # json: one JSON object per line; text: human-readable lines
    log_patient_data: bool = False  # debug only: access logs then carry the path and query (UIDs, names)
    health_interval: Seconds = 5.0  # seconds between health probes of each archive (0: none)
    locator_ttl: Seconds = 3600.0  # how long the proxy trusts what it learned about where a study is
    search_cache_ttl: Seconds = 30.0  # how long a merged federated search result is reused for paging
    max_search_results: AtLeastOne = 10000  # per archive, for one federated search
    # A search with no match: 200 with `[]` (what Orthanc answers, and what clients built on it expect:
    # docs/archive-behaviour.md), or 204 No Content (PS3.18's other answer).
    empty_search_status: EmptySearchStatus = 200
    # Signs the bulk data tokens the proxy mints (URIs it cannot express as study paths): a secret. Generated
    # at start when absent (then shared by the workers of one `serve`); replicas behind one name need one key.
    bulk_token_key: str | None = None
    redis_url: str | None = None  # the shared tier (study locations, search answers) is on when set
    redis_key_prefix: str = "dicomweb-edge:"  # every Redis key and channel starts with this
    redis_timeout: RedisTimeout = 0.25  # seconds a Redis call may take before the proxy goes on without it
    viewer_dir: str | None = None  # a built OHIF dist/ served at / (the viewer is off when unset)
    disable: list[Optimisation] = field(default_factory=list)  # optimisations switched off (OPTIONAL)
    # [egress]: how the proxy reaches archives, token endpoints and JWKS (upstream/egress.py).
    egress_proxy: str | None = None  # http://host:port of an egress proxy (CONNECT for https)
    egress_proxy_username: str | None = None
    egress_proxy_password: str | None = None  # a secret; or egress_proxy_password_file / _env
    egress_proxy_password_file: str | None = None
    egress_proxy_password_env: str | None = None
    egress_use_environment: bool = False  # honour HTTPS_PROXY / HTTP_PROXY / NO_PROXY (off: ignored)
    egress_no_proxy: list[str] = field(default_factory=list)  # hosts and .domains reached directly
    egress_ca_file: str | None = None  # CAs trusted for every outbound TLS connection
    egress_system_ca: bool = False  # trust the operating system's store as well as the ca_file(s)
    auth: dict[str, Any] = field(default_factory=dict)  # the [auth] table: inbound authentication (auth.py)
    archives: list[ArchiveConfig] = field(default_factory=list)

    @functools.cached_property
    def trusted(self) -> Trusted:
        """`trusted_proxies` by network: `address in settings.trusted`."""
        return Trusted(self.trusted_proxies)

    def to_json(self) -> str:
        """Serialise, for handing the settings to worker processes."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        """The inverse of `to_json`."""
        settings = _settings(json.loads(text))
        validate(settings)
        return settings


@functools.cache
def _schema() -> FileSchema:
    return FileSchema(Settings, ArchiveConfig, Timeouts)


def _document(config_file: str | Path | None) -> Document:
    if config_file is None:
        return Document("settings")
    return Document(str(config_file), document.read_file(config_file))


def _settings(raw: dict[str, Any]) -> Settings:
    archives = [ArchiveConfig(**{**a, "timeouts": Timeouts(**a["timeouts"])}) for a in raw.pop("archives")]
    return Settings(**raw, archives=archives)


def load_file(path: str | Path) -> dict[str, Any]:
    """A config file alone (no environment, no flags), checked, as the keyword arguments of `Settings`."""
    return document.check(_document(path), _schema())


def parse_upstream_flag(text: str) -> dict[str, Any]:
    """`NAME=URL` from `--upstream` into an archive table."""
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise ConfigError(f"--upstream {text!r}: expected NAME=URL")
    return {"name": name, "url": url}


def load(config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> Settings:
    """Merge file < environment < overrides (CLI flags, by attribute name; None: not given), check and
    validate. ConfigError names the file (or variable, or flag), section and key of the first problem."""
    doc = _document(config_file)
    document.from_environment(doc, _schema(), os.environ if environ is None else environ, parse_upstream_flag)
    document.from_flags(doc, _schema(), overrides or {})
    settings = _settings(document.check(doc, _schema()))
    try:
        validate(settings)
    except ConfigError as exc:
        raise ConfigError(f"{doc.source}: {exc}") from None
    return settings


def to_toml(settings: Settings) -> str:
    """The effective configuration as the TOML file that gives it (`check-config`), each secret as `***`;
    units and unset keys as comments."""
    values, comments = document.document_of(settings)
    if not values["auth"]:
        del values["auth"]  # (its defaults are auth.inbound's)
    return toml.dumps(values, comments)


def validate(s: Settings) -> None:
    """Raise ConfigError for the first problem the types cannot show (a URL's shape, a file that is not
    there, two archives of one name); the types and bounds are the schema's (`load` checks them)."""
    trusted_networks(s.trusted_proxies)
    if s.public_url is not None:
        u = urlsplit(s.public_url)
        if u.scheme not in ("http", "https") or not u.netloc or u.query or u.fragment:
            raise ConfigError(f"public_url {s.public_url!r} must be an absolute http(s) URL with no query")
        s.public_url = s.public_url.rstrip("/")
    for origin in s.cors_origins:
        u = urlsplit(origin)
        if origin != "*" and (u.scheme not in ("http", "https") or not u.netloc or u.path or u.query or u.fragment):
            raise ConfigError(f"cors_origins: {origin!r} must be '*' or an origin like https://viewer.example.org")
    if (s.tls_cert_file is None) != (s.tls_key_file is None):
        raise ConfigError("tls_cert_file and tls_key_file go together")
    for key in ("tls_cert_file", "tls_key_file"):
        path = getattr(s, key)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"{key} {path!r} is not a readable file")
    if s.viewer_dir is not None and not (Path(s.viewer_dir).expanduser() / "index.html").is_file():
        raise ConfigError(f"viewer dir {s.viewer_dir!r} has no index.html: expected a built OHIF dist/ "
                          "(./scripts/fetch-ohif.sh fetches one)")
    if s.redis_url == "":
        s.redis_url = None  # DICOMWEB_EDGE_REDIS_URL= (empty) means no shared tier, as unset does
    if s.redis_url is not None:
        _validate_redis(s)
    _validate_egress({k.removeprefix("egress_"): v for k, v in vars(s).items() if k.startswith("egress_")}, "[egress]")
    if s.egress_ca_file is not None and not os.access(s.egress_ca_file, os.R_OK):
        raise ConfigError(f"[egress] ca_file {s.egress_ca_file!r} is not a readable file")
    _validate_archives(s.archives)


def _validate_archives(archives: list[ArchiveConfig]) -> None:
    if not archives:
        raise ConfigError("no archives configured: add [[archives]] to the config or pass --upstream NAME=URL")
    seen: set[str] = set()
    for a in archives:
        if not _NAME.match(a.name):
            raise ConfigError(f"archive name {a.name!r}: use letters, digits, '.', '_' or '-'")
        if a.name in seen:
            raise ConfigError(f"archive name {a.name!r} is used twice")
        seen.add(a.name)
        u = urlsplit(a.url)
        if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
            raise ConfigError(f"archive {a.name!r}: url {a.url!r} must be an absolute http(s) base URL")
        a.url = a.url.rstrip("/")
        if a.egress is not None and a.egress.get("proxy") != "direct":
            _validate_egress(a.egress, f"archive {a.name!r}: egress")


def _validate_egress(table: Mapping[str, Any], where: str) -> None:
    """An egress proxy URL (http://host:port) and at most one way of giving its password."""
    if table.get("proxy"):
        u = urlsplit(str(table["proxy"]))
        if u.scheme != "http" or not u.hostname or u.path not in ("", "/") or u.query or u.fragment:
            raise ConfigError(f"{where} proxy {redact(str(table['proxy']))!r} must be an http://host:port URL")
    given = [k for k in ("proxy_password", "proxy_password_file", "proxy_password_env") if table.get(k) is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}: give at most one of proxy_password, proxy_password_file, proxy_password_env")
    if table.get("proxy_password_file") is not None and not os.access(str(table["proxy_password_file"]), os.R_OK):
        raise ConfigError(f"{where} proxy_password_file {table['proxy_password_file']!r} is not a readable file")
    if table.get("proxy_password_env") is not None and not os.environ.get(str(table["proxy_password_env"])):
        raise ConfigError(f"{where} proxy_password_env names {table['proxy_password_env']!r}, which is not set")


def _validate_redis(s: Settings) -> None:
    u = urlsplit(s.redis_url or "")
    if u.scheme not in ("redis", "rediss", "unix") or not (u.hostname or u.path):
        raise ConfigError(f"redis_url {redact(s.redis_url or '')!r} must be a redis://, rediss:// or unix:// URL")
    if importlib.util.find_spec("redis") is None:
        raise ConfigError("redis_url is set but the redis client is not installed: pip install 'dicomweb-edge[redis]'")
    if not re.match(r"^[!-~]{1,100}$", s.redis_key_prefix):
        raise ConfigError("redis_key_prefix must be 1 to 100 printable characters without spaces")
