"""Accept negotiation and multipart framing through the proxy, against the real Orthanc.

The proxy negotiates itself and sends Orthanc one media range it is known to accept, then re-frames
the answer under its own boundary with truthful part headers. Expectations come from Orthanc directly
(its stored files) or from the generated datasets.
"""

from __future__ import annotations

import re

import httpx
import pytest
from pydicom.encaps import generate_frames
from support import instance_path, orthanc_file, split_multipart

from proxy.demo.synth import VL_WSM

EVLE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
CORNERSTONE = "multipart/related; type=application/octet-stream; transfer-syntax=*"
DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ORTHANC_BOUNDARY = re.compile(rb"--[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-")


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30.0, trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def ct0(demo_data):
    return demo_data.archive_a[0]


@pytest.fixture(scope="module")
def slide(demo_data):
    return next(ds for ds in demo_data.archive_a if ds.SOPClassUID == VL_WSM)


@pytest.fixture(scope="module")
def fragments(slide):
    return list(generate_frames(slide.PixelData, number_of_frames=int(slide.NumberOfFrames)))


def _proxy_problem(response, status):
    """The proxy's own error (short JSON), not Orthanc's (which would be a 400 with `HttpError`)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and body["reason"] and "HttpError" not in body
    return body["reason"]


def _header(headers, name):
    values = [v for k, v in headers if k == name]  # exact spelling, as cornerstone matches it
    assert len(values) == 1, f"{name!r} in {headers}"
    return values[0]


@pytest.mark.parametrize("what, accept", [
    ("frames", "text/html"),
    ("series", "image/png"),
    ("study", "application/dicom"),  # single-part type on a multi-instance resource: 406 (PS3.18 §10.4.4)
    ("frames", 'multipart/related; type="application/dicom"'),
    ("frames", 'multipart/related; type="image/jpeg"; transfer-syntax=*'),
])
def test_nothing_acceptable_is_406_from_the_proxy(client, proxy_a, ct0, what, accept):
    """Nothing acceptable: the proxy answers 406 itself, where Orthanc would say 400 or transcode."""
    url = proxy_a.dicomweb_url + {
        "frames": instance_path(ct0) + "/frames/1",
        "series": f"/studies/{ct0.StudyInstanceUID}/series/{ct0.SeriesInstanceUID}",
        "study": f"/studies/{ct0.StudyInstanceUID}",
    }[what]
    reason = _proxy_problem(client.get(url, headers={"Accept": accept}), 406)
    assert "archive" not in reason


def test_accept_query_parameter_overrides_the_header(client, proxy_a, ct0):
    """`accept=` wins over the Accept header (PS3.18 §8.7.8.1), in both directions."""
    url = proxy_a.dicomweb_url + instance_path(ct0) + "/frames/1"
    ok = client.get(url, params={"accept": "application/octet-stream"}, headers={"Accept": "text/html"})
    assert ok.status_code == 200
    assert ok.headers["content-type"] == f"application/octet-stream; transfer-syntax={EVLE}"
    assert ok.content == ct0.PixelData
    _proxy_problem(client.get(url, params={"accept": "text/html"}, headers={"Accept": CORNERSTONE}), 406)


def test_single_part_dicom_instance_is_the_stored_file(client, proxy_a, orthanc_a, ct0, slide):
    """Single-part `application/dicom` on an instance (PS3.18 allows it there). Orthanc 400s on it; the
    proxy answers with exactly the Part-10 bytes Orthanc holds, labelled with their transfer syntax."""
    direct = client.get(orthanc_a.dicomweb_url + instance_path(ct0), headers={"Accept": "application/dicom"})
    assert direct.status_code == 400
    response = client.get(proxy_a.dicomweb_url + instance_path(ct0), headers={"Accept": "application/dicom"})
    assert response.status_code == 200
    assert response.headers["content-type"] == f"application/dicom; transfer-syntax={EVLE}"
    assert response.content == orthanc_file(orthanc_a, ct0.SOPInstanceUID)
    any_ts = client.get(proxy_a.dicomweb_url + instance_path(slide),
                        headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert any_ts.status_code == 200
    assert any_ts.headers["content-type"] == f"application/dicom; transfer-syntax={JPEG_BASELINE}"
    assert any_ts.content == orthanc_file(orthanc_a, slide.SOPInstanceUID)


def test_single_part_octet_stream_for_one_frame(client, proxy_a, orthanc_a, ct0):
    """Single-part `application/octet-stream` for one frame, EVLE by default (Orthanc insists on multipart)."""
    path = instance_path(ct0) + "/frames/1"
    assert client.get(orthanc_a.dicomweb_url + path, headers={"Accept": "application/octet-stream"}).status_code == 400
    response = client.get(proxy_a.dicomweb_url + path, headers={"Accept": "application/octet-stream"})
    assert response.status_code == 200
    assert response.headers["content-type"] == f"application/octet-stream; transfer-syntax={EVLE}"
    assert "Accept" in response.headers["vary"]  # the answer depends on Accept
    assert response.content == ct0.PixelData


def test_cornerstone_unquoted_accept(client, proxy_a, ct0, slide, fragments):
    """cornerstone's unquoted Accept. It reads the first part only, finds `Content-Type:` by a
    case-sensitive prefix and takes the transfer syntax from it; without one it assumes raw bytes."""
    for ds, ts, payload in ((ct0, EVLE, ct0.PixelData), (slide, JPEG_BASELINE, fragments[0])):
        response = client.get(proxy_a.dicomweb_url + instance_path(ds) + "/frames/1", headers={"Accept": CORNERSTONE})
        assert response.status_code == 200
        body = response.content
        first_line = body.split(b"\r\n", 1)[0]
        assert first_line.startswith(b"--")  # the boundary line comes first: no preamble
        head, _, rest = body.partition(b"\r\n\r\n")
        type_line = [line for line in head.split(b"\r\n") if line.startswith(b"Content-Type:")]
        assert len(type_line) == 1
        assert f"transfer-syntax={ts}".encode() in type_line[0]
        assert rest.startswith(payload)
        _, parts = split_multipart(body, response.headers["content-type"])
        assert [content for _, content in parts] == [payload]


def test_frame_list_keeps_order_with_proxy_content_locations(client, proxy_a, slide, fragments):
    """`frames/3,1` gives frame 3 then frame 1, each with its own Content-Location
    under the proxy's URL; `%2C` is the same list."""
    base = proxy_a.dicomweb_url + instance_path(slide) + "/frames/"
    for frames in ("3,1", "3%2C1"):
        response = client.get(base + frames, headers={"Accept": CORNERSTONE})
        assert response.status_code == 200
        _, parts = split_multipart(response.content, response.headers["content-type"])
        assert [content for _, content in parts] == [fragments[2], fragments[0]]
        assert [_header(h, "Content-Location") for h, _ in parts] == [base + "3", base + "1"]


def test_reframed_under_the_proxys_own_boundary(client, proxy_a, orthanc_a, slide):
    """The proxy writes new framing: its own boundary (Orthanc's are two UUIDs), a
    well-formed outer type (Orthanc hides the transfer syntax inside `type`), and part headers spelled
    exactly `Content-Type:` with `transfer-syntax=`."""
    path = instance_path(slide) + "/frames/1,2"
    direct = client.get(orthanc_a.dicomweb_url + path, headers={"Accept": CORNERSTONE})
    assert direct.status_code == 200 and ORTHANC_BOUNDARY.search(direct.content)
    assert "; transfer-syntax=" in direct.headers["content-type"].split("boundary=")[0]
    response = client.get(proxy_a.dicomweb_url + path, headers={"Accept": CORNERSTONE})
    assert response.status_code == 200
    ctype = response.headers["content-type"]
    assert ctype.startswith('multipart/related; type="image/jpeg"; boundary=')
    boundary, parts = split_multipart(response.content, ctype)
    assert re.fullmatch(r"[A-Za-z0-9'()+_,./:=?-]{1,70}", boundary)
    assert boundary not in direct.headers["content-type"]
    assert not ORTHANC_BOUNDARY.search(response.content)
    assert [content for _, content in parts] == [content for _, content in
                                                split_multipart(direct.content, direct.headers["content-type"])[1]]
    for headers, _ in parts:
        assert _header(headers, "Content-Type") == f"image/jpeg; transfer-syntax={JPEG_BASELINE}"
        assert all(name in ("Content-Type", "Content-Location", "Content-Length") for name, _ in headers)


def test_instance_parts_are_labelled_with_the_stored_transfer_syntax(client, proxy_a, orthanc_a, slide):
    """PS3.18 §8.7.9: Orthanc labels instance parts plain `application/dicom`; the proxy labels each part
    with the File Meta transfer syntax: the stored one for `transfer-syntax=*`, EVLE by default."""
    url = instance_path(slide)
    direct = client.get(orthanc_a.dicomweb_url + url, headers={"Accept": DICOM_ANY})
    headers, _ = split_multipart(direct.content, direct.headers["content-type"])[1][0]
    assert _header(headers, "Content-Type") == "application/dicom"
    stored = orthanc_file(orthanc_a, slide.SOPInstanceUID)
    for path, accept, ts in ((url, DICOM_ANY, JPEG_BASELINE), (f"/studies/{slide.StudyInstanceUID}", None, EVLE)):
        response = client.get(proxy_a.dicomweb_url + path, headers={"Accept": accept} if accept else {})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith('multipart/related; type="application/dicom"')
        _, parts = split_multipart(response.content, response.headers["content-type"])
        assert len(parts) == 1
        headers, content = parts[0]
        assert _header(headers, "Content-Type") == f"application/dicom; transfer-syntax={ts}"
        assert ts.encode() in content[:512]  # the File Meta agrees with the label
        assert (content == stored) == (ts == JPEG_BASELINE)


def test_q_values_are_honoured(client, proxy_a, orthanc_a, slide):
    """The higher q wins even when listed first (Orthanc ignores q and takes the last range)."""
    accept = (f'multipart/related; type="application/octet-stream"; q=0.9, '
              f'multipart/related; type="image/jpeg"; transfer-syntax={JPEG_BASELINE}; q=0.5')
    response = client.get(proxy_a.dicomweb_url + instance_path(slide) + "/frames/1", headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
    headers, content = split_multipart(response.content, response.headers["content-type"])[1][0]
    assert _header(headers, "Content-Type") == f"application/octet-stream; transfer-syntax={EVLE}"
    assert len(content) == slide.Rows * slide.Columns * slide.SamplesPerPixel  # decoded to 8-bit RGB
    evle_parts = f'multipart/related; type="application/octet-stream"; transfer-syntax={EVLE}'
    direct = client.get(orthanc_a.dicomweb_url + instance_path(slide) + "/frames/1", headers={"Accept": evle_parts})
    assert content == split_multipart(direct.content, direct.headers["content-type"])[1][0][1]  # as decoded there


def test_bulkdata_part_location_is_the_metadata_uri(client, proxy_a, ct0):
    """The BulkDataURI from the proxy's metadata serves PixelData, and the part's
    Content-Location is that URI."""
    metadata = client.get(proxy_a.dicomweb_url + instance_path(ct0) + "/metadata").json()
    uri = metadata[0]["7FE00010"]["BulkDataURI"]
    response = client.get(uri, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert response.status_code == 200
    (headers, content), = split_multipart(response.content, response.headers["content-type"])[1]
    assert _header(headers, "Content-Location") == uri
    assert content == ct0.PixelData
