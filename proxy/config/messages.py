"""What a configuration error says: one line naming where the value came from (the file, its section and key;
or the environment variable or flag that set it), what was expected (with the unit) and what was given.
Also the secrets: masked for printing, and a mask refused where a secret is expected."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import re
import types
import typing
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
from msgspec import inspect as mi

from proxy.config import toml
from proxy.config.schema import ARCHIVE_SECRETS, MASK

_MISSING = object()
_PATH = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class Location:
    """A place in a configuration document: `path` from its top ((section, key, ...); archives by index)."""

    source: str
    values: dict[str, Any]
    origins: dict[tuple[str | int, ...], str]
    path: tuple[str | int, ...]

    def child(self, *more: str | int) -> Location:
        return dataclasses.replace(self, path=self.path + more)

    @property
    def value(self) -> Any:
        """The value there, or _MISSING."""
        node: Any = self.values
        for step in self.path:
            if isinstance(step, int) and isinstance(node, list) and step < len(node):
                node = node[step]
            elif isinstance(step, str) and isinstance(node, dict) and step in node:
                node = node[step]
            else:
                return _MISSING
        return node

    def label(self) -> str:
        """`[server] port`, `[[archives]] #1 ("pacs") timeouts.connect`, `[auth] api_keys (item 2) sha256`."""
        section, rest = self.path[0], self.path[1:]
        head = f"[{section}]"
        if section == "archives":
            head = "[[archives]]"
            if rest and isinstance(rest[0], int):
                table = dataclasses.replace(self, path=self.path[:2]).value
                name = table.get("name") if isinstance(table, dict) else None
                head += f" #{rest[0] + 1}" + (f" ({toml.string(name)})" if isinstance(name, str) else "")
                rest = rest[1:]
        tail = ""
        for step in rest:
            if isinstance(step, int):
                tail += f" (item {step + 1})"
            else:
                tail += ("." if tail and not tail.endswith(")") else " ") + step
        return head + tail

    def text(self) -> str:
        """Where this is, for a message: `file, [section] key`, or `VARIABLE ([section] key)` for a value an
        environment variable or a flag set."""
        if not self.path:
            return self.source
        origin = self.origins.get(self.path[:2]) or self.origins.get(self.path[:1])
        return f"{origin} ({self.label()})" if origin else f"{self.source}, {self.label()}"


def toml_value(value: Any) -> str:
    """A value as it is written in TOML (for `given ...`)."""
    if value is _MISSING or value is None:
        return "nothing"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    try:
        return toml.value(value)
    except TypeError:
        return repr(value)


def _either(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _bounds(t: mi.IntType | mi.FloatType) -> str:
    if t.ge is not None and t.le is not None:
        return f" from {_number(t.ge)} to {_number(t.le)}"
    parts = [f"{words} {_number(bound)}" for words, bound in (("greater than", t.gt), ("of at least", t.ge),
                                                               ("less than", t.lt), ("at most", t.le))
             if bound is not None]
    return " " + " and ".join(parts) if parts else ""


def _tags(t: mi.Type) -> list[str]:
    members = t.types if isinstance(t, mi.UnionType) else ()
    return [str(m.tag) for m in members if isinstance(m, mi.StructType) and m.tag is not None]


def expected(t: mi.Type) -> str:
    """What a value of type `t` is, in words: `an integer from 1 to 65535`, `a number of seconds greater than
    0`, `one of "json" or "text"`, `true or false`, `a list, each a string`."""
    unit = None
    if isinstance(t, mi.Metadata):
        unit, t = (t.extra_json_schema or {}).get("description"), t.type
    if isinstance(t, mi.UnionType):
        if tags := _tags(t):
            return f"a table with type = {_either([toml.string(tag) for tag in tags])}"
        return " or ".join(expected(m) for m in t.types if not isinstance(m, mi.NoneType))
    if isinstance(t, mi.BoolType):
        return "true or false"
    if isinstance(t, mi.IntType):
        return (f"a whole number of {unit}" if unit else "an integer") + _bounds(t)
    if isinstance(t, mi.FloatType):
        return (f"a number of {unit}" if unit else "a number") + _bounds(t)
    if isinstance(t, mi.StrType):
        return "a string"
    if isinstance(t, mi.LiteralType):
        return "one of " + _either([toml_value(v) for v in t.values])
    if isinstance(t, mi.ListType):
        return "a list, each " + expected(t.item_type)
    return "a table"


def _plain(t: mi.Type, value: Any) -> mi.Type:
    """`t` without its metadata and its None; of tagged tables, the one `value`'s tag names."""
    if isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        tag = value.get("type") if isinstance(value, dict) else None
        chosen = [m for m in members if isinstance(m, mi.StructType) and m.tag is not None and m.tag == tag]
        if chosen or len(members) == 1:
            return (chosen or members)[0]
    return t


def _keys(t: mi.Type, value: Any = None) -> dict[str, mi.Type]:
    """The keys of a table type (of tagged tables, the one `value`'s tag names; unknown: the tag alone)."""
    t = _plain(t, value)
    if isinstance(t, mi.StructType | mi.DataclassType):
        return {f.encode_name: f.type for f in t.fields}
    if tags := _tags(t):
        return {"type": mi.LiteralType(values=tuple(tags))}
    return {}


def type_at(root: mi.Type, where: Location) -> mi.Type | None:
    """The schema's type for the value at `where`."""
    t: mi.Type | None = root
    for n in range(len(where.path)):
        step, value = where.path[n], dataclasses.replace(where, path=where.path[:n]).value
        if t is None:
            return None
        t = _plain(t, value)
        if isinstance(t, mi.UnionType) and any(isinstance(m, mi.ListType) for m in t.types):
            t = next(m for m in t.types if isinstance(m, mi.ListType) == isinstance(step, int))  # a list or one
        if isinstance(step, int):
            t = t.item_type if isinstance(t, mi.ListType) else None
        else:
            t = _keys(t).get(step) if not (isinstance(t, mi.StructType) and t.tag is not None and step == "type") \
                else mi.LiteralType(values=(t.tag,))
    return t


def given(value: Any, t: mi.Type | None) -> str:
    """`"8080" (a string; write 8080 without quotes)`: the value, and what it looks like it was meant to be."""
    text = toml_value(value)
    plain = _plain(t, value) if t is not None else None
    if not isinstance(value, str) or isinstance(plain, mi.StrType | mi.UnionType):
        return text
    meant: Any = None
    if isinstance(plain, mi.BoolType) and value.strip().lower() in ("true", "false"):
        meant = value.strip().lower() == "true"
    elif isinstance(plain, mi.IntType | mi.FloatType | mi.LiteralType):
        with contextlib.suppress(ValueError):
            meant = (float if isinstance(plain, mi.FloatType) else int)(value)
        if isinstance(plain, mi.LiteralType) and meant not in plain.values:
            return text  # a string among strings, or no number that would do
    if meant is None:
        return f"{text} (a string)"
    written = value.strip().lower() if isinstance(meant, bool) else value.strip()
    return f"{text} (a string; write {written} without quotes)"


def _tables(root: mi.Type) -> dict[str, list[str]]:
    """Each section's label → its keys (`[server]`, ..., `[auth]`, `[[archives]]`)."""
    out = {}
    for name, t in _keys(root).items():
        inner = _plain(t, None)
        out[f"[[{name}]]" if isinstance(inner, mi.ListType) else f"[{name}]"] = list(
            _keys(inner.item_type if isinstance(inner, mi.ListType) else inner))
    return out


def _unknown(where: Location, key: str, root: mi.Type) -> str:
    value, tables = where.child(key).value, _tables(root)
    if not where.path and isinstance(value, dict):
        close = difflib.get_close_matches(f"[{key}]", list(tables), 1)
        return (f"{where.source}, [{key}]: not a section" + (f" (did you mean {close[0]}?)" if close else "")
                + f"; given a [{key}] table; expected one of: {', '.join(tables)}")
    here = ("[[archives]]" if where.path[0] == "archives" else f"[{where.path[0]}]") if where.path else "the top level"
    keys = tables.get(here, []) if len(where.path) <= 2 else list(_keys(type_at(root, where) or root, where.value))
    owners = [label for label, ks in tables.items() if key in ks and label != here] if len(where.path) <= 2 else []
    said = f"given {toml.key(key)} = {toml_value(value)}"
    place = where.child(key).text() if where.path else f"{where.source}, {key}"
    if owners:
        return f"{place}: `{key}` is a key of {_either(owners)}, not of {here}; {said}; expected under {owners[0]}"
    if not where.path:
        return f"{place}: not a section; {said}; expected one of: {', '.join(tables)}"
    close = difflib.get_close_matches(key, keys, 1)
    table = here if len(where.path) <= 2 else where.label()
    return (f"{place}: not a key of {table}" + (f" (did you mean {close[0]}?)" if close else "")
            + f"; {said}; expected one of: {', '.join(keys)}")


def explain(error: str, top: Location, root: mi.Type) -> str:
    """msgspec's `Expected `int`, got `str` - at `$.server.port`` as the line a user reads."""
    reason, _, at = error.partition(" - at `")
    where = top.child(*((m[1] if m[1] is not None else int(m[2])) for m in _PATH.finditer(at.rstrip("`"))))
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", reason):
        return _unknown(where, m[1], root)
    if m := re.fullmatch(r"Object missing required field `(.+)`", reason):
        missing = where.child(m[1])
        return f"{missing.text()}: missing; expected {expected(type_at(root, missing) or mi.StrType())}"
    t = type_at(root, where)
    if t is None:
        return f"{where.text()}: {reason}"
    return f"{where.text()}: expected {expected(t)}, given {given(where.value, t)}"


def unit(hint: Any) -> str | None:
    """The unit an annotated type names (`seconds`, `bytes`), if any (of a union: its first member's)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((found for member in typing.get_args(hint) if (found := unit(member))), None)
    for meta in typing.get_args(hint)[1:] if typing.get_origin(hint) is typing.Annotated else ():
        if isinstance(meta, msgspec.Meta) and meta.description:
            return meta.description
    return None


def redact(url: str) -> str:
    """A URL with its password, if any, replaced by `***` (for printing)."""
    u = urlsplit(url)
    if u.password is None:
        return url
    user = u.username or ""
    return urlunsplit((u.scheme, f"{user}:{MASK}@{u.netloc.rsplit('@', 1)[1]}", u.path, u.query, u.fragment))


def _secrets(doc: dict[str, Any]) -> list[tuple[str | int, ...]]:
    """Where `doc` (a configuration document) holds secrets."""
    found: list[tuple[str | int, ...]] = [("server", "bulk_token_key")]
    if isinstance(url := doc.get("shared", {}).get("redis_url"), str) and urlsplit(url).password is not None:
        found.append(("shared", "redis_url"))
    found += [("auth", "api_keys", i, "sha256") for i in range(len(doc.get("auth", {}).get("api_keys", [])))]
    if doc.get("egress", {}).get("proxy_password") is not None:
        found.append(("egress", "proxy_password"))
    if isinstance(url := doc.get("egress", {}).get("proxy"), str) and urlsplit(url).password is not None:
        found.append(("egress", "proxy"))
    for i, archive in enumerate(doc.get("archives", [])):
        found += [("archives", i, "auth", key) for key in ARCHIVE_SECRETS if key in (archive.get("auth") or {})]
        found += [("archives", i, "egress", key) for key in ("proxy_password",) if key in (archive.get("egress") or {})]
        if isinstance(url := (archive.get("egress") or {}).get("proxy"), str) and urlsplit(url).password:
            found.append(("archives", i, "egress", "proxy"))
    return found


def masked(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with each of its secrets replaced by `***` (a password in a URL: only the password)."""
    for path in _secrets(doc):
        *parents, last = path
        node: Any = doc
        for step in parents:
            node = node[step]
        if node.get(last) is not None:
            node[last] = redact(node[last]) if last in ("redis_url", "proxy") else MASK
    return doc


def refuse_masks(top: Location) -> None:
    """ConfigError where a secret is `***`, which is how check-config prints one, not a secret."""
    for path in _secrets(top.values):
        where = top.child(*path)
        value = where.value
        if value == MASK or (path[-1] in ("redis_url", "proxy") and urlsplit(value).password == MASK):
            raise ConfigError(f"{where.text()}: expected the secret itself, given {toml_value(value)} (check-config "
                              "prints every secret as \"***\"; put the real one back, or for an archive credential "
                              "use its *_file or *_env key)")
