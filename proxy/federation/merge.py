"""Merging DICOM JSON from several archives: de-duplication, attribute policy, order, paging.

Records are parsed with numbers kept as their original text (`RawNumber`) and written back by
`dumps`, so a merged answer still says `1.50` where the archive said `1.50` (DS/IS number text is kept).

Policy for a record held by several archives (the first archive in priority order is "primary"):
- identity: one record per UID (study: StudyInstanceUID; series: SeriesInstanceUID; instance:
  SOPInstanceUID);
- ModalitiesInStudy (0008,0061): the union, sorted;
- NumberOfStudyRelatedSeries / Instances, NumberOfSeriesRelatedInstances: the largest count any
  archive reports. That is exact when one archive holds the whole study and a lower bound when a
  study is split; a series-level search gives exact figures;
- every other attribute: the primary's value, or the first archive that has one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITIES = "00080061"
COUNTS = ("00201206", "00201208", "00201209")
KEYS = {"study": STUDY_UID, "series": SERIES_UID, "instance": SOP_UID}

Record = dict[str, Any]


class RawNumber(str):
    """A JSON number kept as the text the archive wrote."""


def loads(body: bytes) -> list[Record]:
    """Parse a DICOM JSON array, keeping number text; ValueError if it is not an array of objects."""
    data = json.loads(body, parse_float=RawNumber, parse_int=RawNumber)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError("not a JSON array of objects")
    return data


def dumps(records: Iterable[Any]) -> bytes:
    """Serialise compactly, writing RawNumber text as it came."""
    out: list[str] = []
    _write(list(records), out)
    return "".join(out).encode()


def _write(obj: Any, out: list[str]) -> None:
    if isinstance(obj, RawNumber):
        out.append(str(obj))
    elif isinstance(obj, str):
        out.append(json.dumps(obj, ensure_ascii=False))
    elif isinstance(obj, dict):
        out.append("{")
        for i, (k, v) in enumerate(obj.items()):
            if i:
                out.append(",")
            out.append(json.dumps(k))
            out.append(":")
            _write(v, out)
        out.append("}")
    elif isinstance(obj, list):
        out.append("[")
        for i, v in enumerate(obj):
            if i:
                out.append(",")
            _write(v, out)
        out.append("]")
    else:
        out.append(json.dumps(obj))


def value(record: Record, tag: str) -> Any:
    """The first value of an attribute, or None."""
    attr = record.get(tag)
    if not isinstance(attr, dict):
        return None
    values = attr.get("Value")
    return values[0] if isinstance(values, list) and values else None


def _int(v: Any) -> int | None:
    try:
        return int(str(v))
    except (TypeError, ValueError):
        return None


def _combine(primary: Record, other: Record) -> None:
    for tag, attr in other.items():
        if tag not in primary or value(primary, tag) is None and value(other, tag) is not None:
            primary[tag] = attr
    mods = {str(v) for r in (primary, other) for v in (r.get(MODALITIES, {}).get("Value") or [])}
    if mods:
        primary[MODALITIES] = {"vr": "CS", "Value": sorted(mods)}
    for tag in COUNTS:
        counts = [c for c in (_int(value(primary, tag)), _int(value(other, tag))) if c is not None]
        if counts:
            primary[tag] = {"vr": "IS", "Value": [RawNumber(str(max(counts)))]}


def merge(results: list[tuple[str, list[Record]]], level: str) -> tuple[list[Record], dict[str, list[str]]]:
    """De-duplicate records from archives given in priority order.

    Returns the merged records and, for each study UID seen, the archives that reported it (in
    priority order), which the locator learns from.
    """
    key = KEYS[level]
    merged: dict[str, Record] = {}
    anonymous: list[Record] = []
    where: dict[str, list[str]] = {}
    for archive, records in results:
        for rec in records:
            study = value(rec, STUDY_UID)
            if isinstance(study, str) and archive not in where.setdefault(study, []):
                where[study].append(archive)
            uid = value(rec, key)
            if not isinstance(uid, str):
                anonymous.append(rec)
            elif uid in merged:
                _combine(merged[uid], rec)
            else:
                merged[uid] = dict(rec)
    return [*merged.values(), *anonymous], where


def _text(record: Record, tag: str) -> str:
    v = value(record, tag)
    return "" if v is None else str(v)


def order(records: list[Record], level: str) -> list[Record]:
    """Deterministic global order.

    studies: StudyDate, StudyTime newest first, then StudyInstanceUID; series: by study as above,
    then SeriesNumber, then SeriesInstanceUID; instances: by series, then InstanceNumber, then
    SOPInstanceUID. Records without a date come last.
    """
    def numeric(record: Record, tag: str) -> tuple[int, int]:
        n = _int(value(record, tag))
        return (0, n) if n is not None else (1, 0)

    out = sorted(records, key=lambda r: (_text(r, STUDY_UID), numeric(r, "00200011"), _text(r, SERIES_UID),
                                         numeric(r, "00200013"), _text(r, SOP_UID)))
    # Newest first: stable sorts, least significant key first.
    out.sort(key=lambda r: _text(r, "00080030"), reverse=True)
    out.sort(key=lambda r: _text(r, "00080020"), reverse=True)
    out.sort(key=lambda r: not _text(r, "00080020"))
    return out


def page(records: list[Record], offset: int, limit: int | None) -> tuple[list[Record], int]:
    """The slice [offset, offset + limit) and how many records remain after it."""
    end = len(records) if limit is None or limit == 0 else offset + limit
    chunk = records[offset:end]
    return chunk, max(0, len(records) - max(end, offset))
