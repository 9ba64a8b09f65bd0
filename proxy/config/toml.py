"""A TOML writer for the values a configuration holds (strings, booleans, integers, floats, lists and tables),
so that `check-config` prints what `serve --config` reads back. Tables nested in a section are written inline;
a top-level list of tables as `[[name]]` tables."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_MUST_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')

Comments = Mapping[tuple[str, str], str]


def string(text: str) -> str:
    """A TOML basic string."""
    return '"' + _MUST_ESCAPE.sub(lambda m: _ESCAPES.get(m[0], f"\\u{ord(m[0]):04x}"), text) + '"'


def key(name: str) -> str:
    """A bare key when it can be one, else a quoted one."""
    return name if _BARE_KEY.fullmatch(name) else string(name)


def value(v: Any) -> str:
    """One value, inline (a table as `{ k = v }`, a list as `[a, b]`)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return string(v)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items() if x is not None) + " }" if v else "{}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def _table(section: str, table: Mapping[str, Any], comments: Comments) -> list[str]:
    lines = []
    for k, v in table.items():
        note = comments.get((section, k))
        if v is None:
            if note:
                lines.append(f"# {k}: {note}")
            continue
        lines.append(f"{key(k)} = {value(v)}" + (f"  # {note}" if note else ""))
    return lines


def _is_tables(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, Mapping) for x in v)


def dumps(document: Mapping[str, Any], comments: Comments | None = None) -> str:
    """`document` as TOML text. None values are left out: TOML has no null (with a comment, when `comments`
    has one for (section, key), the key is named in it instead). Comments go after the values they explain."""
    notes = comments or {}
    top = {k: v for k, v in document.items() if not isinstance(v, Mapping) and not _is_tables(v)}
    out = _table("", top, notes)
    for name, v in document.items():
        if isinstance(v, Mapping):
            out += ["", f"[{key(name)}]", *_table(name, v, notes)]
        elif _is_tables(v):
            for item in v:
                out += ["", f"[[{key(name)}]]", *_table(name, item, notes)]
    return "\n".join(out).lstrip("\n") + "\n"
