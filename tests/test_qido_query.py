"""QIDO query validation and translation per archive profile (Orthanc takes values raw, no percent-decoding)."""

import pytest

from proxy.dicomweb.search import parse_query, translate
from proxy.errors import Problem
from proxy.upstream.profiles import PROFILES

ORTHANC, GENERIC, AZURE = PROFILES["orthanc"], PROFILES["generic"], PROFILES["azure"]


def test_percent_encoded_wildcard_is_sent_raw_to_orthanc():
    q = parse_query("PatientName=DOE%2A&limit=%31")
    assert translate(q, ORTHANC) == "PatientName=DOE*&limit=1"
    assert translate(q, GENERIC) == "PatientName=DOE*&limit=1"


def test_characters_orthanc_cannot_receive_become_single_wildcards():
    q = parse_query("StudyDescription=SHARED%20STUDY")
    assert translate(q, ORTHANC) == "StudyDescription=SHARED?STUDY"
    assert translate(q, GENERIC) == "StudyDescription=SHARED%20STUDY"


def test_backslash_uid_list_becomes_commas():
    """OHIF joins UIDs with a backslash; PS3.18 uses commas."""
    q = parse_query("StudyInstanceUID=1.2.3%5C4.5.6")
    assert translate(q, ORTHANC) == "StudyInstanceUID=1.2.3,4.5.6"


def test_fuzzy_dropped_for_archives_that_ignore_it_and_limit_clamped():
    q = parse_query("fuzzymatching=true&limit=500&offset=10&includefield=00081030,StudyDescription")
    assert translate(q, ORTHANC) == "includefield=00081030,StudyDescription&limit=500&offset=10"
    assert translate(q, AZURE) == "includefield=00081030,StudyDescription&fuzzymatching=true&limit=200&offset=10"


def test_tag_keys_and_vendor_parameters_pass():
    q = parse_query("00100020=PID*&includedefaults=false")
    assert translate(q, GENERIC) == "00100020=PID*&includedefaults=false"


@pytest.mark.parametrize("bad", ["limit=abc", "offset=-1", "StudyInstanceUID=1.2.x", "StudyDate=2024",
                                 "Bogus=1", "fuzzymatching=maybe", "includefield=NotAKeyword", "Study-Date=1"])
def test_malformed_queries_are_400(bad):
    with pytest.raises(Problem) as err:
        parse_query(bad)
    assert err.value.status == 400


def test_date_ranges_are_accepted():
    for v in ("20230101-20241231", "-20220101", "20230101-", "20230101"):
        assert parse_query(f"StudyDate={v}").filters[0][1] == v
