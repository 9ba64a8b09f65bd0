"""The built-in sample DICOMweb archive: Orthanc-shaped answers, and each fault-injection switch."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import httpx
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames

from proxy.demo.archive import ArchiveServer, Faults, SampleArchive
from proxy.demo.synth import DemoSet, Patient, Study, ct_series, demo_set, multiframe_native, to_part10

MF_STUDY = Study(Patient("ROE^RICHARD", "PID002"), study_date="20231010", accession="ACC002")


@pytest.fixture(scope="module")
def data() -> DemoSet:
    demo = demo_set(ct_slices=4)
    demo.archive_a.append(multiframe_native(MF_STUDY, n_frames=5, rows=32, cols=48))
    return demo


@pytest.fixture(scope="module")
def server(data) -> Iterator[ArchiveServer]:
    archive = SampleArchive("SAMPLE_A")
    archive.extend(data.archive_a)
    with ArchiveServer(archive) as srv:
        yield srv


@pytest.fixture
def archive(server) -> Iterator[SampleArchive]:
    server.archive.faults.clear()
    server.archive.requests.clear()
    yield server.archive
    server.archive.faults.clear()


@pytest.fixture
def client(server, archive) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.dicomweb_url, timeout=5) as c:
        yield c


@pytest.fixture
def empty_server() -> Iterator[ArchiveServer]:
    with ArchiveServer(SampleArchive("EMPTY")) as srv:
        yield srv


def by_sop_class(data: DemoSet, sop_class_keyword: str) -> pydicom.Dataset:
    return next(ds for ds in data.archive_a if ds.SOPClassUID.keyword == sop_class_keyword)


def instance_path(ds: pydicom.Dataset) -> str:
    return f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def boundary_of(content_type: str) -> str:
    return content_type.split("boundary=")[1].split(";")[0].strip('"')


def split_parts(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """An independent, strict parser: the body must start with the delimiter and end with the close."""
    delim = b"--" + boundary.encode()
    assert body.startswith(delim + b"\r\n")
    assert body.endswith(b"\r\n" + delim + b"--\r\n")
    parts = []
    for raw in body[len(delim) + 2 : -(len(delim) + 6)].split(b"\r\n" + delim + b"\r\n"):
        head, _, content = raw.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        assert int(headers["Content-Length"]) == len(content)
        parts.append((headers, content))
    return parts


def multipart(resp: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    assert resp.status_code == 200, resp.text
    return split_parts(resp.content, boundary_of(resp.headers["content-type"]))


# ---------------------------------------------------------------- QIDO


def test_system_probe(server, archive):
    assert httpx.get(server.url + "/system").json() == {"Name": "SAMPLE_A"}


def test_qido_studies_default_attributes(client, data, server):
    resp = client.get("/studies")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/dicom+json"
    studies = resp.json()
    uids = [s["0020000D"]["Value"][0] for s in studies]
    assert uids == [data.uids["ct_study"], data.uids["slide_study"], data.uids["split_study"],
                    MF_STUDY.study_uid]  # insertion order
    ct = studies[0]
    assert set(ct) == {"00080005", "00080020", "00080030", "00080050", "00080061", "00080090", "00081190",
                       "00100010", "00100020", "00100030", "00100040", "0020000D", "00200010", "00201206",
                       "00201208"}
    assert ct["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}
    assert ct["00201208"]["Value"] == [4] and ct["00201206"]["Value"] == [1]
    assert ct["00080061"]["Value"] == ["CT"]
    assert ct["00081190"]["Value"] == [f"{server.dicomweb_url}/studies/{data.uids['ct_study']}"]


def test_qido_url_follows_host_and_forwarded_headers(client, data):
    study = client.get("/studies", params={"limit": 1}, headers={"Host": "edge.example:9000"}).json()[0]
    assert study["00081190"]["Value"] == [f"http://edge.example:9000/dicom-web/studies/{data.uids['ct_study']}"]
    forwarded = {"Forwarded": "for=10.0.0.1;host=proxy.example:8443;proto=https"}
    study = client.get("/studies", params={"limit": 1}, headers=forwarded).json()[0]
    assert study["00081190"]["Value"] == [f"https://proxy.example:8443/dicom-web/studies/{data.uids['ct_study']}"]


@pytest.mark.parametrize(("params", "expected"), [
    ({"PatientName": "doe*"}, ["DOE^JOHN"]),  # PN: case-insensitive wildcard
    ({"PatientName": "?OE^*"}, ["DOE^JOHN", "POE^EDGAR", "ROE^RICHARD"]),
    ({"00100010": "SMITH^JANE"}, ["SMITH^JANE"]),  # tag instead of keyword
    ({"PatientID": "PID00*", "limit": "2", "offset": "1"}, ["POE^EDGAR", "SMITH^JANE"]),
    ({"StudyDate": "20230101-20241231"}, ["DOE^JOHN", "SMITH^JANE", "ROE^RICHARD"]),
    ({"StudyDate": "-20221231"}, ["POE^EDGAR"]),
    ({"StudyDate": "20231010-"}, ["DOE^JOHN", "ROE^RICHARD"]),
    ({"StudyDate": "20220505"}, ["POE^EDGAR"]),
    ({"AccessionNumber": "acc001"}, []),  # non-PN matching is case-sensitive
    ({"ModalitiesInStudy": "SM"}, ["POE^EDGAR"]),
    ({"Modality": "OT"}, ["ROE^RICHARD"]),  # series attribute at study level: any instance matches
    ({"BogusTag": "1"}, ["DOE^JOHN", "POE^EDGAR", "SMITH^JANE", "ROE^RICHARD"]),  # unknown keys ignored
    ({"offset": "10"}, []),
])
def test_qido_matching(client, params, expected):
    resp = client.get("/studies", params=params)
    assert resp.status_code == 200
    assert [s["00100010"]["Value"][0]["Alphabetic"] for s in resp.json()] == expected


def test_qido_uid_list_and_percent_encoding(client, data):
    both = f"{data.uids['slide_study']},{data.uids['ct_study']}"
    assert len(client.get("/studies", params={"StudyInstanceUID": both}).json()) == 2
    # the sample archive decodes the query string normally (Orthanc does not): %2A is a wildcard
    assert len(client.get("/studies?PatientName=DOE%2A").json()) == 1


def test_qido_person_name_groups(empty_server, data):
    empty_server.archive.extend(data.archive_b[1:4])  # Müller^Jörg=ミュラー^ヨルク, ISO_IR 192
    url = empty_server.dicomweb_url + "/studies"
    for query in ("MÜLLER*", "müller^jörg", "ミュラー*", "*LLER^J?RG"):
        [study] = httpx.get(url, params={"PatientName": query}).json()
        assert study["00100010"]["Value"] == [{"Alphabetic": "Müller^Jörg", "Ideographic": "ミュラー^ヨルク"}]
        assert study["00201208"]["Value"] == [3]


def test_qido_no_match_is_200_empty_list(client):
    resp = client.get("/studies", params={"PatientID": "NOBODY"})
    assert resp.status_code == 200 and resp.content == b"[]"


def test_qido_bad_limit_is_400(client):
    assert client.get("/studies", params={"limit": "x"}).status_code == 400


def test_qido_includefield(client, data):
    plain = client.get("/studies", params={"PatientID": "PID001"}).json()[0]
    assert "00081030" not in plain
    for field in ("StudyDescription", "00081030"):
        extra = client.get("/studies", params={"PatientID": "PID001", "includefield": field}).json()[0]
        assert extra["00081030"]["Value"] == ["SYNTH CT CHEST"]
    everything = client.get("/studies", params={"PatientID": "PID001", "includefield": "all"}).json()[0]
    assert {"00081030", "00180050", "00280030"} <= set(everything)


def test_qido_series_and_instances(client, data):
    series = client.get(f"/studies/{data.uids['ct_study']}/series").json()
    assert len(series) == 1
    assert set(series[0]) == {"00080060", "0008103E", "00081190", "0020000D", "0020000E", "00200011",
                              "00201209"}
    assert series[0]["00201209"]["Value"] == [4]
    instances = client.get(f"/studies/{data.uids['ct_study']}/series/{data.uids['ct_series']}/instances",
                           params={"InstanceNumber": "3"}).json()
    assert [i["00200013"]["Value"] for i in instances] == [[3]]
    assert "00280010" in instances[0] and instances[0]["00081190"]["Value"][0].endswith(
        instance_path(data.archive_a[2]))
    assert len(client.get("/instances", params={"limit": 3}).json()) == 3
    slides = client.get("/series", params={"Modality": "SM"}).json()
    assert [s["0020000D"]["Value"] for s in slides] == [[data.uids["slide_study"]]]


# ---------------------------------------------------------------- WADO-RS


def test_retrieve_instance_and_study(client, data):
    ds = data.archive_a[1]
    resp = client.get(instance_path(ds))
    assert resp.headers["content-type"].startswith('multipart/related; type="application/dicom"; boundary=')
    [(headers, content)] = multipart(resp)
    assert headers["Content-Type"] == "application/dicom"
    assert content == to_part10(ds)
    assert len(multipart(client.get(f"/studies/{data.uids['ct_study']}"))) == 4


def test_unknown_uid_is_404_with_json(client):
    resp = client.get("/studies/1.2.3.4")
    assert resp.status_code == 404 and resp.json()["HttpStatus"] == 404
    assert client.get("/studies/1.2.3.4/metadata").status_code == 404


def test_metadata_bulkdata_uri_for_native_pixels_only(client, data, server):
    ct = data.archive_a[0]
    items = client.get(f"/studies/{data.uids['ct_study']}/series/{data.uids['ct_series']}/metadata").json()
    assert len(items) == 4
    assert items[0]["7FE00010"] == {"vr": "OW",
                                    "BulkDataURI": f"{server.dicomweb_url}{instance_path(ct)}/bulk/7fe00010"}
    assert items[0]["00280030"]["Value"] == [0.9765625, 0.9765625]
    assert not any(key.startswith("0002") for key in items[0])
    slide = client.get(f"/studies/{data.uids['slide_study']}/metadata").json()
    assert "7FE00010" not in slide[0] and slide[0]["00280008"]["Value"] == [12]


def test_bulkdata_pixel_data(client, data):
    ct = data.archive_a[0]
    [(headers, content)] = multipart(client.get(instance_path(ct) + "/bulk/7fe00010"))
    assert headers["Content-Type"] == "application/octet-stream"
    assert content == ct.PixelData


def test_native_frames_are_slices_of_pixel_data(client, data, server):
    mf = data.archive_a[-1]
    frame_size = 32 * 48 * 2
    resp = client.get(instance_path(mf) + "/frames/3,1")
    assert resp.headers["content-type"].startswith(
        'multipart/related; type="application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"; boundary=')
    parts = multipart(resp)
    assert [p[1] for p in parts] == [mf.PixelData[2 * frame_size : 3 * frame_size], mf.PixelData[:frame_size]]
    assert list(parts[0][0]) == ["Content-Location", "Content-Type", "Content-Length", "MIME-Version"]
    assert parts[0][0]["Content-Location"] == f"{server.dicomweb_url}{instance_path(mf)}/frames/3"
    assert parts[0][0]["Content-Type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"


@pytest.mark.parametrize("frames", ["0", "6", "1,99", "x"])
def test_bad_frame_numbers_are_400(client, data, frames):
    assert client.get(instance_path(data.archive_a[-1]) + f"/frames/{frames}").status_code == 400


def test_jpeg_frame_is_the_stored_fragment(client, data):
    slide = by_sop_class(data, "VLWholeSlideMicroscopyImageStorage")
    expected = list(generate_frames(slide.PixelData, number_of_frames=12))[4]
    [(headers, content)] = multipart(client.get(instance_path(slide) + "/frames/5"))
    assert headers["Content-Type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
    assert content == expected
    image = Image.open(io.BytesIO(content))
    assert image.format == "JPEG" and image.size == (128, 128)


def test_rendered(client, data):
    ct = data.archive_a[0]
    resp = client.get(instance_path(ct) + "/rendered")
    assert resp.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(resp.content)).size == (512, 512)
    resp = client.get(instance_path(ct) + "/rendered", params={"viewport": "64,64"},
                      headers={"Accept": "image/png"})
    image = Image.open(io.BytesIO(resp.content))
    assert resp.headers["content-type"] == "image/png" and image.format == "PNG" and image.size == (64, 64)
    slide = by_sop_class(data, "VLWholeSlideMicroscopyImageStorage")
    frame = Image.open(io.BytesIO(client.get(instance_path(slide) + "/frames/2/rendered").content))
    assert frame.mode == "RGB" and frame.size == (128, 128)


def test_request_counter(client, archive, data):
    mf = data.archive_a[-1]
    client.get("/studies")
    client.get(instance_path(mf) + "/frames/1")
    client.get(instance_path(mf) + "/frames/2")
    client.get(instance_path(mf) + "/metadata")
    client.get("/studies/1.2.3.4")
    assert archive.requests == {"qido": 1, "frames": 2, "metadata": 1, "retrieve": 1}


# ---------------------------------------------------------------- STOW-RS


def stow_body(blobs: list[bytes], boundary: str = "XXstowBOUNDARYxx", preamble: bytes = b"") -> bytes:
    body = preamble
    for blob in blobs:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + blob + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def test_stow_round_trip(empty_server):
    study = Study()
    blobs = [to_part10(ds) for ds in ct_series(study, 2, rows=16, cols=16)]
    url = empty_server.dicomweb_url
    resp = httpx.post(url + "/studies", content=stow_body(blobs, preamble=b"\r\n"), headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=XXstowBOUNDARYxx'})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/dicom+json"
    result = resp.json()
    assert result["00081190"]["Value"] == [f"{url}/studies/{study.study_uid}"]
    assert result["00081198"] == {"vr": "SQ"}
    refs = result["00081199"]["Value"]
    assert [set(r) for r in refs] == [{"00081150", "00081155", "00081190"}] * 2
    got = httpx.get(refs[1]["00081190"]["Value"][0])
    assert split_parts(got.content, boundary_of(got.headers["content-type"]))[0][1] == blobs[1]
    assert len(httpx.get(url + "/studies").json()) == 1
    assert empty_server.archive.requests["stow"] == 1


def test_stow_unquoted_type_and_study_mismatch(empty_server):
    blob = to_part10(next(ct_series(Study(), 1, rows=16, cols=16)))
    headers = {"Content-Type": "multipart/related; type=application/dicom; boundary=b0"}
    url = empty_server.dicomweb_url
    resp = httpx.post(url + "/studies/1.2.3.4", content=stow_body([blob], "b0"), headers=headers)
    assert resp.status_code == 409
    assert resp.json()["00081198"]["Value"][0]["00081197"] == {"vr": "US", "Value": [272]}
    assert httpx.post(url + "/studies", content=stow_body([blob], "b0"), headers=headers).status_code == 200


@pytest.mark.parametrize("content_type", [
    "application/dicom",  # single part
    "multipart/related; boundary=b0",  # no type
    'multipart/related; type="application/json"; boundary=b0',
])
def test_stow_bad_content_type_is_415(empty_server, content_type):
    resp = httpx.post(empty_server.dicomweb_url + "/studies", content=stow_body([b"x"], "b0"),
                      headers={"Content-Type": content_type})
    assert resp.status_code == 415
    assert len(empty_server.archive) == 0


# ---------------------------------------------------------------- fault injection


def test_fault_status(client, archive):
    archive.faults.status = 503
    resp = client.get("/studies")
    assert resp.status_code == 503 and resp.json()["HttpStatus"] == 503
    assert archive.requests["qido"] == 1
    archive.faults.status = None
    assert client.get("/studies").status_code == 200


def test_fault_first_byte_delay(server, archive):
    archive.faults.first_byte_delay = 0.3
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(server.dicomweb_url + "/studies", timeout=httpx.Timeout(5, read=0.05))


def test_fault_body_chunk_delay(server, archive, data):
    url = server.dicomweb_url + instance_path(data.archive_a[0])
    normal = httpx.get(url).content
    archive.faults.body_chunk_delay = 0.3
    with httpx.stream("GET", url, timeout=httpx.Timeout(5, read=0.1)) as resp:
        assert resp.status_code == 200  # the start of the response is not delayed ...
        with pytest.raises(httpx.ReadTimeout):  # ... but the body stalls between chunks
            resp.read()
    archive.faults.body_chunk_delay = 0.01
    slow = httpx.get(url, timeout=5).content
    assert slow.replace(boundary_of_body(slow), b"") == normal.replace(boundary_of_body(normal), b"")


def boundary_of_body(body: bytes) -> bytes:
    return body.split(b"\r\n", 1)[0]


def test_fault_reset_after_bytes(server, archive, data):
    archive.faults.reset_after_bytes = 100_000
    received = bytearray()
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        with httpx.stream("GET", server.dicomweb_url + instance_path(data.archive_a[0])) as resp:
            assert resp.status_code == 200
            for chunk in resp.iter_raw():
                received += chunk
    assert len(received) == 100_000


def test_fault_truncate_multipart(client, archive, data):
    archive.faults.truncate_multipart = True
    mf = data.archive_a[-1]
    resp = client.get(instance_path(mf) + "/frames/1")
    boundary = boundary_of(resp.headers["content-type"])
    assert resp.content.startswith(f"--{boundary}\r\n".encode())
    assert f"--{boundary}--".encode() not in resp.content
    assert resp.content.endswith(mf.PixelData[: 32 * 48 * 2])


def test_fault_wrong_boundary(client, archive, data):
    archive.faults.wrong_boundary = True
    resp = client.get(instance_path(data.archive_a[-1]) + "/frames/1")
    assert boundary_of(resp.headers["content-type"]).encode() not in resp.content
    with pytest.raises(AssertionError):
        multipart(resp)


def test_fault_invalid_json(client, archive):
    archive.faults.invalid_json = True
    resp = client.get("/studies")
    assert resp.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        resp.json()


def test_fault_content_type(client, archive):
    archive.faults.content_type = "text/html"
    resp = client.get("/studies")
    assert resp.headers["content-type"] == "text/html"
    assert len(resp.json()) == 4


def test_fault_endless_body(server, archive):
    archive.faults.endless_body = True
    received = 0
    with httpx.stream("GET", server.dicomweb_url + "/studies") as resp:
        assert "content-length" not in resp.headers
        for chunk in resp.iter_bytes():
            assert not chunk.strip(b"\0")
            received += len(chunk)
            if received > 1_000_000:
                break
    assert received > 1_000_000
    archive.faults.clear()
    assert httpx.get(server.dicomweb_url + "/studies").status_code == 200


def test_fault_huge_headers(client, archive):
    archive.faults.huge_headers = 300
    assert len(client.get("/studies").headers["x-padding"]) == 300
    archive.faults.huge_headers = 300_000
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/studies")


def test_faults_are_off_by_default():
    faults = Faults()
    assert not any(vars(faults).values())
    faults.status, faults.endless_body = 500, True
    faults.clear()
    assert faults == Faults()
