"""Structured logs (issue 6 point 4): JSON lines with a request id that the client, the archive and every
record of the request share; archive, cache result, bytes and durations; no patient data unless asked."""

import json
import time

import httpx
import pytest
from support import ProxyProcess, split_multipart

from proxy.demo.archive import ArchiveServer, Faults, SampleArchive
from proxy.demo.synth import Patient, Study, multiframe_native, to_part10

ANY = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}


@pytest.fixture(scope="module")
def native():
    return multiframe_native(Study(Patient("LOGS^PATIENT", "PIDLOG1")), n_frames=3, rows=64, cols=64)


@pytest.fixture()
def archive(native):
    sample = SampleArchive("LOGS", Faults())
    sample.add(native)
    with ArchiveServer(sample) as server:
        yield sample, server


def frame_url(base, ds, frames="1"):
    return (f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
            f"/frames/{frames}")


def records(proxy):
    """Every line the proxy logged, parsed (a line that is not JSON fails the test)."""
    lines = [ln for ln in proxy.log_path.read_text().splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]


def access(proxy, request_id, timeout=5.0):
    """The access record of one request (written just after its last byte went out: wait for it, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in records(proxy) if r.get("logger") == "dicomweb_edge.access"
                 and r["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(found) == 1, found
    return found[0]


def test_access_records_share_the_request_id_with_client_and_archive(archive, native, tmp_path):
    sample, server = archive
    with ProxyProcess({"logs": server.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        r = c.get(frame_url(proxy.dicomweb_url, native), headers={**ANY, "X-Request-ID": "viewer-42.a"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "viewer-42.a"
        assert sample.request_ids[-1] == "viewer-42.a"  # sent upstream too
        miss = access(proxy, "viewer-42.a")
        assert miss["service"] == "frames" and miss["status"] == 200 and miss["method"] == "GET"
        assert miss["archive"] == "logs" and miss["cache"] == "miss"
        assert miss["bytes_out"] == len(r.content) and miss["bytes_in"] == 0
        assert 0 < miss["ttfb_ms"] <= miss["duration_ms"]

        r = c.get(frame_url(proxy.dicomweb_url, native), headers=ANY)  # no id: one is made up
        rid = r.headers["x-request-id"]
        assert len(rid) == 16 and int(rid, 16) >= 0
        hit = access(proxy, rid)
        assert hit["cache"] == "hit" and "archive" not in hit  # served without the archive

        r = c.get(frame_url(proxy.dicomweb_url, native), headers={**ANY, "X-Request-ID": "bad id\twith spaces"})
        assert r.headers["x-request-id"] != "bad id\twith spaces"  # not echoed: replaced
        access(proxy, r.headers["x-request-id"])

        body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + to_part10(native) + b"\r\n--b--\r\n"
        r = c.post(f"{proxy.dicomweb_url}/studies", content=body, headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b', "X-Request-ID": "stow-1"})
        assert r.status_code == 200
        stored = access(proxy, "stow-1")
        assert stored["service"] == "stow" and stored["bytes_in"] == len(body)
    text = proxy.log_path.read_text()
    assert native.StudyInstanceUID not in text and "LOGS^PATIENT" not in text and "PIDLOG1" not in text


def test_errors_during_a_request_carry_its_id(archive, native, tmp_path):
    """A warning logged while answering (here: the archive cut the body) names the request it belongs to."""
    sample, server = archive
    sample.faults.reset_after_bytes = 3000
    with ProxyProcess({"logs": server.dicomweb_url}, tmp_path) as proxy, httpx.Client(trust_env=False) as c:
        with pytest.raises(httpx.HTTPError):  # the client sees a truncated body
            c.get(f"{proxy.dicomweb_url}/studies/{native.StudyInstanceUID}", headers={
                "Accept": 'multipart/related; type="application/dicom"', "X-Request-ID": "cut-1"}).read()
    access(proxy, "cut-1")
    mine = [r for r in records(proxy) if r.get("request_id") == "cut-1"]
    assert any(r["level"] == "warning" for r in mine), mine
    assert any(r["logger"] == "dicomweb_edge.access" for r in mine)


def test_patient_data_only_with_the_debug_flag(archive, native, tmp_path):
    _, server = archive
    with ProxyProcess({"logs": server.dicomweb_url}, tmp_path, env={"DICOMWEB_EDGE_LOG_PATIENT_DATA": "true"}) \
            as proxy:
        r = httpx.get(frame_url(proxy.dicomweb_url, native), headers={**ANY, "X-Request-ID": "dbg-1"},
                      trust_env=False)
        assert r.status_code == 200 and split_multipart(r.content, r.headers["content-type"])[1]
    assert access(proxy, "dbg-1")["path"] == frame_url("/dicomweb", native)


def test_text_format_for_terminals(archive, native, tmp_path):
    _, server = archive
    with ProxyProcess({"logs": server.dicomweb_url}, tmp_path, env={"DICOMWEB_EDGE_LOG_FORMAT": "text"}) as proxy:
        httpx.get(f"{proxy.dicomweb_url}/studies", headers={"X-Request-ID": "txt-1"}, trust_env=False)
        deadline = time.monotonic() + 5
        while "request_id=txt-1" not in proxy.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
    line = next(ln for ln in proxy.log_path.read_text().splitlines() if "request_id=txt-1" in ln)
    assert " INFO dicomweb_edge.access request " in line and "service=qido" in line and "status=200" in line
