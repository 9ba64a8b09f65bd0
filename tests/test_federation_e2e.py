"""Federation against three real Orthanc archives behind one endpoint: merged, de-duplicated, paged search.

A and B are the session archives (`demo_data`); C, started here, holds a copy of A's CT study, two
studies of its own and one more series (OT) of the study split between A and B. Priorities: A 30
(stores = false), C 20, B 10, so stores go to C and B is searched and located last. Expected values
come from the datasets each archive was given, and from each archive asked directly for the set of
studies it holds (other modules store studies of their own into the session archives).
"""

from __future__ import annotations

import io

import httpx
import pytest
from federation_support import (
    MODALITIES,
    N_SERIES,
    N_SERIES_INSTANCES,
    N_STUDY_INSTANCES,
    NO_CACHE,
    RETRIEVE_URL,
    SERIES,
    SOP,
    STUDY,
    column,
    held,
    holdings,
    newest_first,
    study_uids,
    warnings,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from support import ProxyProcess, dicomweb_client, missing, split_multipart

from proxy.demo.orthanc import OrthancServer, find_orthanc
from proxy.demo.synth import Patient, Study, ct_series, multiframe_native, to_part10


@pytest.fixture(scope="module")
def c_data(demo_data):
    """C: A's CT study, a study with the same date and time (UID breaks the tie), one on the split
    study's date but earlier in the day, and an OT series of the split study."""
    uids = demo_data.uids
    ct = [ds for ds in demo_data.archive_a if ds.StudyInstanceUID == uids["ct_study"]]
    split = next(ds for ds in demo_data.archive_b if ds.StudyInstanceUID == uids["split_study"])
    same_time = Study(Patient("ROE^CARLA", "PID801"), study_date=ct[0].StudyDate, study_time=ct[0].StudyTime,
                      accession="ACC801", description="C SAME TIME")
    earlier = Study(Patient("ROE^CARL", "PID802"), study_date=split.StudyDate, study_time="090000",
                    accession="ACC802", description="C EARLIER")
    split_study = Study(Patient(str(split.PatientName), split.PatientID, split.PatientBirthDate, split.PatientSex),
                        study_uid=split.StudyInstanceUID, study_date=split.StudyDate, study_time=split.StudyTime,
                        accession=split.AccessionNumber, description=split.StudyDescription)
    ot = multiframe_native(split_study, n_frames=2, rows=16, cols=16, seed=13)
    ot.SeriesNumber = 3
    return [*ct, *ct_series(same_time, 2, rows=16, cols=16, seed=11),
            *ct_series(earlier, 1, rows=16, cols=16, seed=12), ot]


@pytest.fixture(scope="module")
def orthanc_c(tmp_path_factory, c_data):
    if find_orthanc() is None:
        missing("Orthanc with the DICOMweb plugin is not installed (run ./scripts/test.sh to install it)")
    with OrthancServer(tmp_path_factory.mktemp("orthanc_c"), "ORTHANC_C") as server:
        server.store(c_data)
        yield server


@pytest.fixture(scope="module")
def config(tmp_path_factory, orthanc_a, orthanc_b, orthanc_c):
    return write_config(tmp_path_factory.mktemp("federation") / "edge.toml", [
        {"name": "a", "url": orthanc_a.dicomweb_url, "priority": 30, "stores": False},
        {"name": "c", "url": orthanc_c.dicomweb_url, "priority": 20, "stores": True, "breaker_threshold": 50},
        {"name": "b", "url": orthanc_b.dicomweb_url, "priority": 10, "stores": True},
    ], health_interval=3600, search_cache_ttl=300)


@pytest.fixture(scope="module")
def fed(config, tmp_path_factory):
    with ProxyProcess({}, tmp_path_factory.mktemp("proxy_fed"), extra_args=["--config", str(config)]) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=60.0, trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def archives(demo_data, c_data):
    """What each archive holds, by configured name."""
    return {"a": demo_data.archive_a, "b": demo_data.archive_b, "c": c_data}


@pytest.fixture(scope="module")
def orthancs(orthanc_a, orthanc_b, orthanc_c):
    return {"a": orthanc_a, "b": orthanc_b, "c": orthanc_c}


def everything(archives):
    return [*archives["a"], *archives["b"], *archives["c"]]


def union(orthancs, *names):
    """Every study the named archives (all by default) hold now, each asked directly: date and time by UID."""
    out = {}
    for name in names or orthancs:
        out.update(held(orthancs[name].dicomweb_url))
    return out


def _series_one(demo_data):
    """The split study's series 1: on A, with one of its instances also on B."""
    on_a = {ds.SOPInstanceUID for ds in demo_data.archive_a}
    return next(ds.SeriesInstanceUID for ds in demo_data.archive_b if ds.SOPInstanceUID in on_a)


def test_one_search_returns_every_study_of_every_archive_once(fed, client, archives, orthancs, demo_data):
    for name, data in archives.items():
        assert study_uids(data) <= set(held(orthancs[name].dicomweb_url))
    r = client.get(f"{fed.dicomweb_url}/studies", headers=NO_CACHE)
    assert r.status_code == 200 and warnings(r) == []
    got = column(r, STUDY)
    assert len(got) == len(set(got))
    assert set(got) == set(union(orthancs))
    records = {rec[STUDY]["Value"][0]: rec for rec in r.json()}
    assert all(rec[RETRIEVE_URL]["Value"][0] == f"{fed.dicomweb_url}/studies/{uid}" for uid, rec in records.items())

    ct = demo_data.uids["ct_study"]  # held by A and C, whole on both: the counts are exact
    counts = {name: holdings(data, ct) for name, data in archives.items()}
    assert counts["a"] == counts["c"] and counts["b"][1] == 0
    assert int(records[ct][N_STUDY_INSTANCES]["Value"][0]) == counts["a"][1]

    # The split study: modalities united; counts are the largest any archive reports (merge.py policy).
    split = demo_data.uids["split_study"]
    per_archive = [holdings(data, split) for data in archives.values()]
    assert records[split][MODALITIES]["Value"] == sorted(set().union(*(m for _, _, m in per_archive)))
    assert len(records[split][MODALITIES]["Value"]) > 1
    assert int(records[split][N_SERIES]["Value"][0]) == max(s for s, _, _ in per_archive)
    assert int(records[split][N_STUDY_INSTANCES]["Value"][0]) == max(n for _, n, _ in per_archive)


def test_order_is_deterministic_and_pages_cover_the_set_once(fed, client, orthancs):
    expected = newest_first(union(orthancs))
    url = f"{fed.dicomweb_url}/studies"
    assert column(client.get(url, headers=NO_CACHE), STUDY) == expected
    assert column(client.get(url, headers=NO_CACHE), STUDY) == expected

    walked, offset = [], 0
    while True:
        r = client.get(url, params={"limit": 2, "offset": offset})
        if r.status_code == 204 or r.json() == []:
            break
        page = column(r, STUDY)
        assert 1 <= len(page) <= 2
        remaining = len(expected) - offset - len(page)
        more = [w for w in warnings(r) if "additional results" in w]
        assert more == ([f"299 dicomweb-edge: There are {remaining} additional results that can be requested"]
                        if remaining else [])
        walked += page
        offset += len(page)
        assert offset <= len(expected), "paging does not end"
    assert walked == expected

    dw = dicomweb_client(fed.dicomweb_url)
    found = dw.search_for_studies(limit=2, get_remaining=True)
    assert [s[STUDY]["Value"][0] for s in found] == expected


def test_series_and_instances_of_the_split_study_come_once(fed, client, archives, demo_data):
    split = demo_data.uids["split_study"]
    mine = [ds for ds in everything(archives) if ds.StudyInstanceUID == split]
    r = client.get(f"{fed.dicomweb_url}/studies/{split}/series", headers=NO_CACHE)
    assert r.status_code == 200 and warnings(r) == []
    series = column(r, SERIES)
    assert sorted(series) == sorted({ds.SeriesInstanceUID for ds in mine})
    first = _series_one(demo_data)
    counts = {name: len({ds.SOPInstanceUID for ds in data if ds.SeriesInstanceUID == first})
              for name, data in archives.items()}
    record = next(rec for rec in r.json() if rec[SERIES]["Value"][0] == first)
    assert int(record[N_SERIES_INSTANCES]["Value"][0]) == max(counts.values())

    r = client.get(f"{fed.dicomweb_url}/studies/{split}/instances", headers=NO_CACHE)
    sops = column(r, SOP)
    assert len(sops) == len(set(sops))
    assert set(sops) == {ds.SOPInstanceUID for ds in mine}
    shared = {ds.SOPInstanceUID for ds in demo_data.archive_a} & {ds.SOPInstanceUID for ds in demo_data.archive_b}
    assert shared and shared <= set(sops)


def test_a_stopped_archive_is_named_and_left_out(fed, client, orthanc_c, orthancs, archives, demo_data):
    rest, everyone = set(union(orthancs, "a", "b")), set(union(orthancs))
    split = demo_data.uids["split_study"]
    client.get(f"{fed.dicomweb_url}/studies?StudyInstanceUID={split}", headers=NO_CACHE)  # learn its holders
    orthanc_c.stop()
    try:
        r = client.get(f"{fed.dicomweb_url}/studies", headers=NO_CACHE)
        assert r.status_code == 200
        assert set(column(r, STUDY)) == rest
        ws = warnings(r)
        assert any("archive 'c'" in w for w in ws), ws
        assert not any(str(orthanc_c.port) in w or "127.0.0.1" in w or "http" in w for w in ws), ws
        # A study split across archives still comes back, without C's instances and saying so.
        rest_sops = {ds.SOPInstanceUID for name in ("a", "b") for ds in archives[name]
                     if ds.StudyInstanceUID == split}
        for path in (f"/studies/{split}", f"/studies/{split}/metadata"):
            r = client.get(fed.dicomweb_url + path, headers={"Accept": "*/*"} if "metadata" not in path else {})
            assert r.status_code == 200, r.text[:200]
            assert any("archive 'c'" in w for w in warnings(r)), warnings(r)
            if "metadata" in path:
                assert {m[SOP]["Value"][0] for m in r.json()} == rest_sops
            else:
                _, parts = split_multipart(r.content, r.headers["content-type"])
                assert {dcmread(io.BytesIO(body)).SOPInstanceUID for _, body in parts} == rest_sops
    finally:
        orthanc_c.start()
    ready = client.get(f"{fed.url}/readyz")
    assert ready.status_code == 200 and ready.json()["archives"]["c"] == {"up": True, "breaker": "closed"}
    r = client.get(f"{fed.dicomweb_url}/studies", headers=NO_CACHE)
    assert set(column(r, STUDY)) == everyone and warnings(r) == []


def test_single_archive_endpoint_shows_only_that_archive(fed, client, orthanc_b):
    r = client.get(f"{fed.url}/upstreams/b/dicomweb/studies")
    got = column(r, STUDY)
    assert len(got) == len(set(got)) and set(got) == set(held(orthanc_b.dicomweb_url))
    assert all(u.startswith(f"{fed.url}/upstreams/b/dicomweb/studies/") for u in column(r, RETRIEVE_URL))
    assert client.get(f"{fed.url}/upstreams/nosuch/dicomweb/studies").status_code == 404


def test_study_only_on_b_is_located_and_retrieved(config, tmp_path, demo_data):
    """A fresh proxy knows nothing yet: the study is found by probing, though B is searched last."""
    mf = next(ds for ds in demo_data.archive_b if ds.StudyInstanceUID == demo_data.uids["multiframe_study"])
    with ProxyProcess({}, tmp_path, extra_args=["--config", str(config)]) as proxy:
        got = dicomweb_client(proxy.dicomweb_url).retrieve_study(mf.StudyInstanceUID)
        metrics = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    assert [ds.SOPInstanceUID for ds in got] == [mf.SOPInstanceUID]
    probed = {s.labels["archive"] for f in text_string_to_metric_families(metrics) for s in f.samples
              if s.name == "dicomweb_edge_upstream_requests_total" and s.labels.get("service") == "locate"}
    assert probed == {"a", "b", "c"}  # the miss asked every archive
    assert got[0].PixelData == mf.PixelData


def test_split_study_retrieve_and_metadata_have_every_instance_once(fed, archives, demo_data):
    split = demo_data.uids["split_study"]
    source = {ds.SOPInstanceUID: ds for ds in everything(archives) if ds.StudyInstanceUID == split}
    assert len(source) == 8  # 4 + 3 from A and B (one instance on both) and C's OT instance
    dw = dicomweb_client(fed.dicomweb_url)
    got = dw.retrieve_study(split)
    assert sorted(ds.SOPInstanceUID for ds in got) == sorted(source)
    assert all(ds.PixelData == source[ds.SOPInstanceUID].PixelData for ds in got)
    meta = dw.retrieve_study_metadata(split)
    assert sorted(m[SOP]["Value"][0] for m in meta) == sorted(source)

    first = _series_one(demo_data)
    series = dw.retrieve_series(split, first)
    expected = sorted(s for s, ds in source.items() if ds.SeriesInstanceUID == first)
    assert len(expected) == 4 and sorted(ds.SOPInstanceUID for ds in series) == expected


def test_instance_only_on_b_by_instance_and_frames(fed, demo_data):
    split = demo_data.uids["split_study"]
    on_a = {ds.SOPInstanceUID for ds in demo_data.archive_a}
    only_b = next(ds for ds in demo_data.archive_b if ds.StudyInstanceUID == split and ds.SOPInstanceUID not in on_a)
    dw = dicomweb_client(fed.dicomweb_url)
    got = dw.retrieve_instance(split, only_b.SeriesInstanceUID, only_b.SOPInstanceUID)
    assert got.SOPInstanceUID == only_b.SOPInstanceUID and got.PixelData == only_b.PixelData
    frames = dw.retrieve_instance_frames(split, only_b.SeriesInstanceUID, only_b.SOPInstanceUID, [1])
    assert frames == [only_b.PixelData]


def _qido(orthanc, study):
    r = httpx.get(f"{orthanc.dicomweb_url}/studies", params={"StudyInstanceUID": study}, trust_env=False)
    return column(r, STUDY)


def test_store_goes_to_the_highest_priority_store_archive(fed, client, orthancs):
    orthanc_a, orthanc_b, orthanc_c = orthancs["a"], orthancs["b"], orthancs["c"]
    url = f"{fed.dicomweb_url}/studies"
    assert client.get(url).status_code == 200  # the merged set is now cached (search_cache_ttl = 300)
    # Read back from Part-10 bytes: dicomweb-client writes datasets as they are, and one made in memory
    # has no preamble, which Orthanc would store and serve like that.
    new = [dcmread(io.BytesIO(to_part10(ds))) for ds in ct_series(
        Study(Patient("NEW^STORED", "PID899"), study_date="20250102", accession="ACC899"), 2, rows=16, cols=16,
        seed=21)]
    uid = new[0].StudyInstanceUID
    dw = dicomweb_client(fed.dicomweb_url)
    result = dw.store_instances(new)
    assert result.RetrieveURL == f"{fed.dicomweb_url}/studies/{uid}"
    refs = result.ReferencedSOPSequence
    assert sorted(r.ReferencedSOPInstanceUID for r in refs) == sorted(ds.SOPInstanceUID for ds in new)
    assert all(r.RetrieveURL.startswith(f"{fed.dicomweb_url}/studies/{uid}/") for r in refs)
    # C (priority 20, stores) has it; A (priority 30, stores = false) and B (priority 10) do not.
    assert _qido(orthanc_c, uid) == [uid]
    assert _qido(orthanc_a, uid) == [] and _qido(orthanc_b, uid) == []

    r = client.get(url)  # no no-cache: the store dropped the cached merge
    assert column(r, STUDY) == newest_first(union(orthancs)) and uid in column(r, STUDY)
    got = dw.retrieve_study(uid)
    assert sorted(ds.SOPInstanceUID for ds in got) == sorted(ds.SOPInstanceUID for ds in new)


def test_paging_is_consistent_while_an_archive_gains_a_study(fed, client, orthancs):
    """A viewer pages through the federated study list two at a time while a new study arrives in one
    archive directly (not through the proxy, which would drop its cached searches): the pages still walk
    the list the first page came from, each study once and none skipped, though the newcomer sorts first.
    A search asking for fresh results (Cache-Control: no-cache) finds it, first. Kept last in this module:
    the archive keeps the study."""
    url = f"{fed.dicomweb_url}/studies"
    snapshot = newest_first(union(orthancs))
    first = client.get(url, params={"limit": 2, "offset": 0}, headers=NO_CACHE)
    assert column(first, STUDY) == snapshot[:2]
    newcomer = Study(Patient("NEW^ARRIVAL", "PID901"), study_date="20991231", accession="ACC901",
                     description="ARRIVED WHILE PAGING")
    orthancs["c"].store(ct_series(newcomer, 1, rows=16, cols=16, seed=21))
    assert newest_first(union(orthancs)) == [newcomer.study_uid, *snapshot]  # the archives have it now
    walked, offset = column(first, STUDY), 2
    while offset < len(snapshot):
        page = column(client.get(url, params={"limit": 2, "offset": offset}), STUDY)
        assert page, f"page at offset {offset} is empty"
        walked += page
        offset += len(page)
    assert walked == snapshot
    assert column(client.get(url, headers=NO_CACHE), STUDY) == [newcomer.study_uid, *snapshot]
