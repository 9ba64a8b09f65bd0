"""URLs in payloads, number text and QIDO query handling (PS3.18 §8.3.4), through the proxy.

Upstream is the real Orthanc A. Expected results come from Orthanc directly or from the generated data.
"""

from __future__ import annotations

import io
import re

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from support import ProxyProcess, instance_path

from proxy.demo.synth import VL_WSM, Patient, Study, ct_series, to_part10

PUBLIC = "https://imaging.example.org"
FUZZY_TEXT = "The fuzzymatching parameter is not supported. Only literal matching has been performed."


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30.0, trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def nested(orthanc_a):
    """An instance with binary data inside a sequence item (IconImageSequence), stored in Orthanc A."""
    study = Study(Patient("URLS^NESTED", "PID902"), accession="ACC902", description="NESTED BULK")
    ds = next(ct_series(study, 1, rows=32, cols=32, seed=3))
    icon = Dataset()
    icon.Rows = icon.Columns = 8
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = bytes(range(64))
    icon["PixelData"].VR = "OB"
    ds.IconImageSequence = Sequence([icon])
    ds = dcmread(io.BytesIO(to_part10(ds)))
    orthanc_a.store([ds])
    return ds


@pytest.fixture(scope="module")
def public_proxy(orthanc_a, tmp_path_factory):
    with ProxyProcess({"a": orthanc_a.dicomweb_url}, tmp_path_factory.mktemp("proxy_public"),
                      extra_args=["--public-url", PUBLIC]) as proxy:
        yield proxy


def _bulk_uris(obj):
    if isinstance(obj, list):
        return [u for item in obj for u in _bulk_uris(item)]
    if isinstance(obj, dict):
        return ([obj["BulkDataURI"]] if "BulkDataURI" in obj else []) + \
            [u for k, v in obj.items() if k != "BulkDataURI" for u in _bulk_uris(v)]
    return []


def _urls(client, base, headers, ct0, nested):
    """Every URL the proxy writes: RetrieveURLs at three QIDO levels, BulkDataURIs at any depth, and the
    Content-Location of frame parts."""
    urls = []
    for path in ("/studies", f"/studies/{ct0.StudyInstanceUID}/series",
                 f"/studies/{nested.StudyInstanceUID}/series/{nested.SeriesInstanceUID}/instances"):
        response = client.get(base + path, headers=headers)
        assert response.status_code == 200, response.text
        urls += [r["00081190"]["Value"][0] for r in response.json()]
    metadata = client.get(base + instance_path(nested) + "/metadata", headers=headers).json()
    bulk = _bulk_uris(metadata)
    assert any("/bulk/00880200/1/7fe00010" in u for u in bulk), bulk  # the one inside the sequence
    urls += bulk
    frames = client.get(base + instance_path(ct0) + "/frames/1",
                        headers={**headers, "Accept": "multipart/related; type=application/octet-stream"})
    urls += re.findall(r"Content-Location: (\S+)", frames.content[:1000].decode("latin-1"))
    return urls


@pytest.mark.parametrize("scenario", ["plain", "public-url", "forwarded", "host-without-port"])
def test_every_url_points_at_the_proxy(request, client, proxy_a, demo_data, nested, scenario):
    """RetrieveURL, BulkDataURI at any depth and Content-Location use the proxy's external base:
    the request's own host and port; `--public-url` when configured (it wins over headers); a trusted
    (loopback) `Forwarded: host=...;proto=...`; and the real port when `Host` has none (dicomweb-client)."""
    proxy, headers = proxy_a, {}
    expected = proxy_a.dicomweb_url
    if scenario == "public-url":
        proxy = request.getfixturevalue("public_proxy")
        headers, expected = {"Forwarded": "host=x.example:9;proto=https"}, PUBLIC + "/dicomweb"
    elif scenario == "forwarded":
        headers, expected = {"Forwarded": "host=x.example:9;proto=https"}, "https://x.example:9/dicomweb"
    elif scenario == "host-without-port":
        headers = {"Host": "127.0.0.1"}
    urls = _urls(client, proxy.dicomweb_url, headers, demo_data.archive_a[0], nested)
    assert len(urls) >= 5
    wrong = [u for u in urls if not u.startswith(expected + "/studies/")]
    assert not wrong, wrong


def test_nested_bulkdata_uri_serves_the_item_value(client, proxy_a, nested):
    """The rewritten BulkDataURI of the sequence item's PixelData serves that value."""
    metadata = client.get(proxy_a.dicomweb_url + instance_path(nested) + "/metadata").json()
    uri = metadata[0]["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    response = client.get(uri, headers={"Accept": "application/octet-stream"})
    assert response.status_code == 200
    assert response.content == nested.IconImageSequence[0].PixelData


def test_metadata_number_text_is_untouched(client, proxy_a, orthanc_a, demo_data):
    """The proxy never re-serialises JSON. Slice 0's RescaleSlope is DS "1.50"; whatever number text
    Orthanc sends for it, the proxy sends the same, and the bodies are equal once the base URLs are."""
    ct0 = demo_data.archive_a[0]
    assert ct0.RescaleSlope.original_string == "1.50"
    for path in (instance_path(ct0) + "/metadata", f"/studies/{ct0.StudyInstanceUID}/metadata"):
        direct = client.get(orthanc_a.dicomweb_url + path).content
        via = client.get(proxy_a.dicomweb_url + path).content
        slope = re.search(rb'"00281053"\s*:\s*\{\s*"Value"\s*:\s*\[\s*([^\s\]]+)', direct)
        assert slope and float(slope.group(1)) == float(ct0.RescaleSlope)
        assert slope.group(0) in via
        assert direct.replace(orthanc_a.dicomweb_url.encode(), proxy_a.dicomweb_url.encode()) == via


def _study_uids(response):
    assert response.status_code == 200, response.text
    return [r["0020000D"]["Value"][0] for r in response.json()]


def test_backslash_uid_list(client, proxy_a, orthanc_a, demo_data):
    """OHIF joins StudyInstanceUIDs with a backslash (PS3.18 wants commas); Orthanc finds nothing for
    that, the proxy sends a comma list and both studies come back."""
    wanted = {demo_data.uids["ct_study"], demo_data.uids["slide_study"]}
    params = {"StudyInstanceUID": "\\".join(sorted(wanted))}
    assert client.get(orthanc_a.dicomweb_url + "/studies", params=params).json() == []
    assert set(_study_uids(client.get(proxy_a.dicomweb_url + "/studies", params=params))) == wanted


@pytest.mark.parametrize("query, study", [
    ("PatientName=DOE%2A", "ct_study"),
    ("PatientName=doe%2a", "ct_study"),
    ("StudyDescription=SHARED%20STUDY", "split_study"),
    ("StudyDescription=SHARED+STUDY", "split_study"),
])
def test_percent_encoded_values_match(client, proxy_a, orthanc_a, demo_data, query, study):
    """Orthanc does not percent-decode (0 matches direct); the proxy decodes and re-sends the value in a
    form Orthanc matches."""
    assert client.get(f"{orthanc_a.dicomweb_url}/studies?{query}").json() == []
    assert _study_uids(client.get(f"{proxy_a.dicomweb_url}/studies?{query}")) == [demo_data.uids[study]]


def test_no_match_is_200_with_an_empty_array(client, proxy_a, orthanc_a):
    """No matches is `200 []` by default, as the archive itself answers (clients built on Orthanc's DICOMweb
    plugin fail on a 204: tests/test_orthanc_client_e2e.py)."""
    direct = client.get(orthanc_a.dicomweb_url + "/studies", params={"PatientName": "NOBODY*"})
    response = client.get(proxy_a.dicomweb_url + "/studies", params={"PatientName": "NOBODY*"})
    assert (direct.status_code, direct.json()) == (200, [])
    assert response.status_code == 200 and response.json() == []
    assert response.headers["content-type"] == "application/dicom+json" and "warning" not in response.headers


def test_no_match_is_204_when_configured(orthanc_a, tmp_path):
    """`empty_search_status = 204`: no matches is 204 with an empty body (PS3.18's No Content)."""
    with ProxyProcess({"a": orthanc_a.dicomweb_url}, tmp_path, env={"DICOMWEB_EDGE_EMPTY_SEARCH_STATUS": "204"}) \
            as proxy:
        response = httpx.get(proxy.dicomweb_url + "/studies", params={"PatientName": "NOBODY*"}, trust_env=False)
    assert response.status_code == 204 and response.content == b""


@pytest.mark.parametrize("path, query", [
    ("/studies", "limit=1&offset=1"),
    ("/studies", "limit=2"),
    ("/studies", "offset=1"),
    ("/instances", "limit=3&offset=2"),
])
def test_limit_and_offset_are_passed_on(client, proxy_a, orthanc_a, path, query):
    """The page is the archive's page for the same limit and offset."""
    direct = client.get(f"{orthanc_a.dicomweb_url}{path}?{query}").json()
    assert direct
    via = client.get(f"{proxy_a.dicomweb_url}{path}?{query}")
    assert via.status_code == 200
    strip = [{k: v for k, v in r.items() if k != "00081190"} for r in via.json()]
    assert strip == [{k: v for k, v in r.items() if k != "00081190"} for r in direct]


def test_fuzzymatching_true_gives_the_standard_warning(client, proxy_a, demo_data):
    """Orthanc ignores fuzzymatching=true silently; the proxy says so with the Warning of PS3.18 §8.3.4.2."""
    url = proxy_a.dicomweb_url + "/studies"
    fuzzy = client.get(url, params={"PatientName": "DOE*", "fuzzymatching": "true"})
    assert _study_uids(fuzzy) == [demo_data.uids["ct_study"]]
    warning = fuzzy.headers.get("warning", "")
    assert re.fullmatch(r"299 \S+: " + re.escape(FUZZY_TEXT), warning), warning
    literal = client.get(url, params={"PatientName": "DOE*", "fuzzymatching": "false"})
    assert _study_uids(literal) == _study_uids(fuzzy)
    assert "warning" not in literal.headers


@pytest.mark.parametrize("query", ["limit=abc", "offset=-1", "StudyInstanceUID=1.2.x", "StudyDate=2024",
                                   "Bogus=1", "fuzzymatching=maybe", "includefield=NotAnAttribute"])
def test_malformed_query_is_400_with_a_short_reason(client, proxy_a, query):
    """The proxy validates the query; Orthanc would ignore some of these and answer 200."""
    response = client.get(f"{proxy_a.dicomweb_url}/studies?{query}")
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == 400 and 0 < len(body["reason"]) < 120


def test_qido_xml_is_406(client, proxy_a):
    """The proxy offers search results as JSON only; `application/dicom+xml` alone is 406."""
    response = client.get(proxy_a.dicomweb_url + "/studies", headers={"Accept": "application/dicom+xml"})
    assert response.status_code == 406
    assert response.json()["status"] == 406


def test_search_levels_for_the_slide(client, proxy_a, demo_data):
    """Series and instance searches under a study give that study's UIDs."""
    slide = next(ds for ds in demo_data.archive_a if ds.SOPClassUID == VL_WSM)
    base = f"{proxy_a.dicomweb_url}/studies/{slide.StudyInstanceUID}"
    series = client.get(base + "/series").json()
    assert [s["0020000E"]["Value"][0] for s in series] == [slide.SeriesInstanceUID]
    instances = client.get(base + "/instances").json()
    assert [i["00080018"]["Value"][0] for i in instances] == [slide.SOPInstanceUID]
