"""Quirks profiles: what one representative query becomes for each kind of archive, and which recorded
search answers mean "no matches" (204, `200 []` and an empty body all do)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from proxy.dicomweb.query import FUZZY_WARNING, parse_query, translate, warnings_for
from proxy.dicomweb.search import is_empty
from proxy.upstream.profiles import PROFILES

RECORDED = Path(__file__).parent / "data" / "recorded"

# A wildcard sent as %2A, a space, a backslash UID list (as OHIF sends it), fuzzy matching, limit 500.
QUERY = "PatientName=DOE%2A%20J&StudyInstanceUID=1.2.3%5C4.5.6&fuzzymatching=true&limit=500"

EXPECTED = {
    # Orthanc does not percent-decode: values go raw, a space becomes the one-character wildcard; UID lists
    # use commas; fuzzymatching=true is dropped (the proxy adds the standard Warning); limit=0 means "all".
    "orthanc": "PatientName=DOE*?J&StudyInstanceUID=1.2.3,4.5.6&limit=500",
    # dcm4chee: limit 1..99999.
    "dcm4chee": "PatientName=DOE*%20J&StudyInstanceUID=1.2.3,4.5.6&fuzzymatching=true&limit=500",
    # Google: limit up to 5000 (profile's cap).
    "google": "PatientName=DOE*%20J&StudyInstanceUID=1.2.3,4.5.6&fuzzymatching=true&limit=500",
    # Azure: limit 1..200, 400 above it: clamped.
    "azure": "PatientName=DOE*%20J&StudyInstanceUID=1.2.3,4.5.6&fuzzymatching=true&limit=200",
    # AWS HealthImaging: no fuzzymatching among its documented query keys (tests/data/healthimaging.json).
    "aws": "PatientName=DOE*%20J&StudyInstanceUID=1.2.3,4.5.6&limit=500",
    # Anything else: the standard, nothing more.
    "generic": "PatientName=DOE*%20J&StudyInstanceUID=1.2.3,4.5.6&fuzzymatching=true&limit=500",
}


def test_every_profile_is_covered():
    assert set(EXPECTED) == set(PROFILES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_representative_query_per_profile(name):
    q = parse_query(QUERY)
    assert translate(q, PROFILES[name]) == EXPECTED[name]
    archive = SimpleNamespace(profile=PROFILES[name])
    assert warnings_for(q, archive) == ([] if PROFILES[name].fuzzy_matching else [FUZZY_WARNING])  # type: ignore[arg-type]


def test_federated_paging_asks_within_each_cap():
    """What `_fetch_all` sends for a page: the proxy's own page size, clamped to the profile's cap."""
    q = parse_query(QUERY)
    assert translate(q, PROFILES["azure"], limit=10001, offset=200).endswith("&limit=200&offset=200")
    assert translate(q, PROFILES["orthanc"], limit=10001, offset=0).endswith("&limit=10001")


@pytest.mark.parametrize("body", [b"", b"[]", b" [ ] ", b"\r\n", b"[\n]\n", b"[\n\t\n]"])
def test_empty_search_bodies(body):
    assert is_empty(body)


@pytest.mark.parametrize("body", [b'[{"0020000D": {"vr": "UI"}}]', b"{}", b"[ x ]"])
def test_non_empty_search_bodies(body):
    assert not is_empty(body)


@pytest.mark.parametrize("path", sorted(RECORDED.glob("*.json")), ids=lambda p: p.stem)
def test_recorded_shapes(path):
    """Each recording says where it comes from; its body is empty exactly when it holds no record."""
    shape = json.loads(path.read_text())
    assert shape["source"] and "\n" not in shape["source"]
    assert shape["profile"] in PROFILES and shape["status"] in (200, 204)
    body = shape["body"].encode()
    assert is_empty(body) == (not body.strip() or json.loads(body) == [])
