"""A QIDO query: parsed and checked once, written in the form each archive understands, matched at the edge.

The proxy decodes the query string itself and re-sends it per archive profile. Orthanc 1.x does not
percent-decode (`PatientName=DOE%2A` matches nothing there), so values go to it raw, and characters it
cannot receive are replaced by wildcards (`_raw`). Such an archive answers more than the client asked for:
`PatientName=MÜLLER*` goes to Orthanc as `M*LLER*`, which also finds MOLLER. Each record it returns is then
matched against the value the client sent (`edge_matches`, `Match`, `keep`), by the rules of PS3.4 C.2.2.2:

- `*` matches any run of characters, `?` any one character, everything else itself;
- a person name matches without regard to case, as the archives we front match names (Orthanc's default),
  against any of its component groups (alphabetic, ideographic, phonetic) or the whole `A=I=P` value;
- a multi-valued attribute matches when any of its values does;
- a record without the attribute, or one given as a sequence path, is kept: the archive matched it, and
  nothing here can say otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote_plus

from pydicom.datadict import dictionary_VR, tag_for_keyword

from proxy.errors import Problem
from proxy.upstream.archive import Archive
from proxy.upstream.profiles import Profile

PARAMS = {"limit", "offset", "includefield", "fuzzymatching", "emptyvaluematching", "multiplevaluematching"}
UID_LIST = re.compile(r"^[0-9]+(\.[0-9]+)*([,\\][0-9]+(\.[0-9]+)*)*$")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_DATE = r"[0-9]{8}"
_TIME = r"[0-9]{2}(?:[0-9]{2}(?:[0-9]{2}(?:\.[0-9]{1,6})?)?)?"
_RANGES = {
    "DA": re.compile(rf"^(?:{_DATE}|{_DATE}-|-{_DATE}|{_DATE}-{_DATE})$"),
    "TM": re.compile(rf"^(?:{_TIME}|{_TIME}-|-{_TIME}|{_TIME}-{_TIME})$"),
}
WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
FUZZY_WARNING = ("299 dicomweb-edge: The fuzzymatching parameter is not supported. "
                 "Only literal matching has been performed.")


@dataclass
class Query:
    """A validated QIDO query: attribute filters plus the standard parameters."""

    filters: list[tuple[str, str, str]] = field(default_factory=list)  # (key as sent, value, VR)
    includefield: list[str] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0
    fuzzy: bool | None = None
    vendor: list[tuple[str, str]] = field(default_factory=list)


def _attribute_vr(key: str) -> str:
    """VR of an attribute path's last element; Problem(400) for names that are not attributes."""
    vr = ""
    for part in key.split("."):
        if _TAG.match(part):
            tag = int(part, 16)
        else:
            found = tag_for_keyword(part)
            if found is None:
                raise Problem(400, f"unknown attribute {part!r} in query")
            tag = found
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"  # private or unknown tag: the archive decides
    return vr


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_query(raw: str) -> Query:
    """Decode and validate a QIDO query string (PS3.18 §8.3.4)."""
    q = Query()
    for pair in filter(None, raw.split("&")):
        key, _, value = pair.partition("=")
        key, value = unquote_plus(key), unquote_plus(value)
        if _CONTROL.search(key) or _CONTROL.search(value):  # a line break could split an upstream request
            raise Problem(400, "control characters (line breaks) are not allowed in a query")
        if key in PARAMS:
            _param(q, key, value)
        elif key[:1].isupper() or _TAG.match(key.split(".")[0]):
            vr = _attribute_vr(key)
            if vr == "UI" and value and value != "*":
                if not UID_LIST.match(value):
                    raise Problem(400, f"{key}: not a UID or a comma-separated UID list")
                value = value.replace("\\", ",")  # OHIF joins UIDs with a backslash; the standard uses commas
            elif vr in _RANGES and value and not _RANGES[vr].match(value):
                raise Problem(400, f"{key}: not a valid {vr} value or range")
            q.filters.append((key, value, vr))
        elif key == "accept" or not key:
            continue
        elif re.match(r"^[a-z][A-Za-z0-9_-]*$", key):
            q.vendor.append((key, value))  # lower-case names are vendor parameters, not attributes
        else:
            raise Problem(400, f"malformed query parameter {key!r}")
    return q


def _param(q: Query, key: str, value: str) -> None:
    if key in ("limit", "offset"):
        if not value.isdigit() or len(value) > 9:
            raise Problem(400, f"{key} must be a non-negative whole number")
        setattr(q, key, int(value))
    elif key == "fuzzymatching":
        if value not in ("true", "false"):
            raise Problem(400, "fuzzymatching must be 'true' or 'false'")
        q.fuzzy = value == "true"
    elif key == "includefield":
        for name in filter(None, value.split(",")):
            if name != "all" and not _TAG.match(name) and tag_for_keyword(name) is None:
                raise Problem(400, f"includefield: unknown attribute {name!r}")
            q.includefield.append(name)
    else:  # emptyvaluematching, multiplevaluematching: passed on as given
        if value not in ("true", "false"):
            raise Problem(400, f"{key} must be 'true' or 'false'")
        q.vendor.append((key, value))


def _encode(value: str, vr: str, profile: Profile) -> str:
    return quote(value, safe="*?^,-.:_~=") if profile.decodes_query else _raw(value, vr)[0]


_RAW_SAFE = "*?^,-._~:/=@!$'()+;"


def _raw(value: str, vr: str) -> tuple[str, bool]:
    """The value for an archive that takes the query string literally, and whether it now matches more.

    Wildcard-safe characters go raw. In a value that may hold wildcards, a character the archive cannot
    receive becomes one: `?` for an ASCII one (space, '&', '#', '%'), `*` for a non-ASCII one (Orthanc's
    `?` matches no UTF-8 character: `M?LLER*` does not find MÜLLER, `M*LLER*` does).
    """
    out: list[str] = []
    broadened = False
    for ch in value:
        if ch.isascii() and (ch.isalnum() or ch in _RAW_SAFE):
            out.append(ch)
        elif vr not in WILDCARD_VRS:
            out.append(quote(ch, safe=""))
        else:
            broadened = True
            out.append("?" if ch.isascii() else "*")
    text = "".join(out)
    return (re.sub(r"\*+", "*", text) if broadened else text), broadened


def edge_matches(q: Query, profile: Profile) -> list[Match]:
    """What the archive's records must also match at the edge: the values `translate` had to broaden."""
    if profile.decodes_query:
        return []
    matches = []
    for key, value, vr in q.filters:
        if "." in key or not _raw(value, vr)[1]:
            continue  # sent as asked; a sequence path is left to the archive
        tag = int(key, 16) if _TAG.match(key) else tag_for_keyword(key)
        if tag is not None:
            matches.append(Match.of(f"{tag:08X}", vr, value))
    return matches


def translate(q: Query, profile: Profile, limit: int | None = None, offset: int | None = None) -> str:
    """The query string to send one archive."""
    parts = []
    for key, value, vr in q.filters:
        if vr == "UI":
            value = value.replace(",", profile.uid_list_separator)
        parts.append(f"{key}={_encode(value, vr, profile)}")
    if q.includefield:
        parts.append("includefield=" + ",".join(q.includefield))
    if q.fuzzy is not None and (profile.fuzzy_matching or not q.fuzzy):
        parts.append(f"fuzzymatching={'true' if q.fuzzy else 'false'}")
    limit = q.limit if limit is None else limit
    offset = q.offset if offset is None else offset
    if limit is not None:
        if profile.max_limit is not None:
            limit = min(limit, profile.max_limit)
        if limit > 0 or profile.zero_limit_means_all:
            parts.append(f"limit={limit}")
    if offset:
        parts.append(f"offset={offset}")
    parts.extend(f"{k}={_encode(v, 'CS', profile)}" for k, v in q.vendor)
    return "&".join(parts)


def warnings_for(q: Query, archive: Archive) -> list[str]:
    """Warnings the proxy adds because the archive ignores a parameter (PS3.18 §8.3.4.2)."""
    if q.fuzzy and not archive.profile.fuzzy_matching:
        return [FUZZY_WARNING]
    return []


def reach_warnings(q: Query, archive: Archive) -> list[str]:
    """The Warning for a page the archive cannot reach whole: its searches stop at `max_results` records."""
    reach = archive.profile.max_results
    offset = q.offset or 0
    if reach is not None and (offset >= reach or offset + (q.limit or 0) > reach):  # (no limit: its own page)
        return [f"299 dicomweb-edge: archive '{archive.name}' returns at most the first {reach} matches of a "
                "search; narrow the search to see the others"]
    return []


def searchable(path: str, profile: Profile) -> bool:
    """Whether the archive answers a search on `path`: one without flat searches needs the study for
    /series and the study and series for /instances."""
    if profile.flat_search:
        return True
    parts = path.strip("/").split("/")
    return parts == ["studies"] or (len(parts) == 3 and parts[2] == "series") or \
        (len(parts) == 5 and parts[2] == "series" and parts[4] == "instances")


PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


@dataclass(frozen=True)
class Match:
    """One attribute the client asked to match: its tag (8 hex digits), VR and the pattern it sent."""

    tag: str
    vr: str
    pattern: re.Pattern[str]

    @classmethod
    def of(cls, tag: str, vr: str, value: str) -> Match:
        """The matcher for one query value, `*` and `?` as wildcards."""
        regex = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in value)
        flags = re.DOTALL | (re.IGNORECASE if vr == "PN" else 0)
        return cls(tag.upper(), vr, re.compile(regex, flags))

    def accepts(self, record: dict[str, Any]) -> bool:
        """Whether the record's value matches (kept when the record does not carry the attribute)."""
        attribute = record.get(self.tag)
        values = attribute.get("Value") if isinstance(attribute, dict) else None
        if not isinstance(values, list) or not values:
            return True
        return any(self.pattern.fullmatch(text) for text in _texts(values, self.vr))


def _texts(values: list[Any], vr: str) -> Iterable[str]:
    for value in values:
        if vr == "PN" and isinstance(value, dict):
            groups = [value.get(g, "") for g in PN_GROUPS]
            yield from (g for g in groups if isinstance(g, str) and g)
            yield "=".join(g if isinstance(g, str) else "" for g in groups).rstrip("=")
        elif isinstance(value, str | int | float):
            yield str(value)


def keep(records: list[dict[str, Any]], matches: list[Match]) -> list[dict[str, Any]]:
    """The records every match accepts, in their order."""
    if not matches:
        return records
    return [r for r in records if all(m.accepts(r) for m in matches)]
