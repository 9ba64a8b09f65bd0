"""The `aws` profile end to end (issue 25 point 3): the proxy in front of a stand-in of AWS HealthImaging
(tests/healthimaging_standin.py: every request's SigV4 signature recomputed with botocore and refused with
403 when it differs; only the DICOMweb resources the service documents are answered) with a real Orthanc
behind it. A viewer asks for what it always asks for; the proxy signs each request with temporary
credentials from its environment and builds what the service does not have (a study or series retrieve,
a study's metadata) from what it has.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

pytest.importorskip("botocore")  # the optional `aws` extra (requirements/test.txt installs it)

from botocore.credentials import Credentials  # noqa: E402
from healthimaging_standin import HealthImagingStandIn  # noqa: E402
from support import ProxyProcess, orthanc_holding, split_multipart  # noqa: E402

from proxy.demo.synth import Patient, Study, ct_series, to_part10  # noqa: E402

SESSION = Credentials("ASIAEDGEE2E0000001", "e2e-secret-0123456789abcdefghijklmnopqrs", "e2e-session-token")
STUDY = Study(Patient("DOE^AWS", "PID-AWS-1"), accession="ACC-AWS")
SERIES_SIZES = (2, 3)


@pytest.fixture(scope="module")
def datasets():
    return [ds for n, size in enumerate(SERIES_SIZES, 1)
            for ds in ct_series(STUDY, size, rows=16, cols=16, series_number=n, seed=n)]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, datasets):
    yield from orthanc_holding(tmp_path_factory, "AWSBACK", datasets)


@pytest.fixture(scope="module")
def standin(orthanc):
    with HealthImagingStandIn(orthanc.dicomweb_url, SESSION, region="eu-west-1") as s:
        yield s


def aws_proxy(standin: HealthImagingStandIn, workdir, secret: str, more: str = "") -> ProxyProcess:
    config = workdir / "edge.toml"
    config.write_text(more + "[federation]\nhealth_interval = 0\n\n"
                      f'[[archives]]\nname = "aws"\nurl = "{standin.url}"\nprofile = "aws"\n'
                      'auth = { type = "aws", region = "eu-west-1" }\n')
    none = str(workdir / "no-such-file")
    env = {"AWS_ACCESS_KEY_ID": SESSION.access_key, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_SESSION_TOKEN": SESSION.token, "AWS_CONFIG_FILE": none, "AWS_SHARED_CREDENTIALS_FILE": none,
           "AWS_EC2_METADATA_DISABLED": "true"}
    return ProxyProcess({}, workdir, extra_args=["--config", str(config), "--log-level", "debug"], env=env)


@pytest.fixture(scope="module")
def proxy(standin, tmp_path_factory):
    with aws_proxy(standin, tmp_path_factory.mktemp("aws_proxy"), SESSION.secret_key) as p:
        yield p


def get(proxy: ProxyProcess, path: str, accept: str = "application/dicom+json") -> httpx.Response:
    return httpx.get(proxy.dicomweb_url + path, headers={"Accept": accept}, trust_env=False, timeout=30.0)


def uids(records: list[dict], tag: str) -> set[str]:
    return {r[tag]["Value"][0] for r in records}


def test_searches_are_signed_and_answered(proxy, standin, datasets):
    studies = get(proxy, "/studies?PatientID=PID-AWS-1")
    assert studies.status_code == 200, studies.text
    assert uids(studies.json(), "0020000D") == {STUDY.study_uid}
    series = get(proxy, f"/studies/{STUDY.study_uid}/series")
    assert uids(series.json(), "0020000E") == {ds.SeriesInstanceUID for ds in datasets}
    assert standin.refused == []


def test_what_the_service_does_not_have_is_501(proxy, standin, datasets):
    r = get(proxy, "/series?PatientID=PID-AWS-1")
    assert r.status_code == 501, r.text
    ds = datasets[0]
    path = f"/studies/{STUDY.study_uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    for suffix in ("/rendered", "/thumbnail"):
        r = get(proxy, path + suffix, "image/jpeg")
        assert r.status_code == 501, r.text
    assert not [a for a in standin.accepted if a.endswith(("/rendered", "/thumbnail"))]


@pytest.mark.parametrize("level", ["study", "series"])
def test_a_study_or_series_retrieve_is_built_from_its_instances(proxy, standin, datasets, level):
    series_uid = datasets[-1].SeriesInstanceUID
    path = f"/studies/{STUDY.study_uid}" + (f"/series/{series_uid}" if level == "series" else "")
    before = len(standin.accepted)
    r = get(proxy, path, 'multipart/related; type="application/dicom"; transfer-syntax=*')
    assert r.status_code == 200, r.text
    _, parts = split_multipart(r.content, r.headers["Content-Type"])
    expected = [ds for ds in datasets if level == "study" or ds.SeriesInstanceUID == series_uid]
    assert len(parts) == len(expected)
    held = [[ds.SOPInstanceUID for ds in expected if ds.SOPInstanceUID.encode() in body] for _, body in parts]
    assert sorted(sop for one in held for sop in one) == sorted(ds.SOPInstanceUID for ds in expected)
    assert all(len(one) == 1 for one in held)  # each part one instance, each instance once
    assert all(body[128:132] == b"DICM" for _, body in parts)  # whole Part 10 files
    asked = standin.accepted[before:]
    assert f"GET {path}" not in asked  # the service has no study or series retrieve: never asked for one
    assert sum(a.count("/instances/") for a in asked) == len(expected)
    assert standin.refused == []


def test_a_study_metadata_is_joined_from_its_series(proxy, standin, datasets):
    r = get(proxy, f"/studies/{STUDY.study_uid}/metadata")
    assert r.status_code == 200, r.text
    assert uids(r.json(), "00080018") == {ds.SOPInstanceUID for ds in datasets}
    assert f"GET /studies/{STUDY.study_uid}/metadata" not in standin.accepted


def test_an_instance_and_its_frame(proxy, datasets):
    ds = datasets[0]
    path = f"/studies/{STUDY.study_uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    one = get(proxy, path, "application/dicom")
    assert one.status_code == 200 and ds.SOPInstanceUID.encode() in one.content
    frame = get(proxy, path + "/frames/1", 'multipart/related; type="application/octet-stream"')
    assert frame.status_code == 200
    assert split_multipart(frame.content, frame.headers["Content-Type"])[1][0][1] == ds.PixelData


def test_a_wrong_secret_is_refused_by_the_service_and_never_shown(standin, tmp_path):
    wrong = "not-the-secret-0123456789abcdefghijklmnop"
    with aws_proxy(standin, tmp_path, wrong) as p:
        r = get(p, "/studies?PatientID=PID-AWS-1")
        assert r.status_code >= 400 and r.status_code != 200
        assert wrong not in r.text
    log = p.log_path.read_text()  # (after the proxy stopped: every line written)
    assert standin.refused[-1] == "InvalidSignatureException"
    assert wrong not in log and SESSION.token not in log


def test_a_store_is_signed_with_its_body_streamed(proxy, standin):
    refused = len(standin.refused)
    stored = list(ct_series(Study(Patient("DOE^STOW", "PID-AWS-STOW")), 1, rows=16, cols=16, seed=9))
    body = b"".join(b"--stowBoundary\r\nContent-Type: application/dicom\r\n\r\n" + to_part10(ds) + b"\r\n"
                    for ds in stored) + b"--stowBoundary--\r\n"
    r = httpx.post(proxy.dicomweb_url + "/studies", content=body, trust_env=False, timeout=30.0,
                   headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=stowBoundary',
                            "Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text
    assert "POST /studies" in standin.accepted and len(standin.refused) == refused
    found = get(proxy, "/studies?PatientID=PID-AWS-STOW")
    assert uids(found.json(), "0020000D") == {stored[0].StudyInstanceUID}


@pytest.fixture(scope="module")
def other_orthanc(tmp_path_factory):
    """A second archive holding one more series of the same study (federated with the aws one)."""
    yield from orthanc_holding(tmp_path_factory, "AWSPEER", list(ct_series(STUDY, 2, rows=16, cols=16,
                                                                           series_number=3, seed=3)))


@pytest.fixture(scope="module")
def federated(standin, other_orthanc, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("aws_federated")
    proxy = aws_proxy(standin, workdir, SESSION.secret_key)
    config = workdir / "edge.toml"
    config.write_text(config.read_text() + f'\n[[archives]]\nname = "peer"\nurl = "{other_orthanc.dicomweb_url}"\n'
                                           'profile = "orthanc"\n')
    with proxy as p:
        yield p


def test_federated_with_an_aws_archive(federated, datasets, other_orthanc):
    metadata = get(federated, f"/studies/{STUDY.study_uid}/metadata")
    assert metadata.status_code == 200, metadata.text
    assert len(uids(metadata.json(), "00080018")) == len(datasets) + 2  # the aws series joined, and the peer's
    flat = get(federated, "/series?PatientID=PID-AWS-1")
    assert flat.status_code == 200  # the peer answers; the aws archive is skipped, and said so
    assert len(flat.json()) == 1
    assert any("'aws' does not answer this search" in w for w in flat.headers.get_list("Warning"))


def test_a_federated_study_retrieve_takes_the_aws_archives_instances_one_by_one(federated, datasets):
    r = get(federated, f"/studies/{STUDY.study_uid}", 'multipart/related; type="application/dicom"; transfer-syntax=*')
    assert r.status_code == 200, r.text
    assert "Warning" not in r.headers
    _, parts = split_multipart(r.content, r.headers["Content-Type"])
    assert len(parts) == len(datasets) + 2  # the aws archive's instances and the peer's, each once
    assert all(body[128:132] == b"DICM" for _, body in parts)


def test_no_series_prefetch_is_asked_of_the_service(standin, datasets, tmp_path):
    """With the cache on, series metadata starts a prefetch of the series; the service has no series
    retrieve, so none is asked for (the prefetch ends "refused" without a request)."""
    more = f'[cache]\ndir = "{tmp_path / "cache"}"\nprefetch = true\n'
    series = datasets[0].SeriesInstanceUID
    with aws_proxy(standin, tmp_path, SESSION.secret_key, more) as p:
        assert get(p, f"/studies/{STUDY.study_uid}/series/{series}/metadata").status_code == 200
        deadline = time.monotonic() + 15
        while not re.search(r'^dicomweb_edge_prefetches_total\{outcome="refused"\} [1-9]',
                            httpx.get(p.url + "/metrics", trust_env=False).text, re.M):
            assert time.monotonic() < deadline, "no prefetch ended"
            time.sleep(0.05)
    assert f"GET /studies/{STUDY.study_uid}/series/{series}" not in standin.asked


def test_a_built_study_retrieve_teaches_the_frame_cache(standin, datasets, tmp_path):
    """With the cache on, the instances of a study retrieved one by one are split into frames as they pass:
    a viewer's frame requests afterwards are hits, the service is not asked for a frame."""
    with aws_proxy(standin, tmp_path, SESSION.secret_key, f'[cache]\ndir = "{tmp_path / "cache"}"\n') as p:
        r = get(p, f"/studies/{STUDY.study_uid}", 'multipart/related; type="application/dicom"; transfer-syntax=*')
        assert r.status_code == 200
        deadline = time.monotonic() + 15
        while sum(float(v) for v in re.findall(r"^dicomweb_edge_cache_memory_entries(?:\{[^}]*\})? (\S+)$",
                                               httpx.get(p.url + "/metrics", trust_env=False).text, re.M)) \
                < len(datasets):
            assert time.monotonic() < deadline, "the retrieved instances were not split into frames"
            time.sleep(0.05)
        asked = len(standin.asked)
        for ds in datasets:
            frame = get(p, f"/studies/{STUDY.study_uid}/series/{ds.SeriesInstanceUID}/instances/"
                           f"{ds.SOPInstanceUID}/frames/1", 'multipart/related; type="application/octet-stream"')
            assert frame.headers["X-Cache"] == "HIT"
            assert split_multipart(frame.content, frame.headers["Content-Type"])[1][0][1] == ds.PixelData
        assert standin.asked[asked:] == []
