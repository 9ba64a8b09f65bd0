"""STOW-RS to `/studies/{study}` through the proxy, against a real Orthanc: only instances of that study are
stored (PS3.18 §10.5: the others are listed as failed), and the answer's URLs point at the proxy."""

from __future__ import annotations

import httpx
import pytest
from support import ProxyProcess, orthanc_holding

from proxy.demo.synth import Patient, Study, multiframe_native, to_part10

STOW = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=stowBoundary',
        "Accept": "application/dicom+json"}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    yield from orthanc_holding(tmp_path_factory, "STOWSTUDY", [])


def body(*datasets):
    parts = b"".join(b"--stowBoundary\r\nContent-Type: application/dicom\r\n\r\n" + to_part10(ds) + b"\r\n"
                     for ds in datasets)
    return parts + b"--stowBoundary--\r\n"


def sops(answer, tag):
    return {item["00081155"]["Value"][0] for item in answer.get(tag, {}).get("Value", [])}


def test_stow_to_a_study_stores_only_that_studys_instances(orthanc, tmp_path):
    mine = multiframe_native(Study(Patient("STOW^MINE", "PIDSM")), n_frames=1, rows=16, cols=16, seed=61)
    other = multiframe_native(Study(Patient("STOW^OTHER", "PIDSO")), n_frames=1, rows=16, cols=16, seed=62)
    with ProxyProcess({"pacs": orthanc.dicomweb_url}, tmp_path) as proxy, \
            httpx.Client(timeout=30, trust_env=False) as client:
        r = client.post(f"{proxy.dicomweb_url}/studies/{mine.StudyInstanceUID}", content=body(mine, other),
                        headers=STOW)
        assert r.status_code == 409, r.text  # some stored, some refused (Orthanc's answer, passed on)
        answer = r.json()
        assert sops(answer, "00081199") == {mine.SOPInstanceUID}  # ReferencedSOPSequence
        assert sops(answer, "00081198") == {other.SOPInstanceUID}  # FailedSOPSequence
        assert answer["00081190"]["Value"][0].startswith(proxy.dicomweb_url)  # RetrieveURL: the proxy's
        found = client.get(f"{proxy.dicomweb_url}/studies", params={"PatientID": "PIDS*"}).json()
        assert {s["0020000D"]["Value"][0] for s in found} == {mine.StudyInstanceUID}


@pytest.mark.parametrize("content", [
    b"",  # an empty body
    b"a preamble and nothing else\r\n",  # the boundary never comes
    b"--stowBoundary--\r\n",  # only the close delimiter: no part
    b"x--stowBoundary\r\nContent-Type: application/dicom\r\n\r\nDICM",  # the delimiter not at a line start
])
def test_a_stow_without_a_part_is_refused_at_the_edge(orthanc, tmp_path, content):
    """A STOW body with no part is answered 400 by the proxy, and the archive is never asked (a real
    Orthanc answers such a body 200 with empty sequences, as if something had been stored)."""
    from proxy.demo.archive import ArchiveServer, SampleArchive

    counting = SampleArchive("STOWNONE")
    with ArchiveServer(counting) as server, ProxyProcess({"pacs": server.dicomweb_url}, tmp_path) as proxy, \
            httpx.Client(timeout=30, trust_env=False) as client:
        r = client.post(f"{proxy.dicomweb_url}/studies", content=content, headers=STOW)
        assert r.status_code == 400 and "no part" in r.json()["reason"]
        assert counting.requests["stow"] == 0
        ds = multiframe_native(Study(Patient("STOW^ONE", "PIDS1")), n_frames=1, rows=16, cols=16, seed=63)
        assert client.post(f"{proxy.dicomweb_url}/studies", content=body(ds), headers=STOW).status_code == 200
        assert counting.requests["stow"] == 1  # a body that opens a part goes through, whole


def test_an_empty_stow_is_answered_200_by_orthanc_itself(orthanc):
    """Why the proxy refuses a STOW without a part: the archive would answer it as a success."""
    r = httpx.post(f"{orthanc.dicomweb_url}/studies", content=b"--stowBoundary--\r\n", headers=STOW, trust_env=False)
    assert r.status_code == 200
