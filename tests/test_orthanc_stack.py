"""Facts about the real upstream (Orthanc 1.10.1 + DICOMweb plugin 1.7) that the proxy design relies on.

These talk to Orthanc directly, without the proxy. If one starts failing after an Orthanc upgrade, the
proxy's quirks profile for Orthanc must change with it. docs/archive-behaviour.md writes each fact up,
with the proxy code that relies on it.
"""

from __future__ import annotations

import re

import httpx
import pytest

DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture
def client():
    # trust_env=False: never route loopback traffic through a proxy from the environment
    with httpx.Client(timeout=30.0, trust_env=False) as c:
        yield c


def _studies(client: httpx.Client, orthanc, query: str) -> httpx.Response:
    # a raw string, not params=: httpx would choose the percent-encoding itself
    response = client.get(f"{orthanc.dicomweb_url}/studies?{query}")
    assert response.status_code == 200, response.text
    assert response.request.url.raw_path.endswith(b"?" + query.encode()), "client re-encoded the query"
    return response


def test_query_string_is_not_percent_decoded(client, orthanc_a, demo_data):
    """Orthanc 1.10.1 does not percent-decode query values: it matches the raw query bytes. `DOE*` is a
    wildcard, `DOE%2A` is taken literally and matches nothing, so the proxy must forward query strings
    byte-for-byte (or re-emit `*` unencoded), never re-encode them."""
    raw = _studies(client, orthanc_a, "PatientName=DOE*").json()
    assert [s["0020000D"]["Value"][0] for s in raw] == [demo_data.uids["ct_study"]]
    assert _studies(client, orthanc_a, "PatientName=DOE%2A").json() == []


def test_multipart_series_retrieve_ends_at_eof(client, orthanc_a, demo_data):
    """A retrieve with more than one part is sent with `Connection: close`, no Content-Length and no
    chunked encoding; the body ends at EOF. The proxy's upstream reader must accept EOF as the end of
    the body."""
    study, series = demo_data.uids["ct_study"], demo_data.uids["ct_series"]
    expected = sum(1 for ds in demo_data.archive_a if ds.SeriesInstanceUID == series)
    response = client.get(f"{orthanc_a.dicomweb_url}/studies/{study}/series/{series}",
                          headers={"Accept": DICOM_ACCEPT})
    assert response.status_code == 200
    assert response.headers["connection"].lower() == "close"
    assert "content-length" not in response.headers
    assert "transfer-encoding" not in response.headers
    content_type = response.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom"')
    boundary = re.search(r"boundary=([^;\s]+)", content_type).group(1).encode()
    body = response.content
    assert body.startswith(b"--" + boundary + b"\r\n")  # no preamble
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n")  # the whole body arrived
    assert body.count(b"\r\n--" + boundary + b"\r\n") == expected - 1


def test_single_part_retrieve_has_content_length(client, orthanc_a, demo_data):
    """The counterpart of the test above: one part is buffered and sent with Content-Length and
    keep-alive (`Keep-Alive: timeout=1`)."""
    ds = demo_data.archive_a[0]
    url = (f"{orthanc_a.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}")
    response = client.get(url, headers={"Accept": DICOM_ACCEPT})
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.headers.get("connection", "").lower() != "close"


def test_empty_qido_is_200_with_empty_array(client, orthanc_a):
    """No matches is `200 []`, never the 204 of PS3.18 §8.3.4.4.1, and there is no Warning header."""
    response = _studies(client, orthanc_a, "PatientName=NOBODY*")
    assert response.headers["content-type"].startswith("application/dicom+json")
    assert response.json() == []
    assert "warning" not in response.headers


@pytest.mark.parametrize("level", ["study", "instance"])
def test_no_thumbnail(client, orthanc_a, demo_data, level):
    """The DICOMweb plugin 1.7 has no `/thumbnail` route (404); a proxy has to synthesise it from
    `/rendered`."""
    ds = demo_data.archive_a[0]
    url = f"{orthanc_a.dicomweb_url}/studies/{ds.StudyInstanceUID}"
    if level == "instance":
        url += f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    assert client.get(url + "/thumbnail").status_code == 404


@pytest.mark.parametrize(("headers", "origin"), [
    ({}, None),  # None: Orthanc's own address, i.e. the Host header httpx sends
    ({"Host": "proxy.example:9000"}, "http://proxy.example:9000"),
    ({"X-Forwarded-Host": "proxy.example:9000", "X-Forwarded-Proto": "https"}, None),
    ({"Forwarded": "host=proxy.example:9000;proto=https"}, "https://proxy.example:9000"),
], ids=["no-header", "host", "x-forwarded-ignored", "forwarded"])
def test_bulkdata_uri_is_absolute_and_built_from_host(client, orthanc_a, demo_data, headers, origin):
    """BulkDataURI is an absolute URL built from the request's Host header (or RFC 7239 `Forwarded`;
    `X-Forwarded-*` is ignored), always under Orthanc's own `/dicom-web` root. The proxy must rewrite it
    (or send a Host it can rewrite)."""
    ds = demo_data.archive_a[0]
    path = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")
    response = client.get(orthanc_a.url + path + "/metadata", headers=headers)
    assert response.status_code == 200
    [instance] = response.json()
    expected = (origin or orthanc_a.url) + path + "/bulk/7fe00010"
    assert instance["7FE00010"] == {"vr": "OW", "BulkDataURI": expected}
