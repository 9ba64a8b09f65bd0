"""jsonbody.parses: the archive JSON check accepts exactly what `json.loads` accepts (issue 7 point 7),
without building the document (issue 4: a cold viewer's series metadata waited 12-29 ms on the parse)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.upstream.jsonbody import parses


def _json_loads_accepts(body: bytes) -> bool:
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


def _metadata(instances: int) -> bytes:
    """Series metadata shaped like Orthanc's (tab-indented, one object per instance)."""
    docs = [{
        "00080018": {"vr": "UI", "Value": [f"2.25.{1000 + i}"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jörg", "Ideographic": "山田^太郎"}]},
        "00280030": {"vr": "DS", "Value": [0.703125, 0.703125]},
        "00200013": {"vr": "IS", "Value": [i + 1]},
        "7FE00010": {"vr": "OW", "BulkDataURI": f"http://127.0.0.1:8042/dicom-web/studies/1.2/series/3.4/instances/"
                                                f"2.25.{1000 + i}/bulk/7fe00010"},
        "00081115": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.2.3"]}}]},
    } for i in range(instances)]
    return json.dumps(docs, indent="\t", ensure_ascii=False).encode()


@pytest.mark.parametrize("body", [
    b"[]", b"[1.50, -0, 1e3]", b'{"a": [true, false, null]}', b' \n [ "\\u00e9\\n" ] \t', b'"x"', b"3",
    b"[NaN]", b"[Infinity]", b"[-Infinity]", b'["\\ud800"]',  # json.loads's leniencies stay accepted
    _metadata(3),
])
def test_valid_documents_pass(body: bytes) -> None:
    assert _json_loads_accepts(body)
    assert parses(body)


@pytest.mark.parametrize("body", [
    _metadata(3)[:-7],  # truncated by a connection that closed early
    b"<html><body>502 Bad Gateway</body></html>",  # an error page sent with 200
    b"[1, 2] trailing", b"[1, 2]]", b"[1,]", b'{"a": 1,}', b"[01]", b"[1.5e]", b"[-]", b'["\\q"]',
    b'["\x01"]',  # a raw control character inside a string
    b'["\xff\xfe"]', b'["caf\xe9"]',  # bytes that are not UTF-8 (Latin-1 from a misconfigured archive)
    b"\x00" * 16,
])
def test_garbage_fails(body: bytes) -> None:
    assert not _json_loads_accepts(body)
    assert not parses(body)


def test_agrees_with_json_loads_on_damaged_metadata() -> None:
    """Random byte flips, deletions and insertions of JSON punctuation in real-shaped metadata: the fast
    check and json.loads accept and refuse the same documents (a fixed seed, so a failure repeats)."""
    base = _metadata(2)
    rnd = random.Random(20261126)
    accepted = refused = 0
    for _ in range(4000):
        body = bytearray(base)
        for _ in range(rnd.randint(1, 3)):
            at, op = rnd.randrange(len(body)), rnd.random()
            if op < 0.4:
                body[at] = rnd.randrange(256)
            elif op < 0.7:
                del body[at]
            else:
                body.insert(at, rnd.choice(b'{}[]",:0123456789eE.-\\ ntf\t'))
        expected = _json_loads_accepts(bytes(body))
        assert parses(bytes(body)) == expected, bytes(body)
        accepted += expected
        refused += not expected
    assert accepted > 300 and refused > 1000  # both kinds were exercised


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=20), st.booleans())
def test_any_json_document_passes(doc: object, ascii_only: bool) -> None:
    body = json.dumps(doc, ensure_ascii=ascii_only).encode()
    assert parses(body)
    if len(body) > 1:
        assert parses(body[:-1]) == _json_loads_accepts(body[:-1])  # cut short: both agree (mostly refused)
