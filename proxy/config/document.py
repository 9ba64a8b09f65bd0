"""A configuration as one TOML-shaped document: the file, then `DICOMWEB_EDGE_*` environment variables, then
command-line flags, each value remembered with where it came from; checked against the schema by msgspec
(every key typed, no unknown key, each key in its own section), a failed check told by messages.py.

The checking types are made from the `Settings`, `ArchiveConfig` and `Timeouts` dataclasses (their
annotations are the schema, schema.SECTIONS says where each key lives): `FileSchema(...)`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from proxy.config import messages
from proxy.config.messages import ConfigError, Location
from proxy.config.schema import (
    AUTH_FROM_ENVIRONMENT,
    GOOGLE_STORE_URL,
    SECTIONS,
    ArchiveAuth,
    AuthTable,
    EgressTable,
    GoogleStore,
    TlsTable,
)

ENV_PREFIX = "DICOMWEB_EDGE_"
FLAGS = {"viewer_dir": "--viewer", "archives": "--upstream"}  # flags not named after their attribute
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def read_file(path: str | Path) -> dict[str, Any]:
    """The TOML document of a config file; ConfigError when it cannot be read or is not TOML."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({type(exc).__name__}: {exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _struct(name: str, cls: type, keys: Mapping[str, str], special: Mapping[str, tuple[Any, Any]]) -> Any:
    """A strict msgspec Struct for the fields `keys` names of dataclass `cls` (key in the file → attribute),
    with their annotated types and defaults; `special` gives (type, default factory) for some attributes."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    spec: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for attr in keys.values():
        f = fields[attr]
        if attr in special:
            kind, factory = special[attr]
            spec.append((attr, kind, msgspec.field(default_factory=factory)))
        elif f.default is not dataclasses.MISSING:
            spec.append((attr, hints[attr], f.default))
        elif f.default_factory is not dataclasses.MISSING:
            spec.append((attr, hints[attr], msgspec.field(default_factory=f.default_factory)))
        else:
            spec.append((attr, hints[attr]))
    rename = {attr: key for key, attr in keys.items()}
    return msgspec.defstruct(name, spec, kw_only=True, forbid_unknown_fields=True, rename=rename)


class FileSchema:
    """The config file's types, made from the settings dataclasses: one table per section of
    schema.SECTIONS, `[auth]`, and `[[archives]]` tables."""

    def __init__(self, settings: type, archive: type, timeouts: type) -> None:
        placed = {attr for keys in SECTIONS.values() for attr in keys.values()} | {"auth", "archives"}
        if unplaced := sorted({f.name for f in dataclasses.fields(settings)} - placed):
            raise TypeError(f"Settings attributes in no section of schema.SECTIONS: {unplaced}")
        self.hints = typing.get_type_hints(settings, include_extras=True)
        times = _struct("timeouts", timeouts, {f.name: f.name for f in dataclasses.fields(timeouts)}, {})
        self.archive = _struct("archive", archive, {f.name: f.name for f in dataclasses.fields(archive)},
                               {"timeouts": (times, times), "auth": (ArchiveAuth | None, lambda: None),
                                "tls": (TlsTable | None, lambda: None),
                                "google_store": (GoogleStore | None, lambda: None),
                                "egress": (EgressTable | None, lambda: None)})
        self.sections = {name: _struct(name, settings, keys, {}) for name, keys in SECTIONS.items()}
        spec: list[tuple[str, Any, Any]] = [(name, kind, msgspec.field(default_factory=kind))
                                            for name, kind in self.sections.items()]
        spec += [("auth", AuthTable, msgspec.field(default_factory=AuthTable)),
                 ("archives", list[self.archive], msgspec.field(default_factory=list))]  # type: ignore[name-defined]
        self.file = msgspec.defstruct("file", spec, kw_only=True, forbid_unknown_fields=True)
        self.where = {attr: (section, key) for section, keys in SECTIONS.items() for key, attr in keys.items()}


@dataclasses.dataclass
class Document:
    """A configuration being put together: the TOML-shaped values, and where those not from the file came
    from ((section, key) or ("archives",) → an environment variable or a flag)."""

    source: str  # the file, or "settings" when there is none
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    origins: dict[tuple[str | int, ...], str] = dataclasses.field(default_factory=dict)

    def put(self, path: tuple[str, ...], value: Any, origin: str) -> None:
        if len(path) == 1:
            self.values[path[0]] = value
        else:
            table = self.values.setdefault(path[0], {})
            if not isinstance(table, dict):  # `server = 1` in the file: the check will say so
                return
            table[path[1]] = value
        self.origins[path] = origin

    def location(self, path: tuple[str | int, ...]) -> Location:
        return Location(self.source, self.values, self.origins, path)


def _typed(text: str, hint: Any, origin: str, where: tuple[str, ...]) -> Any:
    """An environment variable's text as a value of `hint` (its bounds are checked with the document)."""
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
    value: Any = text
    if typing.get_origin(base) is list:
        value = [v.strip() for v in text.split(",") if v.strip()]
    elif base is bool and text.strip().lower() in _TRUE + _FALSE:
        value = text.strip().lower() in _TRUE
    try:
        return msgspec.convert(value, base, strict=False)
    except msgspec.ValidationError:
        label = f"{origin} ([{where[0]}] {where[1]})"
        raise ConfigError(f"{label}: expected {messages.expected(msgspec.inspect.type_info(hint))}, "
                          f"given {messages.toml_value(text)}") from None


def from_environment(doc: Document, schema: FileSchema, environ: Mapping[str, str],
                     upstream: Callable[[str], dict[str, Any]]) -> None:
    """DICOMWEB_EDGE_<ATTRIBUTE> for every setting, DICOMWEB_EDGE_AUTH_<KEY> for some `[auth]` keys, and
    DICOMWEB_EDGE_UPSTREAMS (NAME=URL,...) for the archives, over what the file says."""
    for attr, (section, key) in schema.where.items():
        name = ENV_PREFIX + attr.upper()
        if (text := environ.get(name)) is not None:
            origin = f"environment variable {name}"
            doc.put((section, key), _typed(text, schema.hints[attr], origin, (section, key)), origin)
    auth_hints = typing.get_type_hints(AuthTable, include_extras=True)
    for key in AUTH_FROM_ENVIRONMENT:
        name = f"{ENV_PREFIX}AUTH_{key.upper()}"
        if text := environ.get(name):
            origin = f"environment variable {name}"
            doc.put(("auth", key), _typed(text, auth_hints[key], origin, ("auth", key)), origin)
    if ups := environ.get(ENV_PREFIX + "UPSTREAMS"):
        doc.put(("archives",), [upstream(u.strip()) for u in ups.split(",") if u.strip()],
                f"environment variable {ENV_PREFIX}UPSTREAMS")


def from_flags(doc: Document, schema: FileSchema, overrides: Mapping[str, Any]) -> None:
    """Command-line flags (by attribute name; None: not given) over the file and the environment."""
    for attr, value in overrides.items():
        if value is None:
            continue
        flag = FLAGS.get(attr, "--" + attr.replace("_", "-"))
        doc.put(schema.where.get(attr, (attr,)), value, flag)


def check(doc: Document, schema: FileSchema) -> dict[str, Any]:
    """The document checked against the schema, as the keyword arguments of `Settings` (archives as dicts,
    their timeouts as a dict); ConfigError (messages.explain) for the first thing wrong."""
    for archive in doc.values.get("archives") or []:
        _google_store_url(archive)
    try:
        checked: Any = msgspec.convert(doc.values, schema.file)
    except msgspec.ValidationError as exc:
        raise ConfigError(messages.explain(str(exc), doc.location(()), msgspec.inspect.type_info(schema.file))
                          ) from None
    flat: dict[str, Any] = {}
    for section in schema.sections:
        flat.update(msgspec.structs.asdict(getattr(checked, section)))
    flat["auth"] = msgspec.to_builtins(checked.auth)
    flat["archives"] = [{f: msgspec.to_builtins(getattr(a, f)) for f in a.__struct_fields__} for a in checked.archives]
    messages.refuse_masks(doc.location(()))
    return flat


def _google_store_url(archive: Any) -> None:
    """A Google archive's url made from its `google_store` table when no url is given (schema.GOOGLE_STORE_URL);
    a table that does not fit is left for the schema to explain."""
    if not isinstance(archive, dict) or "url" in archive or archive.get("profile") != "google":
        return
    try:
        store = msgspec.convert(archive.get("google_store"), GoogleStore)
    except msgspec.ValidationError:
        return
    archive["url"] = GOOGLE_STORE_URL.format(**msgspec.structs.asdict(store))


def document_of(settings: Any) -> tuple[dict[str, Any], dict[tuple[str, str], str]]:
    """A settings object as the TOML document that configures it, secrets masked, and a comment per key:
    its unit, or why it is absent. The inverse of `check`, less the secrets."""
    values = dataclasses.asdict(settings)
    hints = typing.get_type_hints(type(settings), include_extras=True)
    doc: dict[str, Any] = {}
    comments: dict[tuple[str, str], str] = {}
    for section, keys in SECTIONS.items():
        doc[section] = {key: values[attr] for key, attr in keys.items()}
        for key, attr in keys.items():
            if (note := messages.unit(hints[attr])) or values[attr] is None:
                comments[(section, key)] = note or "not set"
    doc["auth"] = values["auth"]
    doc["archives"] = values["archives"]
    if doc["server"]["bulk_token_key"] is None:
        comments[("server", "bulk_token_key")] = "not set (each start generates one)"
    for section, kind in (("archives", type(settings.archives[0]) if settings.archives else object),
                          ("auth", AuthTable)):
        for key, hint in typing.get_type_hints(kind, include_extras=True).items():
            if note := messages.unit(hint):
                comments[(section, key)] = note
    if settings.archives:  # (every timeout is in seconds)
        comments[("archives", "timeouts")] = "seconds"
    return messages.masked(doc), comments

