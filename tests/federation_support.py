"""Helpers for the federation tests: a TOML config writer, and what a search should return, worked out
from the datasets each archive was given (never from the proxy's own merge code)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
from pydicom.dataset import Dataset

from proxy.config.schema import SECTIONS

NO_CACHE = {"Cache-Control": "no-cache"}
STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"
MODALITIES, RETRIEVE_URL = "00080061", "00081190"
N_SERIES, N_STUDY_INSTANCES, N_SERIES_INSTANCES = "00201206", "00201208", "00201209"


def write_config(path: Path, archives: Iterable[Mapping[str, Any]], **settings: Any) -> Path:
    """A proxy TOML file: `settings` (by key) each in its section, then one `[[archives]]` table per archive."""
    placed = {key for keys in SECTIONS.values() for key in keys}
    assert set(settings) <= placed, f"not keys of any section: {sorted(set(settings) - placed)}"
    lines = []
    for section, keys in SECTIONS.items():
        if given := [f"{k} = {json.dumps(v)}" for k, v in settings.items() if k in keys]:
            lines += [f"[{section}]", *given, ""]
    for archive in archives:
        lines += ["[[archives]]"]
        for k, v in archive.items():
            if isinstance(v, Mapping):
                lines.append(f"{k} = {{ " + ", ".join(f"{ik} = {json.dumps(iv)}" for ik, iv in v.items()) + " }")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def value(record: Mapping[str, Any], tag: str) -> Any:
    """First value of a DICOM JSON attribute, or None."""
    values = record.get(tag, {}).get("Value") or [None]
    return values[0]


def column(response: httpx.Response, tag: str) -> list[Any]:
    """One attribute of every record of a search response (204 or `[]`: none)."""
    if response.status_code == 204:
        return []
    assert response.status_code == 200, response.text
    return [value(r, tag) for r in response.json()]


def warnings(response: httpx.Response) -> list[str]:
    """Every Warning header value of a response."""
    return response.headers.get_list("warning")


def study_uids(datasets: Iterable[Dataset]) -> set[str]:
    return {str(ds.StudyInstanceUID) for ds in datasets}


def held(dicomweb_url: str) -> dict[str, tuple[str, str]]:
    """What an archive itself says it holds: StudyInstanceUID → (StudyDate, StudyTime).

    The session archives are shared: other test modules store studies of their own into them.
    """
    r = httpx.get(f"{dicomweb_url}/studies", trust_env=False, timeout=30.0)
    assert r.status_code in (200, 204), r.text
    return {value(rec, STUDY): (value(rec, "00080020") or "", value(rec, "00080030") or "")
            for rec in (r.json() if r.status_code == 200 else [])}


def newest_first(studies: Mapping[str, tuple[str, str]]) -> list[str]:
    """Study UIDs in the documented order: StudyDate desc, StudyTime desc, StudyInstanceUID; no date last."""
    out = sorted(studies)
    out.sort(key=lambda uid: studies[uid][1], reverse=True)
    out.sort(key=lambda uid: studies[uid][0], reverse=True)
    out.sort(key=lambda uid: not studies[uid][0])
    return out


def holdings(datasets: Iterable[Dataset], study: str) -> tuple[int, int, set[str]]:
    """What one archive reports for a study: (series count, instance count, modalities)."""
    mine = [ds for ds in datasets if ds.StudyInstanceUID == study]
    return len({ds.SeriesInstanceUID for ds in mine}), len({ds.SOPInstanceUID for ds in mine}), \
        {str(ds.Modality) for ds in mine}
