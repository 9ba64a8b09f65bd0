"""Issue requirement: `dicomweb-client` pointed at the proxy does everything it does pointed at Orthanc.

Two clients, one on Orthanc A directly and one on the proxy in front of it. Every payload is compared with
the direct one (URLs aside) or with the generated datasets. Where the direct call fails because of an
Orthanc 1.7 quirk (docs/archive-behaviour.md), the test asserts that failure too: it is what the proxy
fixes.
"""

from __future__ import annotations

import io
from urllib.parse import urlsplit

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.encaps import generate_frames
from support import dicomweb_client, orthanc_file

from proxy.demo.synth import VL_WSM, Patient, Study, ct_series, to_part10

OCTET_ANY = (("application/octet-stream", "*"),)


def _client(url: str) -> DICOMwebClient:
    return dicomweb_client(url)  # (no retries: a 503 answered once fails the test)


@pytest.fixture(scope="module")
def direct(orthanc_a):
    return _client(orthanc_a.dicomweb_url)


@pytest.fixture(scope="module")
def via(proxy_a):
    return _client(proxy_a.dicomweb_url)


@pytest.fixture(scope="module")
def ct0(demo_data):
    """CT slice 0 of archive A (512x512, 16 bit, native)."""
    return demo_data.archive_a[0]


@pytest.fixture(scope="module")
def slide(demo_data):
    """The JPEG Baseline multi-frame slide of archive A."""
    return next(ds for ds in demo_data.archive_a if ds.SOPClassUID == VL_WSM)


def _ids(ds):
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _without(obj, keys=("00081190", "BulkDataURI")):
    """A DICOM JSON value with every URL-bearing member removed, at any depth."""
    if isinstance(obj, list):
        return [_without(v, keys) for v in obj]
    if isinstance(obj, dict):
        return {k: _without(v, keys) for k, v in obj.items() if k not in keys}
    return obj


def _values(obj, key):
    """Every value of `key` in a DICOM JSON document, at any depth."""
    if isinstance(obj, list):
        return [v for item in obj for v in _values(item, key)]
    if isinstance(obj, dict):
        found = [obj[key]] if key in obj else []
        return found + [v for k, item in obj.items() if k != key for v in _values(item, key)]
    return []


def _retrieve_urls(results):
    return [url for r in results for url in r.get("00081190", {}).get("Value", [])]


@pytest.mark.parametrize("call, args", [
    ("search_for_studies", ()),
    ("search_for_series", ()),
    ("search_for_series", ("ct_study",)),
    ("search_for_instances", ()),
    ("search_for_instances", ("ct_study",)),
    ("search_for_instances", ("ct_study", "ct_series")),
])
def test_search_at_every_level_matches_direct(direct, via, proxy_a, demo_data, call, args):
    """QIDO at all levels: the same results as Orthanc, RetrieveURLs pointing at the proxy."""
    uids = [demo_data.uids[a] for a in args]
    expected = getattr(direct, call)(*uids)
    got = getattr(via, call)(*uids)
    assert expected, "the archive has data at this level"
    assert _without(got) == _without(expected)
    urls = _retrieve_urls(got)
    assert len(urls) == len(got)
    assert all(url.startswith(proxy_a.dicomweb_url + "/studies/") for url in urls), urls


def test_search_paging_and_fields_match_direct(direct, via):
    """limit, offset and includefield reach the archive unchanged; paging to the end with
    `get_remaining` stops on the proxy's `200 []` as it does on Orthanc's."""
    for kwargs in ({"limit": 1, "offset": 1}, {"fields": ["StudyDescription"]},
                   {"search_filters": {"StudyDate": "20230101-20241231"}}, {"limit": 1, "get_remaining": True}):
        expected = direct.search_for_studies(**kwargs)
        assert expected
        assert _without(via.search_for_studies(**kwargs)) == _without(expected)


def test_wildcard_search_works_through_the_proxy_only(direct, via, demo_data):
    """dicomweb-client sends `PatientName=DOE%2A`; Orthanc does not percent-decode and finds nothing
    (docs/archive-behaviour.md). The proxy decodes and re-sends the wildcard raw, so the study is found."""
    filters = {"PatientName": "DOE*"}
    assert direct.search_for_studies(search_filters=filters) == []
    found = via.search_for_studies(search_filters=filters)
    assert [r["0020000D"]["Value"][0] for r in found] == [demo_data.uids["ct_study"]]


def _by_sop(datasets):
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def _assert_same_instances(got, expected):
    got, expected = _by_sop(got), _by_sop(expected)
    assert expected and got.keys() == expected.keys()
    for sop, ds in expected.items():
        assert got[sop].file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert got[sop].PixelData == ds.PixelData


def test_retrieve_study_series_instance_match_direct(direct, via, demo_data, ct0, slide):
    """retrieve_study / retrieve_series / retrieve_instance: the same instances and pixel bytes."""
    ct_study, ct_series_uid = demo_data.uids["ct_study"], demo_data.uids["ct_series"]
    study = via.retrieve_study(ct_study)
    _assert_same_instances(study, direct.retrieve_study(ct_study))
    generated = [ds for ds in demo_data.archive_a if ds.StudyInstanceUID == ct_study]
    assert {str(ds.SOPInstanceUID) for ds in study} == {str(ds.SOPInstanceUID) for ds in generated}
    _assert_same_instances(via.retrieve_series(ct_study, ct_series_uid),
                           direct.retrieve_series(ct_study, ct_series_uid))
    _assert_same_instances(via.retrieve_study(slide.StudyInstanceUID), direct.retrieve_study(slide.StudyInstanceUID))
    for ds in (ct0, slide):  # retrieve_instance asks for transfer-syntax=*: the stored encoding
        got = via.retrieve_instance(*_ids(ds))
        _assert_same_instances([got], [direct.retrieve_instance(*_ids(ds))])
        assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert got.PixelData == ds.PixelData


def test_metadata_matches_direct_with_bulkdata_uris_at_the_proxy(direct, via, proxy_a, demo_data, ct0, slide):
    """Study, series and instance metadata equal Orthanc's except BulkDataURI, which points at the proxy."""
    calls = [("retrieve_study_metadata", (demo_data.uids["ct_study"],)),
             ("retrieve_series_metadata", (slide.StudyInstanceUID, slide.SeriesInstanceUID)),
             ("retrieve_instance_metadata", _ids(ct0))]
    for call, args in calls:
        expected, got = getattr(direct, call)(*args), getattr(via, call)(*args)
        assert _without(got, ("BulkDataURI",)) == _without(expected, ("BulkDataURI",))
        uris = _values(got, "BulkDataURI")
        assert len(uris) == len(_values(expected, "BulkDataURI"))
        assert all(u.startswith(proxy_a.dicomweb_url + "/") for u in uris), uris
    assert _values(via.retrieve_instance_metadata(*_ids(ct0)), "BulkDataURI")  # native PixelData has one


def test_frames_with_any_transfer_syntax_match_direct(direct, via, ct0):
    """Frames with `transfer-syntax=*`: native frame bytes, the same as Orthanc's."""
    got = via.retrieve_instance_frames(*_ids(ct0), frame_numbers=[1], media_types=OCTET_ANY)
    assert got == direct.retrieve_instance_frames(*_ids(ct0), frame_numbers=[1], media_types=OCTET_ANY)
    assert got == [ct0.PixelData]


def test_frames_with_default_media_types_work_through_the_proxy(direct, via, ct0):
    """dicomweb-client's default frames Accept is `multipart/related; type="*/*"`: Orthanc answers 400
    (docs/archive-behaviour.md); the proxy negotiates it and returns the native frame."""
    with pytest.raises(requests.HTTPError) as failed:
        direct.retrieve_instance_frames(*_ids(ct0), frame_numbers=[1])
    assert failed.value.response.status_code == 400
    assert via.retrieve_instance_frames(*_ids(ct0), frame_numbers=[1]) == [ct0.PixelData]


def test_jpeg_frames_are_the_stored_fragments(direct, via, slide):
    """JPEG slide frames with `transfer-syntax=*` are the encapsulated fragments, unchanged."""
    count = int(slide.NumberOfFrames)
    fragments = list(generate_frames(slide.PixelData, number_of_frames=count))
    numbers = [2, count]
    got = via.retrieve_instance_frames(*_ids(slide), frame_numbers=numbers, media_types=OCTET_ANY)
    assert got == direct.retrieve_instance_frames(*_ids(slide), frame_numbers=numbers, media_types=OCTET_ANY)
    assert [bytes(f) for f in got] == [fragments[n - 1] for n in numbers]


def test_bulkdata_through_the_rewritten_uri(direct, via, proxy_a, ct0):
    """`retrieve_bulkdata(BulkDataURI)`: direct, Orthanc's URI has no port because dicomweb-client sends
    `Host: 127.0.0.1` (docs/archive-behaviour.md) and the call fails; the proxy's URI works and gives PixelData."""
    direct_uri = direct.retrieve_instance_metadata(*_ids(ct0))["7FE00010"]["BulkDataURI"]
    assert urlsplit(direct_uri).port is None
    direct.set_http_retry_params(retry=False)  # the failure is certain: do not back off five times
    try:
        with pytest.raises((requests.ConnectionError, requests.HTTPError)):
            direct.retrieve_bulkdata(direct_uri)
    finally:
        direct.set_http_retry_params()
    uri = via.retrieve_instance_metadata(*_ids(ct0))["7FE00010"]["BulkDataURI"]
    assert uri.startswith(proxy_a.dicomweb_url + "/")
    assert [bytes(b) for b in via.retrieve_bulkdata(uri)] == [ct0.PixelData]


def test_rendered_instance_is_the_same_jpeg(direct, via, ct0):
    """retrieve_instance_rendered: a JPEG, byte-identical to Orthanc's rendering."""
    got = via.retrieve_instance_rendered(*_ids(ct0))
    assert got[:3] == b"\xff\xd8\xff"
    assert got == direct.retrieve_instance_rendered(*_ids(ct0))


def test_store_through_the_proxy(direct, via, proxy_a, orthanc_a):
    """store_instances via the proxy: the archive has the instance byte for byte, it can be found and
    retrieved directly, and the response's RetrieveURLs point at the proxy."""
    study = Study(Patient("PARITY^STORE", "PID901"), accession="ACC901", description="STORED VIA PROXY")
    # Read back from Part 10 so that dcmwrite keeps the preamble (a fresh Dataset has none).
    ds = pydicom.dcmread(io.BytesIO(to_part10(next(ct_series(study, 1, rows=64, cols=64, seed=9)))))
    sent = io.BytesIO()
    pydicom.dcmwrite(sent, ds)
    response = via.store_instances([ds])
    assert response.RetrieveURL.startswith(proxy_a.dicomweb_url + "/studies/" + study.study_uid)
    refs = response.ReferencedSOPSequence
    assert [str(r.ReferencedSOPInstanceUID) for r in refs] == [ds.SOPInstanceUID]
    assert refs[0].RetrieveURL.startswith(proxy_a.dicomweb_url + "/")
    assert not response.get("FailedSOPSequence")
    found = direct.search_for_studies(search_filters={"StudyInstanceUID": study.study_uid})
    assert [r["00100010"]["Value"][0]["Alphabetic"] for r in found] == ["PARITY^STORE"]
    assert orthanc_file(orthanc_a, ds.SOPInstanceUID) == sent.getvalue()
    _assert_same_instances([direct.retrieve_instance(*_ids(ds))], [ds])
