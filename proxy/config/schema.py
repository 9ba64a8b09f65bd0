"""The configuration file's shape: value types with their units and bounds, the choices, the tables whose
runtime form stays a dict (`[auth]`, an archive's `auth` and `tls`), and which section holds which key.

The `Settings`, `ArchiveConfig` and `Timeouts` dataclasses (proxy/config/__init__.py) annotate their fields
with these types: they are the one schema. msgspec checks a file against it (document.py), the unit named
in a type's description is what an error message and `check-config` print beside the number.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from msgspec import UNSET, Meta, Struct, UnsetType

SECONDS = "seconds"
Seconds = Annotated[float, Meta(ge=0, description=SECONDS)]  # 0 usually means "off"
PositiveSeconds = Annotated[float, Meta(gt=0, description=SECONDS)]
Timeout = Annotated[float, Meta(gt=0, le=3600, description=SECONDS)]
Grace = Annotated[float, Meta(ge=0, le=3600, description=SECONDS)]
Retention = Annotated[float, Meta(ge=0, le=30 * 86400, description=SECONDS)]  # stale_if_error: 0 (off) to 30 days
RedisTimeout = Annotated[float, Meta(gt=0, le=10, description=SECONDS)]
Bytes = Annotated[int, Meta(ge=0, description="bytes")]
PositiveBytes = Annotated[int, Meta(ge=1, description="bytes")]
WarmBytes = Annotated[int, Meta(ge=0, le=1024**3, description="bytes")]
HeaderBytes = Annotated[int, Meta(ge=1024, le=1024**2, description="bytes")]
HeaderCount = Annotated[int, Meta(ge=8, le=1000, description="headers")]
RequestRate = Annotated[float, Meta(ge=0, description="requests per second")]
ByteRate = Annotated[float, Meta(ge=0, description="bytes per second")]
Requests = Annotated[int, Meta(ge=1, description="requests")]
Port = Annotated[int, Meta(ge=1, le=65535)]
AtLeastOne = Annotated[int, Meta(ge=1)]
Connections = Annotated[int, Meta(ge=1, description="connections")]
Failures = Annotated[int, Meta(ge=1, description="consecutive failures")]

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "text"]
EmptySearchStatus = Literal[200, 204]
Profile = Literal["orthanc", "dcm4chee", "google", "azure", "aws", "generic"]
# Optimisations an operator may switch off (`[server] disable = [...]`, `DICOMWEB_EDGE_DISABLE=a,b`); each
# is kept only while a benchmark a user would notice shows it pays (benchmarks/RESULTS.md, "Mechanisms").
Optimisation = Literal["hit_lane", "splice", "handover", "claims", "server_protocol"]
Scope = Literal["read", "write", "admin"]

PROFILES: tuple[str, ...] = get_args(Profile)
OPTIONAL: tuple[str, ...] = get_args(Optimisation)
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
MASK = "***"  # what check-config prints for a secret; never accepted as one


class _Table(Struct, forbid_unknown_fields=True, kw_only=True):
    """A table whose keys are all optional; an absent key stays absent in the dict the proxy reads (UNSET)."""


class ApiKey(_Table):
    """One `[auth] api_keys` entry."""

    sha256: str  # the key's SHA-256 digest, hex (a secret: check-config prints ***)
    name: str | UnsetType = UNSET
    scopes: list[Scope] | Scope | UnsetType = UNSET


class AuthTable(_Table):
    """`[auth]`: inbound authentication. The types are checked here; what the keys mean together (a mode's
    required keys, the files they name) is auth.inbound.parse's, which also holds the defaults."""

    mode: Literal["none", "api_key", "jwt"] | UnsetType = UNSET
    allow_none_on_network: bool | UnsetType = UNSET
    metrics: Literal["trusted", "open", "admin"] | UnsetType = UNSET
    access_ttl: Seconds | UnsetType = UNSET
    api_keys: list[ApiKey] | UnsetType = UNSET
    api_keys_file: str | UnsetType = UNSET
    issuer: str | UnsetType = UNSET
    audience: str | list[str] | UnsetType = UNSET
    jwks_url: str | UnsetType = UNSET
    jwks_file: str | UnsetType = UNSET
    algorithms: str | list[str] | UnsetType = UNSET
    jwks_cache_ttl: Seconds | UnsetType = UNSET
    jwks_refetch_interval: Seconds | UnsetType = UNSET
    leeway: Seconds | UnsetType = UNSET
    scope_claim: str | UnsetType = UNSET
    read_scope: str | UnsetType = UNSET
    write_scope: str | UnsetType = UNSET
    admin_scope: str | UnsetType = UNSET


class _ArchiveAuth(_Table, tag_field="type"):
    """An archive's `auth` table, by `type`. A secret comes inline (printed as ***), from a file or from an
    environment variable; which of the three is given is upstream.credentials.check_auth's to judge."""


class BasicAuth(_ArchiveAuth, tag="basic"):
    username: str
    password: str | UnsetType = UNSET
    password_file: str | UnsetType = UNSET
    password_env: str | UnsetType = UNSET


class BearerAuth(_ArchiveAuth, tag="bearer"):
    token: str | UnsetType = UNSET
    token_file: str | UnsetType = UNSET
    token_env: str | UnsetType = UNSET


class OAuth2Auth(_ArchiveAuth, tag="oauth2"):
    token_url: str
    client_id: str
    client_secret: str | UnsetType = UNSET
    client_secret_file: str | UnsetType = UNSET
    client_secret_env: str | UnsetType = UNSET
    scope: str | UnsetType = UNSET
    audience: str | UnsetType = UNSET


class GoogleAuth(_ArchiveAuth, tag="google"):
    """Google Cloud Healthcare: exactly one source (upstream.cloud_auth): a service-account key file,
    Application Default Credentials, or the GCE/GKE metadata server."""

    key_file: str | UnsetType = UNSET
    adc: bool | UnsetType = UNSET
    metadata: bool | UnsetType = UNSET
    scopes: list[str] | UnsetType = UNSET


class AzureAuth(_ArchiveAuth, tag="azure"):
    """Azure Health Data Services DICOM: client secret, workload identity or managed identity
    (upstream.cloud_auth)."""

    mode: Literal["client_secret", "workload_identity", "managed_identity"]
    tenant_id: str | UnsetType = UNSET
    client_id: str | UnsetType = UNSET
    client_secret: str | UnsetType = UNSET
    client_secret_file: str | UnsetType = UNSET
    client_secret_env: str | UnsetType = UNSET
    federated_token_file: str | UnsetType = UNSET
    authority_host: str | UnsetType = UNSET
    scope: str | UnsetType = UNSET



class AwsAuth(_ArchiveAuth, tag="aws"):
    """SigV4 signing; the credentials come from botocore's chain (environment, profile, web identity, role)."""

    region: str | UnsetType = UNSET  # (default: the one in a dicom-medical-imaging.REGION.amazonaws.com url)
    profile: str | UnsetType = UNSET  # a named profile of the shared AWS config and credentials files
    service: str | UnsetType = UNSET  # the signing name (default: medical-imaging)


ArchiveAuth = BasicAuth | BearerAuth | OAuth2Auth | GoogleAuth | AzureAuth | AwsAuth
ARCHIVE_SECRETS = ("password", "token", "client_secret", "proxy_password")

GoogleId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
GOOGLE_STORE_URL = ("https://healthcare.googleapis.com/v1/projects/{project}/locations/{location}/datasets/{dataset}"
                    "/dicomStores/{dicom_store}/dicomWeb")


class GoogleStore(Struct, forbid_unknown_fields=True, kw_only=True):
    """A Google archive's `google_store` table: the DICOM store whose DICOMweb URL (GOOGLE_STORE_URL) is the
    archive's `url` when none is given."""

    project: GoogleId
    location: GoogleId
    dataset: GoogleId
    dicom_store: GoogleId


class TlsTable(_Table):
    """An https archive's `tls` table: a private CA, a client certificate (mutual TLS), or no verification."""

    ca_file: str | UnsetType = UNSET
    cert_file: str | UnsetType = UNSET
    key_file: str | UnsetType = UNSET
    verify: bool | UnsetType = UNSET


class EgressTable(_Table):
    """An archive's `egress` table: its own egress proxy (`http://host:port`, or "direct" for none),
    overriding `[egress] proxy`. The password is a secret (inline, `_file` or `_env`)."""

    proxy: str
    proxy_username: str | UnsetType = UNSET
    proxy_password: str | UnsetType = UNSET
    proxy_password_file: str | UnsetType = UNSET
    proxy_password_env: str | UnsetType = UNSET


# Where each key of `Settings` lives in the file: section → {key in the file: Settings attribute}. `[auth]`
# is the `auth` table and `[[archives]]` the `archives` list; the environment variable of a key is
# DICOMWEB_EDGE_ + its attribute's name in capitals.
def _same(*names: str) -> dict[str, str]:
    return {name: name for name in names}


SECTIONS: dict[str, dict[str, str]] = {
    "server": _same("host", "port", "workers", "shutdown_grace", "public_url", "trusted_proxies", "cors_origins",
                    "tls_cert_file", "tls_key_file", "bulk_token_key", "log_level", "log_format",
                    "log_patient_data", "disable"),
    "cache": {"dir": "cache_dir", "size_bytes": "cache_size_bytes", "memory_bytes": "memory_cache_bytes",
              "warm_bytes": "memory_warm_bytes",
              **_same("metadata_cache_ttl", "stale_if_error", "prefetch", "prefetch_concurrency", "prefetch_ttl")},
    "limits": _same("max_json_bytes", "max_stow_bytes", "client_request_rate", "client_request_burst",
                    "client_byte_rate", "client_byte_burst", "max_header_bytes", "max_header_count",
                    "header_timeout", "keepalive_timeout", "send_timeout", "queue_timeout"),
    "federation": _same("health_interval", "locator_ttl", "search_cache_ttl", "max_search_results",
                        "empty_search_status"),
    "shared": _same("redis_url", "redis_key_prefix", "redis_timeout"),
    "viewer": {"dir": "viewer_dir"},
    "egress": {key: f"egress_{key}" for key in ("proxy", "proxy_username", "proxy_password", "proxy_password_file",
                                                 "proxy_password_env", "use_environment", "no_proxy", "ca_file",
                                                 "system_ca")},
}
AUTH_FROM_ENVIRONMENT = ("mode", "issuer", "audience", "jwks_url", "jwks_file", "api_keys_file", "metrics",
                         "allow_none_on_network")  # DICOMWEB_EDGE_AUTH_<KEY>
