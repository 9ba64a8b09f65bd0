"""Orthanc's DICOMweb plugin as a client of the proxy: an Orthanc that federates through the edge.

A common set-up: a departmental Orthanc lists the edge among its DICOMweb servers and searches, pulls and
pushes through it (`/dicom-web/servers/edge/...` on that Orthanc). Archive A is a real Orthanc behind the
proxy; Orthanc C is the client. Nothing here is mocked: C's plugin talks HTTP to the proxy, the proxy to A.
"""

from __future__ import annotations

import httpx
import pytest
from support import ProxyProcess, orthanc_holding

from proxy.demo.orthanc import OrthancServer
from proxy.demo.synth import Patient, Study, ct_series

HELD = Study(Patient("EDGE^CLIENT", "PEC001"), accession="AEC001", description="HELD BY A")
PUSHED = Study(Patient("EDGE^PUSHED", "PEC002"), accession="AEC002", description="PUSHED FROM C")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    yield from orthanc_holding(tmp_path_factory, "EDGE_A", ct_series(HELD, 3, rows=32, cols=32))


@pytest.fixture(scope="module")
def proxy(archive, tmp_path_factory):
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path_factory.mktemp("edge_proxy")) as running:
        yield running


def _client_orthanc(tmp_path_factory, proxy: ProxyProcess, name: str):
    with OrthancServer(tmp_path_factory.mktemp(name.lower()), name, servers={"edge": proxy.dicomweb_url}) as c:
        c.store(list(ct_series(PUSHED, 2, rows=32, cols=32)))
        yield c


@pytest.fixture(scope="module")
def client_orthanc(tmp_path_factory, proxy):
    yield from _client_orthanc(tmp_path_factory, proxy, "EDGE_C")


def _qido(orthanc: OrthancServer, uri: str, arguments: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{orthanc.url}/dicom-web/servers/edge/qido", json={"Uri": uri, "Arguments": arguments},
                      timeout=30, trust_env=False)


def _study_ids(orthanc: OrthancServer, study_uid: str) -> list[str]:
    found = httpx.post(f"{orthanc.url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}},
                       timeout=30, trust_env=False)
    return found.json()


def test_the_plugin_searches_through_the_proxy(client_orthanc):
    response = _qido(client_orthanc, "/studies", {"PatientName": "EDGE^CLI*"})
    assert response.status_code == 200
    records = response.json()
    assert [r["0020000D"]["Value"] for r in records] == [HELD.study_uid]  # the plugin's own JSON: one string


def test_a_search_without_matches_is_an_empty_list_for_the_plugin(client_orthanc):
    response = _qido(client_orthanc, "/studies", {"PatientName": "NOBODY*"})
    assert response.status_code == 200 and response.json() == []


def test_the_plugin_fails_on_a_204(archive, tmp_path_factory):
    """Why `200 []` is the default: with `empty_search_status = 204`, the plugin reports an error for a search
    without matches (Orthanc 1.10 + DICOMweb 1.7 cannot parse an empty body)."""
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path_factory.mktemp("edge_204"),
                      env={"DICOMWEB_EDGE_EMPTY_SEARCH_STATUS": "204"}) as proxy_204:
        for client in _client_orthanc(tmp_path_factory, proxy_204, "EDGE_C204"):
            response = _qido(client, "/studies", {"PatientName": "NOBODY*"})
            assert response.status_code == 400 and "Bad file format" in response.text
            assert _qido(client, "/studies", {"PatientName": "EDGE^CLI*"}).status_code == 200


def test_the_plugin_retrieves_a_study_into_its_orthanc(client_orthanc, archive):
    assert _study_ids(client_orthanc, HELD.study_uid) == []
    response = httpx.post(f"{client_orthanc.url}/dicom-web/servers/edge/retrieve",
                          json={"Resources": [{"Study": HELD.study_uid}]}, timeout=60, trust_env=False)
    assert response.status_code == 200, response.text
    [study] = _study_ids(client_orthanc, HELD.study_uid)
    pulled = httpx.get(f"{client_orthanc.url}/studies/{study}/instances", timeout=30, trust_env=False).json()
    held = httpx.post(f"{archive.url}/tools/find", json={"Level": "Instance", "Expand": True,
                                                         "Query": {"StudyInstanceUID": HELD.study_uid}},
                      timeout=30, trust_env=False).json()
    assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in pulled) == \
        sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in held)
    # Byte for byte: each instance C holds now is the one A holds.
    for instance in held:
        sop = instance["MainDicomTags"]["SOPInstanceUID"]
        [copy] = httpx.post(f"{client_orthanc.url}/tools/find", json={"Level": "Instance",
                                                                      "Query": {"SOPInstanceUID": sop}},
                            timeout=30, trust_env=False).json()
        ours = httpx.get(f"{client_orthanc.url}/instances/{copy}/frames/0/raw", timeout=30, trust_env=False)
        theirs = httpx.get(f"{archive.url}/instances/{instance['ID']}/frames/0/raw", timeout=30, trust_env=False)
        assert ours.status_code == 200 and ours.content == theirs.content


def test_the_plugin_stores_through_the_proxy(client_orthanc, archive):
    assert _study_ids(archive, PUSHED.study_uid) == []
    [study] = _study_ids(client_orthanc, PUSHED.study_uid)
    response = httpx.post(f"{client_orthanc.url}/dicom-web/servers/edge/stow", json={"Resources": [study]},
                          timeout=60, trust_env=False)
    assert response.status_code == 200, response.text
    assert len(_study_ids(archive, PUSHED.study_uid)) == 1
    # ... and the proxy finds it at once: a store clears the search answers it keeps.
    found = _qido(client_orthanc, "/studies", {"StudyInstanceUID": PUSHED.study_uid})
    assert [r["0020000D"]["Value"] for r in found.json()] == [PUSHED.study_uid]
