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
