"""Federation when archives misbehave: slow, garbage, failing, capped (partial answers carry a Warning).

Orthanc A is the healthy archive; the others are in-process sample archives (`proxy.demo.archive`)
whose faults the tests switch on and off, each configured through a TOML file. The proxies probe
their archives only at start-up (`health_interval` is an hour), so only the tests move the breakers.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from federation_support import NO_CACHE, STUDY, column, held, study_uids, warnings, write_config
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from support import ProxyProcess

from proxy.demo.archive import ArchiveServer, Faults, SampleArchive
from proxy.demo.synth import Patient, Study, ct_series

RECORDED = Path(__file__).parent / "data" / "recorded"
DEADLINE = 0.3  # search_deadline of the sample archives, seconds
SLOWER = 2.0  # their first-byte delay when slow: several deadlines


def tiny_studies(prefix: str, n: int, date: str = "20210101") -> list:
    """`n` one-slice 16x16 studies."""
    return [ds for i in range(n) for ds in ct_series(
        Study(Patient(f"{prefix}^{i}", f"{prefix}{i:03d}"), study_date=date, accession=f"{prefix}{i}"), 1,
        rows=16, cols=16, seed=i)]


def serve(name: str, datasets: list, faults: Faults | None = None) -> ArchiveServer:
    archive = SampleArchive(name, faults)
    archive.extend(datasets)
    server = ArchiveServer(archive).start()
    server.datasets = datasets  # what the test expects it to return
    return server


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30.0, trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def samples():
    """Two sample archives with a study each: "slow" and "junk"."""
    servers = {"slow": serve("SLOW", tiny_studies("SLOW", 1)), "junk": serve("JUNK", tiny_studies("JUNK", 1))}
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture
def faults(samples):
    for s in samples.values():
        s.archive.faults.clear()
    yield {name: s.archive.faults for name, s in samples.items()}
    for s in samples.values():
        s.archive.faults.clear()


def _sample_config(name, server, **extra):
    return {"name": name, "url": server.dicomweb_url, "search_deadline": DEADLINE, "breaker_threshold": 1000,
            **extra}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, orthanc_a, samples):
    """A (Orthanc), slow and junk."""
    work = tmp_path_factory.mktemp("proxy_mixed")
    config = write_config(work / "edge.toml", [
        {"name": "a", "url": orthanc_a.dicomweb_url, "priority": 10},
        *(_sample_config(name, server) for name, server in samples.items())], health_interval=3600)
    with ProxyProcess({}, work, extra_args=["--config", str(config)]) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def samples_only(tmp_path_factory, samples):
    """Only the two sample archives, so that both can fail."""
    work = tmp_path_factory.mktemp("proxy_samples")
    config = write_config(work / "edge.toml", [_sample_config(n, s) for n, s in samples.items()],
                          health_interval=3600)
    with ProxyProcess({}, work, extra_args=["--config", str(config)]) as proxy:
        yield proxy


def on_a(orthanc_a):
    """The studies A holds, asked directly (other test modules store into the session archives too)."""
    return set(held(orthanc_a.dicomweb_url))


def _held(orthanc_a, samples, *names):
    return on_a(orthanc_a) | study_uids(ds for n in names for ds in samples[n].datasets)


def test_slow_archive_is_left_out_at_its_deadline(mixed, client, faults, samples, orthanc_a):
    assert set(column(client.get(f"{mixed.dicomweb_url}/studies", headers=NO_CACHE), STUDY)) == \
        _held(orthanc_a, samples, "slow", "junk")
    faults["slow"].first_byte_delay = SLOWER
    started = time.monotonic()
    r = client.get(f"{mixed.dicomweb_url}/studies", headers=NO_CACHE)
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert set(column(r, STUDY)) == _held(orthanc_a, samples, "junk")
    assert elapsed < SLOWER - 0.5, "the answer waited for the slow archive"
    assert any("archive 'slow'" in w and "in time" in w for w in warnings(r)), warnings(r)


def test_archive_sending_garbage_is_left_out(mixed, client, faults, samples, orthanc_a):
    faults["junk"].invalid_json = True
    r = client.get(f"{mixed.dicomweb_url}/studies", headers=NO_CACHE)
    assert r.status_code == 200
    assert set(column(r, STUDY)) == _held(orthanc_a, samples, "slow")
    ws = warnings(r)
    assert any("archive 'junk'" in w and "malformed" in w for w in ws), ws
    assert not any(str(samples["junk"].port) in w for w in ws)


def test_nothing_matching_anywhere_is_an_empty_array(mixed, client, faults):
    r = client.get(f"{mixed.dicomweb_url}/studies", params={"PatientID": "NOBODY"}, headers=NO_CACHE)
    assert r.status_code == 200 and r.json() == [] and warnings(r) == []


def test_all_archives_failing(samples_only, client, faults):
    url = f"{samples_only.dicomweb_url}/studies"
    for f in faults.values():
        f.status = 503
    r = client.get(url, headers=NO_CACHE)
    assert r.status_code == 502, r.text
    assert "'slow'" in r.json()["reason"] and "'junk'" in r.json()["reason"]
    for f in faults.values():
        f.status, f.first_byte_delay = None, SLOWER
    r = client.get(url, headers=NO_CACHE)
    assert r.status_code == 504, r.text


@pytest.fixture(scope="module")
def flaky(tmp_path_factory, orthanc_a):
    """A and "flaky", whose breaker opens after 2 failures and half-opens 1 s later."""
    server = serve("FLAKY", tiny_studies("FLAKY", 1))
    work = tmp_path_factory.mktemp("proxy_flaky")
    config = write_config(work / "edge.toml", [
        {"name": "a", "url": orthanc_a.dicomweb_url, "priority": 10},
        {"name": "flaky", "url": server.dicomweb_url, "breaker_threshold": 2, "breaker_cooldown": 1.0}],
        health_interval=3600)
    with ProxyProcess({}, work, extra_args=["--config", str(config)]) as proxy:
        yield proxy, server
    server.stop()


def _breaker_gauge(client, proxy, name):
    text = client.get(f"{proxy.url}/metrics").text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "dicomweb_edge_archive_breaker_state" and s.labels.get("archive") == name)


def _until(predicate, what, timeout=10.0):
    """Poll `predicate` until it is true, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)
    return result


def test_breaker_opens_skips_the_archive_and_lets_it_back(flaky, client, orthanc_a):
    proxy, server = flaky
    archive, url = server.archive, f"{proxy.dicomweb_url}/studies"
    mine = study_uids(server.datasets)
    everyone = on_a(orthanc_a) | mine

    def search():
        r = client.get(url, headers=NO_CACHE)
        assert r.status_code == 200, r.text
        return r

    assert set(column(search(), STUDY)) == everyone
    archive.faults.status = 503
    try:
        for _ in range(2):  # breaker_threshold = 2
            before = archive.requests["qido"]
            r = search()
            assert archive.requests["qido"] == before + 1 and set(column(r, STUDY)) == everyone - mine
            assert any("archive 'flaky' is unavailable" in w for w in warnings(r)), warnings(r)
        before = archive.requests["qido"]
        for _ in range(3):
            r = search()
            assert set(column(r, STUDY)) == everyone - mine
            assert any("archive 'flaky' was skipped" in w for w in warnings(r)), warnings(r)
        assert archive.requests["qido"] == before, "a search reached an archive whose breaker is open"
        ready = client.get(f"{proxy.url}/readyz").json()["archives"]
        assert ready["flaky"]["breaker"] == "open" and ready["a"] == {"up": True, "breaker": "closed"}
        assert _breaker_gauge(client, proxy, "flaky") == 2
        # Once the cool-down is over, one search is let through as a trial; it fails: open again.
        before = archive.requests["qido"]

        def trial():
            r = search()
            return r if archive.requests["qido"] > before else None

        r = _until(trial, "a search reaches the archive again")
        assert any("archive 'flaky' is unavailable" in w for w in warnings(r)), warnings(r)
    finally:
        archive.faults.clear()
    _until(lambda: client.get(f"{proxy.url}/readyz").json()["archives"]["flaky"]["breaker"] != "open",
           "the breaker is no longer open")
    r = search()
    assert set(column(r, STUDY)) == everyone and warnings(r) == []


def test_azure_archive_is_paged_within_its_cap(tmp_path, orthanc_a, client):
    """More studies than Azure's limit cap (200, 400 above it): every one comes, exactly once."""
    server = serve("AZURE", tiny_studies("AZ", 205, date="20200202"), Faults(max_limit=200))
    try:
        assert client.get(f"{server.dicomweb_url}/studies", params={"limit": 201}).status_code == 400
        config = write_config(tmp_path / "edge.toml", [
            {"name": "a", "url": orthanc_a.dicomweb_url, "priority": 10},
            {"name": "azure", "url": server.dicomweb_url, "profile": "azure"}], health_interval=3600)
        with ProxyProcess({}, tmp_path, extra_args=["--config", str(config)]) as proxy:
            def pages() -> int:  # searches other than the workers' health probes (limit=1), which may still land
                return sum(1 for kind, query in list(server.archive.queries) if kind == "qido" and query != "limit=1")
            before = pages()
            r = client.get(f"{proxy.dicomweb_url}/studies")
            assert r.status_code == 200 and warnings(r) == []
            got = column(r, STUDY)
            assert len(got) == len(set(got)) and set(got) == on_a(orthanc_a) | study_uids(server.datasets)
            assert pages() - before == 2  # 200, then the last 5
    finally:
        server.stop()


class Recordings:
    """A tiny origin answering `/{name}/dicom-web/studies` with `tests/data/recorded/{name}.json`."""

    name = "RECORDED"

    def __init__(self) -> None:
        self.shapes = {p.stem: json.loads(p.read_text()) for p in sorted(RECORDED.glob("*.json"))}
        self.app = Starlette(routes=[Route("/{name}/dicom-web/studies", self.studies)])

    async def studies(self, request):
        name = request.path_params["name"]
        shape = self.shapes[name]
        body = shape["body"].replace("{base}", f"http://{request.headers['host']}/{name}/dicom-web")
        return Response(body.encode() or None, shape["status"], headers=shape["headers"])


def test_recorded_archive_answers_merge(tmp_path, orthanc_a, client):
    """Empty answers in each recorded shape count as no matches; the pretty-printed study merges in."""
    recordings = Recordings()
    shapes = recordings.shapes
    server = ArchiveServer(recordings).start()  # type: ignore[arg-type]
    pretty = json.loads(shapes["orthanc-200-pretty-one-study"]["body"])[0][STUDY]["Value"][0]
    try:
        config = write_config(tmp_path / "edge.toml", [
            {"name": "a", "url": orthanc_a.dicomweb_url, "priority": 10},
            *({"name": stem, "url": f"{server.url}/{stem}/dicom-web", "profile": shape["profile"]}
              for stem, shape in shapes.items())], health_interval=3600)
        with ProxyProcess({}, tmp_path, extra_args=["--config", str(config)]) as proxy:
            r = client.get(f"{proxy.dicomweb_url}/studies", headers=NO_CACHE)
            got = column(r, STUDY)
            assert len(got) == len(set(got)) and set(got) == on_a(orthanc_a) | {pretty}
            # No archive was left out; dcm4chee's "more results" (with nothing to page on) becomes the
            # proxy's own Warning naming the archive, not its host.
            assert warnings(r) == ["299 dicomweb-edge: archive 'dcm4chee-204-warning' reported more matches "
                                   "than it returned; results may be incomplete"]
            record = next(rec for rec in r.json() if rec[STUDY]["Value"][0] == pretty)
            assert record["00081190"]["Value"] == [f"{proxy.dicomweb_url}/studies/{pretty}"]
            for stem in shapes:  # each alone, through /upstreams/{name}: `200 []` when empty, whatever it sent
                one = client.get(f"{proxy.url}/upstreams/{stem}/dicomweb/studies")
                assert one.status_code == 200, stem
                assert (one.json() != []) == (stem == "orthanc-200-pretty-one-study"), stem
    finally:
        server.stop()


class CappedDcm4chee:
    """dcm4chee with qidoMaxNumberOfResults = 2: a longer page is cut, and only a Warning says so."""

    name, cap = "CAPPED", 2

    def __init__(self, datasets: list, warning: str) -> None:
        self.records = [{STUDY: {"vr": "UI", "Value": [ds.StudyInstanceUID]}, "00080020": {"vr": "DA", "Value":
                         [ds.StudyDate]}, "00080030": {"vr": "TM", "Value": [ds.StudyTime]}} for ds in datasets]
        self.warning = warning
        self.app = Starlette(routes=[Route("/dicom-web/studies", self.studies)])

    async def studies(self, request):
        offset = int(request.query_params.get("offset", 0))
        page = self.records[offset:offset + int(request.query_params.get("limit", 99999))]
        if not page:
            return Response(None, 204)
        headers = {}
        if len(page) > self.cap:
            remaining = len(self.records) - offset - self.cap
            headers["Warning"] = re.sub(r"There are \d+", f"There are {remaining}", self.warning)
            page = page[:self.cap]
        return Response(json.dumps(page), 200, headers=headers, media_type="application/dicom+json")


def test_capped_dcm4chee_is_paged_past_its_cap(tmp_path, orthanc_a, client):
    """The proxy pages on from where the cap cut: every study once, and no archive-internal Warning."""
    data = tiny_studies("CAP", 5, date="20200303")
    warning = json.loads((RECORDED / "dcm4chee-204-warning.json").read_text())["headers"]["Warning"]
    server = ArchiveServer(CappedDcm4chee(data, warning)).start()  # type: ignore[arg-type]
    try:
        config = write_config(tmp_path / "edge.toml", [
            {"name": "a", "url": orthanc_a.dicomweb_url, "priority": 10},
            {"name": "dcm4chee", "url": server.dicomweb_url, "profile": "dcm4chee"}], health_interval=3600)
        with ProxyProcess({}, tmp_path, extra_args=["--config", str(config)]) as proxy:
            r = client.get(f"{proxy.dicomweb_url}/studies", headers=NO_CACHE)
            got = column(r, STUDY)
            assert len(got) == len(set(got)) and set(got) == on_a(orthanc_a) | study_uids(data)
            assert warnings(r) == []
    finally:
        server.stop()


async def test_concurrent_identical_searches_fan_out_once(tmp_path):
    """A worklist refreshed on 50 workstations at once while the archives are slow to answer: each archive
    is searched once, and every client gets the same merged answer (each page of it its own)."""
    import asyncio

    a = SampleArchive("SLOW_A", Faults(first_byte_delay=0.5))
    a.extend(tiny_studies("SFA", 3))
    b = SampleArchive("SLOW_B", Faults(first_byte_delay=0.5))
    b.extend(tiny_studies("SFB", 2))
    with ArchiveServer(a) as sa, ArchiveServer(b) as sb, \
            ProxyProcess({"a": sa.dicomweb_url, "b": sb.dicomweb_url}, tmp_path) as proxy:
        a.requests.clear()
        b.requests.clear()
        async with httpx.AsyncClient(trust_env=False, timeout=30, limits=httpx.Limits(max_connections=50)) as c:
            rs = await asyncio.gather(*(c.get(f"{proxy.dicomweb_url}/studies", params={"limit": 2 + i % 3})
                                        for i in range(50)))
    assert a.requests["qido"] == 1 and b.requests["qido"] == 1
    assert {r.status_code for r in rs} == {200}
    assert {len(r.json()) for r in rs} == {2, 3, 4}  # the page each asked for, of one merged answer
    assert sorted(r.headers.get("x-cache", "") for r in rs).count("HIT") == 49


async def test_concurrent_identical_searches_of_one_archive_ask_it_once(tmp_path):
    """The same with a single archive (its answers are reused briefly when the cache is on)."""
    import asyncio

    a = SampleArchive("SLOW_ONE", Faults(first_byte_delay=0.5))
    a.extend(tiny_studies("SFO", 3))
    with ArchiveServer(a) as sa, ProxyProcess({"a": sa.dicomweb_url}, tmp_path,
                                              ["--cache-dir", str(tmp_path / "c")]) as proxy:
        a.requests.clear()
        async with httpx.AsyncClient(trust_env=False, timeout=30, limits=httpx.Limits(max_connections=50)) as c:
            rs = await asyncio.gather(*(c.get(f"{proxy.dicomweb_url}/studies", params={"PatientName": "SFO*"})
                                        for _ in range(50)))
    assert a.requests["qido"] == 1
    assert {r.status_code for r in rs} == {200} and {len(r.json()) for r in rs} == {3}
    assert sorted(r.headers.get("x-cache", "") for r in rs).count("HIT") == 49
