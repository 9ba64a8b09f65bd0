"""What a client sees when a request is wrong or an archive misbehaves, and what the proxy logs.

Request errors go through `proxy_a` (the real Orthanc A). Archive failures use a proxy in front of a port
with nothing listening, and one in front of the in-process sample archive with fault injection
(`proxy.demo.archive`), configured with short per-archive timeouts from a TOML file.
Expected: 404 for an unknown resource, 502/503/504 when an archive fails, 415 for a STOW body that is
not multipart/related with a DICOM `type` (PS3.18 §10.5); a streamed body that breaks is cut, never
ended cleanly.
"""

from __future__ import annotations

import httpx
import pytest
from support import ProxyProcess, free_port, instance_path, sample_holding

from proxy.demo.synth import Patient, Study, ct_series, to_part10

FIRST_BYTE, IDLE_READ = 0.3, 0.3
PATIENT = Study(Patient("DOE^FAULTY", "PID903"), accession="ACC903", description="FAULTS")


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30.0, trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def slices():
    """Two 512x512 CT slices: 525 KB each, sent by the sample archive in many 64 KB chunks."""
    return list(ct_series(PATIENT, 2))


@pytest.fixture(scope="module")
def slice0(slices):
    return slices[0]


@pytest.fixture(scope="module")
def sample(slices):
    yield from sample_holding("SLOW", slices)


@pytest.fixture(scope="module")
def faulty_proxy(sample, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("proxy_faulty")
    config = workdir / "edge.toml"
    config.write_text(
        "[[archives]]\n"
        'name = "slow"\n'
        f'url = "{sample.dicomweb_url}"\n'
        'profile = "orthanc"\n'
        f"timeouts = {{ connect = 1, first_byte = {FIRST_BYTE}, idle_read = {IDLE_READ} }}\n")
    with ProxyProcess({}, workdir, extra_args=["--config", str(config)]) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def dead_proxy(tmp_path_factory):
    """A proxy whose archive is a free port with nothing listening."""
    with ProxyProcess({"dead": f"http://127.0.0.1:{free_port()}/dicom-web"},
                      tmp_path_factory.mktemp("proxy_dead")) as proxy:
        yield proxy


@pytest.fixture
def faults(sample):
    sample.archive.faults.clear()
    yield sample.archive.faults
    sample.archive.faults.clear()


def _problem(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == status and body["reason"]
    return body["reason"]


@pytest.mark.parametrize("path", [
    "/studies/1.2.x",
    "/studies/1.2.x/metadata",
    "/studies/1.2.3/series/abc/instances/1.2.3",
    "/studies/" + "1." * 32 + "1",  # 65 characters: longer than any UID
    "/studies/1.2.3/series/1.2.3/instances/1.2.3/frames/0",
    "/studies/1.2.3/series/1.2.3/instances/1.2.3/frames/1,a",
    "/studies/1.2.3/series/1.2.3/instances/1.2.3/frames/2,0",
])
def test_malformed_wado_path_is_400(client, proxy_a, path):
    """Malformed UIDs and frame lists (PS3.18 §10.1.1) are refused at the door with a short reason."""
    _problem(client.get(proxy_a.dicomweb_url + path), 400)


def test_unknown_study_is_404(client, proxy_a, demo_data):
    """An unknown (well-formed) study is 404 for retrieve and metadata."""
    unknown = "1.2.826.0.1.3680043.8.498.999999"
    for path in (f"/studies/{unknown}", f"/studies/{unknown}/metadata"):
        _problem(client.get(proxy_a.dicomweb_url + path), 404)


def test_unreachable_archive_is_502(client, dead_proxy, demo_data):
    """An archive that refuses connections gives 502, naming the archive and echoing no UID."""
    study = demo_data.uids["ct_study"]
    for path in (f"/studies/{study}", f"/studies/{study}/metadata", "/studies?PatientName=DOE*"):
        response = client.get(dead_proxy.dicomweb_url + path)
        reason = _problem(response, 502)
        assert "'dead'" in reason
        assert study not in response.text and "DOE" not in response.text


ORIGIN = "http://viewer.example"


@pytest.fixture(scope="module")
def dead_cors_proxy(tmp_path_factory):
    """A proxy serving a viewer on another origin, its archive a free port with nothing listening."""
    workdir = tmp_path_factory.mktemp("proxy_dead_cors")
    (workdir / "edge.toml").write_text(
        f'[server]\ncors_origins = ["{ORIGIN}"]\n'
        f'[[archives]]\nname = "dead"\nurl = "http://127.0.0.1:{free_port()}/dicom-web"\n')
    with ProxyProcess({}, workdir, extra_args=["--config", str(workdir / "edge.toml")]) as proxy:
        yield proxy


def test_a_viewer_on_another_origin_can_read_a_5xx(client, dead_cors_proxy, demo_data):
    """A browser hides a response without Access-Control-Allow-Origin from the page: a viewer would show a
    network error where the proxy said 502 and why. The real app's 5xx carry the CORS headers."""
    study = demo_data.uids["ct_study"]
    for path in (f"/studies/{study}/metadata", "/studies?PatientName=DOE*"):
        r = client.get(dead_cors_proxy.dicomweb_url + path, headers={"Origin": ORIGIN})
        assert r.status_code == 502, r.text
        assert r.headers.get("access-control-allow-origin") == ORIGIN, r.headers
    r = client.get(dead_cors_proxy.dicomweb_url + f"/studies/{study}/metadata", headers={"Origin": "http://evil.example"})
    assert r.status_code == 502 and "access-control-allow-origin" not in r.headers


def test_archive_too_slow_to_answer_is_504(client, faulty_proxy, faults, slice0):
    """A first byte later than the archive's `first_byte` timeout (but within connect + first_byte) is a
    504 naming the archive; once the archive is quick again, the same request succeeds."""
    ds = slice0
    faults.first_byte_delay = FIRST_BYTE + 0.7
    for path in (instance_path(ds), f"/studies/{ds.StudyInstanceUID}/metadata", "/studies"):
        assert "'slow'" in _problem(client.get(faulty_proxy.dicomweb_url + path), 504)
    faults.first_byte_delay = 0
    assert client.get(faulty_proxy.dicomweb_url + f"/studies/{ds.StudyInstanceUID}/metadata").status_code == 200


def _read_all(client, url, accept):
    with client.stream("GET", url, headers={"Accept": accept}) as response:
        assert response.status_code == 200
        response.read()
    return response


@pytest.mark.parametrize("fault", ["stall", "reset"])
def test_broken_body_is_truncated_not_ended(client, faulty_proxy, faults, slice0, fault):
    """A stall longer than `idle_read` or a reset of the archive's connection is never a clean but
    short body: before the headers are out it is a 502/504, after that the client's body is cut."""
    ds = slice0
    for path, accept in ((f"/studies/{ds.StudyInstanceUID}", 'multipart/related; type="application/dicom"'),
                         (instance_path(ds), 'multipart/related; type="application/dicom"'),
                         (instance_path(ds) + "/frames/1", "multipart/related; type=application/octet-stream")):
        url = faulty_proxy.dicomweb_url + path
        complete = _read_all(client, url, accept).content
        assert slice0.PixelData in complete  # the healthy body, for comparison
        if fault == "stall":
            faults.body_chunk_delay = IDLE_READ + 0.7
        else:
            faults.reset_after_bytes = len(complete) * 2 // 3  # for the study: inside the second part
        # Either the failure comes before anything was sent (a gateway error status), or the body is cut.
        try:
            with client.stream("GET", url, headers={"Accept": accept}) as response:
                if response.status_code in (502, 504):
                    assert "'slow'" in response.read().decode()
                else:
                    assert response.status_code == 200
                    with pytest.raises(httpx.RemoteProtocolError):
                        response.read()
        finally:
            faults.clear()


def test_archive_503_is_503(client, faulty_proxy, faults, slice0):
    """An unavailable archive is passed on as 503 with Retry-After (not cached, not a 502)."""
    ds = slice0
    faults.status = 503
    for path in (instance_path(ds), f"/studies/{ds.StudyInstanceUID}/metadata", "/studies"):
        response = client.get(faulty_proxy.dicomweb_url + path)
        assert "'slow'" in _problem(response, 503)
        assert response.headers["retry-after"].isdigit()


@pytest.mark.parametrize("content_type", [
    "application/dicom",
    "multipart/related; boundary=xyz",
    'multipart/related; type="application/json"; boundary=xyz',
])
def test_stow_unsupported_media_type_is_415(client, proxy_a, orthanc_a, slice0, content_type):
    """Single-part application/dicom and multipart without (or with a wrong) `type` are 415;
    nothing reaches the archive."""
    before = orthanc_a.count_instances()
    body = to_part10(slice0)
    if content_type.startswith("multipart"):
        body = b"--xyz\r\nContent-Type: application/dicom\r\n\r\n" + body + b"\r\n--xyz--\r\n"
    response = client.post(proxy_a.dicomweb_url + "/studies", content=body, headers={"Content-Type": content_type})
    _problem(response, 415)
    assert orthanc_a.count_instances() == before


def test_logs_carry_no_patient_data(proxy_a, faulty_proxy, dead_proxy, slices, demo_data):
    """The access and error logs name services, statuses and archives, never UIDs or patient names.
    Runs last in this module: it reads what all the requests above left in the logs."""
    secrets = [*demo_data.uids.values(), PATIENT.study_uid, "DOE"]
    secrets += [str(ds.SOPInstanceUID) for ds in slices]
    for proxy in (proxy_a, faulty_proxy, dead_proxy):
        log = proxy.log_path.read_text(errors="replace")
        assert '"service":' in log  # the access log is on (INFO)
        leaked = [s for s in secrets if s in log]
        assert not leaked, f"{proxy.url} logged {leaked}"
