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
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

PROFILES = ("orthanc", "dcm4chee", "google", "azure", "generic")
ENV_PREFIX = "DICOMWEB_EDGE_"
SETTINGS_ENV = "DICOMWEB_EDGE__SETTINGS_JSON"  # how the CLI hands the settings to worker processes
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


# Optimisations an operator may switch off (`[server] disable = [...]`, `DICOMWEB_EDGE_DISABLE=a,b`); each
# is kept only while a benchmark a user would notice shows it pays (benchmarks/RESULTS.md, "Mechanisms").
OPTIONAL = ("hit_lane", "splice", "handover", "claims", "server_protocol")

LIMIT_KEYS = ("client_request_rate", "client_byte_rate", "client_request_burst", "client_byte_burst",
              "max_header_bytes", "max_header_count", "header_timeout", "keepalive_timeout", "send_timeout",
              "queue_timeout")


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


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

    connect: float = 5.0
    first_byte: float = 30.0
    idle_read: float = 30.0


@dataclass
class ArchiveConfig:
    """One upstream DICOMweb archive."""

    name: str
    url: str
    profile: str = "orthanc"
    priority: int = 0
    stores: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_connections: int = 64
    url_aliases: list[str] = field(default_factory=list)  # other bases the archive writes into URLs
    search_deadline: float = 10.0  # a federated search gives up on this archive after this long
    breaker_threshold: int = 3  # consecutive failures that open the circuit breaker
    breaker_cooldown: float = 10.0  # seconds before an open breaker lets a trial request through
    forward_authorization: bool = False  # token pass-through: send the caller's Authorization to this archive
    auth: dict[str, Any] | None = None  # the proxy's credential towards this archive (outbound.py)
    tls: dict[str, Any] | None = None  # ca_file, cert_file, key_file, verify for an https archive


@dataclass
class Settings:
    """Everything the proxy needs to run."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    shutdown_grace: float = 30.0  # on SIGTERM, seconds in-flight responses get to finish before they are cut
    public_url: str | None = None
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])  # addresses and CIDRs
    cors_origins: list[str] = field(default_factory=list)  # origins (or "*") whose pages may call the proxy
    tls_cert_file: str | None = None  # serve https with this certificate chain (PEM) ...
    tls_key_file: str | None = None  # ... and this private key
    cache_dir: str | None = None  # the frame cache is on when this is set
    cache_size_bytes: int = 10 * 1024**3  # disk tier bound (least recently used entries go first)
    memory_cache_bytes: int = 256 * 1024**2  # in-process tier bound, per worker
    memory_warm_bytes: int = 128 * 1024**2  # heap touched at worker start for the memory tier (heap.py; 0: off)
    metadata_cache_ttl: float = 30.0  # cached study/series/instance metadata lives this long (0: never cached)
    stale_if_error: float = 86400.0  # expired metadata is kept this long, served (stale) while the archive fails
    prefetch: bool = True  # series metadata requests fetch the series into the cache in the background
    prefetch_concurrency: int = 2  # series prefetched at once, per worker
    prefetch_ttl: float = 600.0  # a series is not prefetched again within this many seconds
    max_json_bytes: int = 256 * 1024 * 1024
    max_stow_bytes: int = 4 * 1024 * 1024 * 1024
    client_request_rate: float = 0.0  # requests per second per client address (0: unlimited); over it: 429
    client_request_burst: int = 200  # requests a client may make at once before the rate applies
    client_byte_rate: float = 0.0  # response bytes per second per client address (0: unlimited)
    client_byte_burst: int = 1024**3  # bytes a client may receive at once before the byte rate applies
    max_header_bytes: int = 32 * 1024  # request line plus headers; larger gets 431
    max_header_count: int = 100  # request headers; more gets 431
    header_timeout: float = 10.0  # a request's headers must arrive within this many seconds (else 408)
    keepalive_timeout: float = 5.0  # an idle client connection is closed after this many seconds
    send_timeout: float = 60.0  # a client that reads nothing of its response for this long is cut off
    queue_timeout: float = 10.0  # a request waits this long for a free connection to its archive, then 503
    log_level: str = "info"
    log_format: str = "json"  # json: one JSON object per line; text: human-readable lines
    log_patient_data: bool = False  # debug only: access logs then carry the path and query (UIDs, names)
    health_interval: float = 5.0  # seconds between health probes of each archive (0: none)
    locator_ttl: float = 3600.0  # how long the proxy trusts what it learned about where a study is
    search_cache_ttl: float = 30.0  # how long a merged federated search result is reused for paging
    max_search_results: int = 10000  # per archive, for one federated search
    # A search with no match: 200 with `[]` (what Orthanc answers, and what clients built on it expect:
    # docs/archive-behaviour.md), or 204 No Content (PS3.18's other answer).
    empty_search_status: int = 200
    # Signs the bulk data tokens the proxy mints (URIs it cannot express as study paths): a secret. Generated
    # at start when absent (then shared by the workers of one `serve`); replicas behind one name need one key.
    bulk_token_key: str | None = None
    redis_url: str | None = None  # the shared tier (study locations, search answers) is on when set
    redis_key_prefix: str = "dicomweb-edge:"  # every Redis key and channel starts with this
    redis_timeout: float = 0.25  # seconds a Redis call may take before the proxy goes on without it
    viewer_dir: str | None = None  # a built OHIF dist/ served at / (the viewer is off when unset)
    disable: list[str] = field(default_factory=list)  # optimisations switched off (OPTIONAL)
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
        return _build(json.loads(text), source="serialised settings")


def _archive(raw: Mapping[str, Any], where: str) -> ArchiveConfig:
    unknown = set(raw) - {f.name for f in dataclasses.fields(ArchiveConfig)}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    if "name" not in raw or "url" not in raw:
        raise ConfigError(f"{where}: 'name' and 'url' are required")
    t = raw.get("timeouts", {})
    if not isinstance(t, Mapping) or set(t) - {"connect", "first_byte", "idle_read"}:
        raise ConfigError(f"{where}.timeouts: only connect, first_byte and idle_read are allowed")
    try:
        timeouts = Timeouts(**{k: float(v) for k, v in t.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}.timeouts: {exc}") from None
    fields = {k: v for k, v in raw.items() if k != "timeouts"}
    return ArchiveConfig(timeouts=timeouts, **fields)


def _build(raw: Mapping[str, Any], source: str) -> Settings:
    raw = dict(raw)
    archives = [_archive(a, f"{source}: archives[{i}]") for i, a in enumerate(raw.pop("archives", []))]
    unknown = set(raw) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)}")
    settings = Settings(archives=archives, **raw)
    validate(settings)
    return settings


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into the flat shape `Settings` takes."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for section, keys in (("server", None), ("cache", {"dir": "cache_dir", "size_bytes": "cache_size_bytes",
                                                         "memory_bytes": "memory_cache_bytes",
                                                         "warm_bytes": "memory_warm_bytes"}), ("limits", None),
                          ("federation", None), ("shared", None), ("viewer", {"dir": "viewer_dir"})):
        table = doc.pop(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        entries: dict[str, Any] = table  # a TOML table: its keys are strings
        for k, v in entries.items():
            flat[(keys or {}).get(k, k)] = v
    flat["archives"] = doc.pop("archives", [])
    if "auth" in doc:
        flat["auth"] = doc.pop("auth")
    if doc:
        raise ConfigError(f"{path}: unknown section(s) {sorted(doc)}")
    return flat


def parse_upstream_flag(text: str) -> dict[str, Any]:
    """`NAME=URL` from `--upstream` into an archive table."""
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise ConfigError(f"--upstream {text!r}: expected NAME=URL")
    return {"name": name, "url": url}


def _env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ints = {"port", "workers", "max_json_bytes", "max_stow_bytes", "max_search_results", "empty_search_status",
            "cache_size_bytes",
            "memory_cache_bytes", "memory_warm_bytes", "prefetch_concurrency", "client_request_burst",
            "client_byte_burst",
            "max_header_bytes", "max_header_count"}
    floats = {"shutdown_grace", "health_interval", "locator_ttl", "search_cache_ttl", "prefetch_ttl",
              "metadata_cache_ttl", "stale_if_error", "client_request_rate", "client_byte_rate", "header_timeout",
              "keepalive_timeout", "send_timeout", "queue_timeout"}
    for f in dataclasses.fields(Settings):
        value = environ.get(ENV_PREFIX + f.name.upper())
        if value is None or f.name in ("archives", "auth"):
            continue
        if f.name in ints:
            try:
                out[f.name] = int(value)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}: not a whole number: {value!r}") from None
        elif f.name in floats:
            try:
                out[f.name] = float(value)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}: not a number: {value!r}") from None
        elif f.name in ("prefetch", "log_patient_data"):
            out[f.name] = value.strip().lower() in ("1", "true", "yes", "on")
        elif f.name == "redis_timeout":
            try:
                out[f.name] = float(value)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}: not a number: {value!r}") from None
        elif f.name in ("trusted_proxies", "cors_origins", "disable"):
            out[f.name] = [v.strip() for v in value.split(",") if v.strip()]
        else:
            out[f.name] = value
    auth = {key: value for key in ("mode", "issuer", "audience", "jwks_url", "jwks_file", "api_keys_file", "metrics",
                                   "allow_none_on_network")
            if (value := environ.get(f"{ENV_PREFIX}AUTH_{key.upper()}"))}
    if auth:
        out["auth_env"] = auth
    ups = environ.get(ENV_PREFIX + "UPSTREAMS")
    if ups:
        out["archives"] = [parse_upstream_flag(u.strip()) for u in ups.split(",") if u.strip()]
    return out


def load(config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> Settings:
    """Merge file < environment < overrides (CLI flags) and validate."""
    raw: dict[str, Any] = load_file(config_file) if config_file else {}
    env = _env(os.environ if environ is None else environ)
    if "auth_env" in env:  # DICOMWEB_EDGE_AUTH_* override single keys of the [auth] table
        raw["auth"] = {**raw.get("auth", {}), **env.pop("auth_env")}
    raw.update(env)
    for k, v in (overrides or {}).items():
        if v is not None:
            raw[k] = v
    return _build(raw, source=str(config_file or "settings"))


def validate(s: Settings) -> None:
    """Raise ConfigError with a clear message for the first problem found."""
    if not 0 < s.port < 65536:
        raise ConfigError(f"port {s.port} is out of range")
    if s.workers < 1:
        raise ConfigError("workers must be at least 1")
    if not 0 <= s.shutdown_grace <= 3600:
        raise ConfigError(f"shutdown_grace {s.shutdown_grace} must be between 0 and 3600 seconds")
    trusted_networks(s.trusted_proxies)
    if s.empty_search_status not in (200, 204):
        raise ConfigError(f"empty_search_status {s.empty_search_status!r} must be 200 (an empty array) or 204")
    if s.log_format not in ("json", "text"):
        raise ConfigError(f"log_format {s.log_format!r} must be 'json' or 'text'")
    if s.public_url is not None:
        u = urlsplit(s.public_url)
        if u.scheme not in ("http", "https") or not u.netloc or u.query or u.fragment:
            raise ConfigError(f"public_url {s.public_url!r} must be an absolute http(s) URL with no query")
        s.public_url = s.public_url.rstrip("/")
    for origin in s.cors_origins:
        u = urlsplit(origin)
        if origin != "*" and (u.scheme not in ("http", "https") or not u.netloc or u.path or u.query or u.fragment):
            raise ConfigError(f"cors_origins: {origin!r} must be '*' or an origin like https://viewer.example.org")
    _validate_limits(s)
    if unknown := sorted(set(s.disable) - set(OPTIONAL)):
        raise ConfigError(f"disable: {unknown} not among {', '.join(OPTIONAL)}")
    if not 0 <= s.memory_warm_bytes <= 1024**3:
        raise ConfigError(f"[cache] warm_bytes {s.memory_warm_bytes} must be 0 (off) to 1073741824 (1 GiB)")
    if not 0 <= s.stale_if_error <= 30 * 86400:
        raise ConfigError(f"stale_if_error {s.stale_if_error} must be 0 (off) to 2592000 seconds (30 days)")
    if s.viewer_dir is not None and not (Path(s.viewer_dir).expanduser() / "index.html").is_file():
        raise ConfigError(f"viewer dir {s.viewer_dir!r} has no index.html: expected a built OHIF dist/ "
                          "(./scripts/fetch-ohif.sh fetches one)")
    if s.redis_url == "":
        s.redis_url = None  # DICOMWEB_EDGE_REDIS_URL= (empty) means no shared tier, as unset does
    if s.redis_url is not None:
        _validate_redis(s)
    if not s.archives:
        raise ConfigError("no archives configured: add [[archives]] to the config or pass --upstream NAME=URL")
    seen: set[str] = set()
    for a in s.archives:
        if not _NAME.match(a.name):
            raise ConfigError(f"archive name {a.name!r}: use letters, digits, '.', '_' or '-'")
        if a.name in seen:
            raise ConfigError(f"archive name {a.name!r} is used twice")
        seen.add(a.name)
        u = urlsplit(a.url)
        if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
            raise ConfigError(f"archive {a.name!r}: url {a.url!r} must be an absolute http(s) base URL")
        a.url = a.url.rstrip("/")
        if a.profile not in PROFILES:
            raise ConfigError(f"archive {a.name!r}: profile {a.profile!r} is not one of {', '.join(PROFILES)}")
        for t in ("connect", "first_byte", "idle_read"):
            if getattr(a.timeouts, t) <= 0:
                raise ConfigError(f"archive {a.name!r}: timeouts.{t} must be positive")
        if a.max_connections < 1:
            raise ConfigError(f"archive {a.name!r}: max_connections must be at least 1")
        if a.search_deadline <= 0 or a.breaker_cooldown <= 0 or a.breaker_threshold < 1:
            raise ConfigError(f"archive {a.name!r}: search_deadline, breaker_cooldown and breaker_threshold "
                              "must be positive")


def _validate_limits(s: Settings) -> None:
    if (s.tls_cert_file is None) != (s.tls_key_file is None):
        raise ConfigError("tls_cert_file and tls_key_file go together")
    for key in ("tls_cert_file", "tls_key_file"):
        path = getattr(s, key)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"{key} {path!r} is not a readable file")
    if s.client_request_rate < 0 or s.client_byte_rate < 0:
        raise ConfigError("client_request_rate and client_byte_rate must be 0 (off) or positive")
    if s.client_request_burst < 1 or s.client_byte_burst < 1:
        raise ConfigError("client_request_burst and client_byte_burst must be at least 1")
    if not 1024 <= s.max_header_bytes <= 1024**2 or not 8 <= s.max_header_count <= 1000:
        raise ConfigError("max_header_bytes must be 1024..1048576 and max_header_count 8..1000")
    for key in ("header_timeout", "keepalive_timeout", "send_timeout", "queue_timeout"):
        if not 0 < getattr(s, key) <= 3600:
            raise ConfigError(f"{key} must be more than 0 and at most 3600 seconds")


def _validate_redis(s: Settings) -> None:
    u = urlsplit(s.redis_url or "")
    if u.scheme not in ("redis", "rediss", "unix") or not (u.hostname or u.path):
        raise ConfigError(f"redis_url {redact(s.redis_url or '')!r} must be a redis://, rediss:// or unix:// URL")
    if importlib.util.find_spec("redis") is None:
        raise ConfigError("redis_url is set but the redis client is not installed: pip install 'dicomweb-edge[redis]'")
    if not 0 < s.redis_timeout <= 10:
        raise ConfigError(f"redis_timeout {s.redis_timeout} must be more than 0 and at most 10 seconds")
    if not re.match(r"^[!-~]{1,100}$", s.redis_key_prefix):
        raise ConfigError("redis_key_prefix must be 1 to 100 printable characters without spaces")


def redact(url: str) -> str:
    """A URL with its password, if any, replaced by `***` (for printing)."""
    u = urlsplit(url)
    if u.password is None:
        return url
    user = u.username or ""
    return urlunsplit((u.scheme, f"{user}:***@{u.netloc.rsplit('@', 1)[1]}", u.path, u.query, u.fragment))
