"""QIDO query validation, translation per archive profile (Orthanc takes values raw, no percent-decoding), and
the edge matching of records an archive found with a broadened query."""

import pytest

from proxy.dicomweb.query import Match, edge_matches, keep, parse_query, translate
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


def _pn(alphabetic: str, ideographic: str = "") -> dict:
    value = {"Alphabetic": alphabetic} | ({"Ideographic": ideographic} if ideographic else {})
    return {"00100010": {"vr": "PN", "Value": [value]}}


@pytest.mark.parametrize(("query", "sent"), [
    ("PatientName=M%C3%9CLLER*", "PatientName=M*LLER*"),
    ("PatientName=%E5%B1%B1%E7%94%B0*", "PatientName=*"),  # a run of wildcards is one
    ("StudyDescription=CT%20%C3%A9t%C3%A9", "StudyDescription=CT?*t*"),
])
def test_orthanc_is_asked_with_wildcards_and_every_other_profile_with_the_value(query, sent):
    q = parse_query(query)
    assert translate(q, PROFILES["orthanc"]) == sent
    assert len(edge_matches(q, PROFILES["orthanc"])) == 1
    for name in ("generic", "dcm4chee", "google", "azure"):
        assert translate(q, PROFILES[name]) == query  # percent-encoded UTF-8, as asked
        assert edge_matches(q, PROFILES[name]) == []


def test_a_value_sent_as_asked_needs_no_edge_match():
    q = parse_query("PatientName=DOE*&StudyDate=20240101-&00100020=PID%2A")
    assert edge_matches(q, PROFILES["orthanc"]) == []


def test_person_names_match_any_group_without_regard_to_case():
    m = Match.of("00100010", "PN", "müller*")
    assert keep([_pn("MÜLLER^HANS"), _pn("MULLER^ANNA"), _pn("Yamada^Taro", "山田^太郎")], [m]) == [_pn("MÜLLER^HANS")]
    assert Match.of("00100010", "PN", "山田*").accepts(_pn("Yamada^Taro", "山田^太郎"))
    assert Match.of("00100010", "PN", "Yamada^Taro=山田^太郎").accepts(_pn("Yamada^Taro", "山田^太郎"))


def test_other_text_matches_exactly_with_wildcards():
    record = {"00081030": {"vr": "LO", "Value": ["CT été"]}}
    assert Match.of("00081030", "LO", "CT ?t*").accepts(record)
    assert not Match.of("00081030", "LO", "ct été").accepts(record)  # case matters outside names
    assert not Match.of("00081030", "LO", "CT").accepts(record)  # no wildcard: the whole value


def test_a_record_without_the_attribute_is_kept():
    assert Match.of("00100010", "PN", "MÜLLER*").accepts({"0020000D": {"vr": "UI", "Value": ["1.2.3"]}})
    assert Match.of("00100010", "PN", "MÜLLER*").accepts({"00100010": {"vr": "PN"}})
