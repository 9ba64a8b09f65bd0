"""Rendered images, thumbnails, bulk data and single instances through the cache, against a real Orthanc
(issue 4 point 2: keys that name the bytes, for every retrievable object, with the frame cache's safety)."""

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ProxyProcess, orthanc_file, orthanc_holding, split_multipart

from proxy.demo.synth import Patient, Study, ct_series, multiframe_native, to_part10

ANY_DICOM = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
JPEG = {"Accept": "image/jpeg"}


@pytest.fixture(scope="module")
def data():
    return multiframe_native(Study(Patient("OBJ^NATIVE", "PIDO1")), n_frames=6, rows=256, cols=256)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, data):
    yield from orthanc_holding(tmp_path_factory, "OBJECTS", [data])


def inst(base, ds):
    return f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def metric(proxy, name, **labels):
    text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def upstream(proxy, service):
    return metric(proxy, "dicomweb_edge_upstream_requests_total", service=service)


def settled_upstream(proxy, service, at_least):
    """The upstream request count once the miss is counted (the count lands when the archive response is
    released, which can be just after the client has read the last byte): wait for it, bounded."""
    deadline = time.monotonic() + 10
    while (n := upstream(proxy, service)) < at_least:
        assert time.monotonic() < deadline, n
        time.sleep(0.02)
    return n


def wait_disk_entries(c, proxy, at_least):
    deadline = time.monotonic() + 20
    while (stats := c.get(f"{proxy.url}/admin/cache").json())["disk_entries"] < at_least:  # writes are off-loop
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def stow(c, proxy, ds):
    boundary = "objectsTestBoundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_part10(ds)
            + f"\r\n--{boundary}--\r\n".encode())
    return c.post(f"{proxy.dicomweb_url}/studies", content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def test_rendered_and_thumbnails_are_hits_keyed_by_parameters_and_media_type(archive, data, tmp_path):
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        rendered = inst(proxy.dicomweb_url, data) + "/frames/2/rendered"
        first = c.get(rendered + "?quality=80&viewport=64,64", headers=JPEG)
        assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
        assert first.content[:2] == b"\xff\xd8" and first.headers["content-type"].startswith("image/jpeg")
        direct = inst(archive.dicomweb_url, data) + "/frames/2/rendered?quality=80&viewport=64,64"
        assert first.content == c.get(direct, headers=JPEG).content  # the archive's rendering, then cached
        before = settled_upstream(proxy, "rendered", at_least=1)
        again = c.get(rendered + "?viewport=64,64&quality=80", headers=JPEG)  # same parameters, other order
        assert again.headers["x-cache"] == "HIT" and again.content == first.content
        assert again.headers["vary"] == "Accept" and again.headers["content-type"].startswith("image/jpeg")
        assert int(again.headers["content-length"]) == len(first.content)
        assert c.get(rendered + "?viewport=64,64&quality=80",
                     headers={**JPEG, "If-None-Match": again.headers["etag"]}).status_code == 304
        assert upstream(proxy, "rendered") == before
        assert metric(proxy, "dicomweb_edge_cache_lookups_total", kind="rendered", result="hit") >= 2

        other_quality = c.get(rendered + "?viewport=64,64&quality=20", headers=JPEG)
        assert other_quality.headers["x-cache"] == "MISS" and other_quality.content != first.content
        png = c.get(rendered + "?viewport=64,64&quality=80", headers={"Accept": "image/png"})
        assert png.headers["x-cache"] == "MISS" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.content == c.get(direct, headers={"Accept": "image/png"}).content
        png2 = c.get(rendered + "?viewport=64,64&quality=80&accept=image/png")  # the accept parameter
        assert png2.headers["x-cache"] == "HIT" and png2.content == png.content
        assert upstream(proxy, "rendered") == before + 2

        thumb = inst(proxy.dicomweb_url, data) + "/thumbnail"
        t1, t2 = c.get(thumb, headers=JPEG), c.get(thumb, headers=JPEG)
        assert (t1.headers["x-cache"], t2.headers["x-cache"]) == ("MISS", "HIT") and t1.content == t2.content
        assert t1.content != first.content  # a thumbnail is not the viewport=64,64 rendering
        assert c.get(thumb + "?viewport=300,300", headers=JPEG).status_code == 200
        assert upstream(proxy, "thumbnail") == 2


def test_instances_and_bulk_data_are_hits_in_every_representation(archive, data, tmp_path):
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        url = inst(proxy.dicomweb_url, data)
        first = c.get(url, headers=ANY_DICOM)
        assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
        (headers, part10), = split_multipart(first.content, first.headers["content-type"])[1]
        assert part10 == orthanc_file(archive, data.SOPInstanceUID)  # the stored file, then the same from the cache
        before = settled_upstream(proxy, "instance", at_least=1)
        again = c.get(url, headers=ANY_DICOM)
        assert again.headers["x-cache"] == "HIT" and upstream(proxy, "instance") == before
        (hit_headers, hit_part10), = split_multipart(again.content, again.headers["content-type"])[1]
        assert hit_part10 == part10 and dict(hit_headers)["Content-Type"] == dict(headers)["Content-Type"]
        assert dict(hit_headers)["Content-Location"] == url
        assert "transfer-syntax=1.2.840.10008.1.2.1" in dict(hit_headers)["Content-Type"]

        # Single part, Explicit VR Little Endian: what `*` was answered with, so the same entry.
        single = c.get(url, headers={"Accept": "application/dicom"})
        assert single.headers["x-cache"] == "HIT" and single.content == part10
        assert single.headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
        implicit = {"Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2"}  # another encoding
        one, two = c.get(url, headers=implicit), c.get(url, headers=implicit)
        assert (one.headers["x-cache"], two.headers["x-cache"]) == ("MISS", "HIT")
        assert one.content == two.content != part10
        implicit_parts = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'
        direct = c.get(inst(archive.dicomweb_url, data), headers={"Accept": implicit_parts})  # the archive's own
        assert two.content == split_multipart(direct.content, direct.headers["content-type"])[1][0][1]
        assert two.headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2"
        assert upstream(proxy, "instance") == before + 1

        meta = c.get(url + "/metadata").json()[0]
        bulk_uri = meta["7FE00010"]["BulkDataURI"]
        assert bulk_uri.startswith(proxy.dicomweb_url)
        b1 = c.get(bulk_uri)
        assert b1.status_code == 200 and b1.headers["x-cache"] == "MISS"
        b2 = c.get(bulk_uri)
        assert b2.headers["x-cache"] == "HIT"
        parts = [split_multipart(r.content, r.headers["content-type"])[1] for r in (b1, b2)]
        assert parts[0] == parts[1] and len(parts[1]) == 1  # same part headers and bytes (boundaries differ)
        assert parts[1][0][1] == data.PixelData and dict(parts[1][0][0])["Content-Location"] == bulk_uri
        assert upstream(proxy, "bulkdata") == 1
        assert metric(proxy, "dicomweb_edge_cache_lookups_total", kind="bulkdata", result="hit") >= 1
        assert metric(proxy, "dicomweb_edge_cache_lookups_total", kind="instance", result="hit") >= 1


def test_purge_and_store_drop_cached_objects(archive, data, tmp_path):
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        url = inst(proxy.dicomweb_url, data)
        study_thumb = f"{proxy.dicomweb_url}/studies/{data.StudyInstanceUID}/thumbnail"
        targets = [(url, ANY_DICOM), (url + "/rendered", JPEG), (study_thumb, JPEG)]
        for u, h in targets:
            assert c.get(u, headers=h).headers["x-cache"] == "MISS"
        wait_disk_entries(c, proxy, 4)  # instance + its `*` index, rendering, thumbnail
        for u, h in targets:
            assert c.get(u, headers=h).headers["x-cache"] == "HIT"
        assert c.post(f"{proxy.url}/admin/cache/purge", params={"study": data.StudyInstanceUID}).json()["removed"] >= 4
        for u, h in targets:
            assert c.get(u, headers=h).headers["x-cache"] == "MISS"
        wait_disk_entries(c, proxy, 4)
        assert c.get(study_thumb, headers=JPEG).headers["x-cache"] == "HIT"

        same = Study(Patient("OBJ^NATIVE", "PIDO1"), study_uid=data.StudyInstanceUID)
        extra = next(ct_series(same, 1, rows=16, cols=16))
        assert stow(c, proxy, extra).status_code == 200  # the study changed: its renderings may have
        for u, h in targets:
            assert c.get(u, headers=h).headers["x-cache"] == "MISS"


def test_a_truncated_entry_is_never_served(archive, data, tmp_path):
    cache_dir = tmp_path / "c"
    url = inst("{base}", data)
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path / "one", ["--cache-dir", str(cache_dir)]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        good = c.get(url.format(base=proxy.dicomweb_url), headers={"Accept": "application/dicom"})
        assert good.headers["x-cache"] == "MISS" and good.content == orthanc_file(archive, data.SOPInstanceUID)
        wait_disk_entries(c, proxy, 1)
    blobs = list(cache_dir.rglob("*.val"))
    assert blobs, "a 790 KB instance is stored as a file"
    for p in blobs:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path / "two", ["--cache-dir", str(cache_dir)]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        r = c.get(url.format(base=proxy.dicomweb_url), headers={"Accept": "application/dicom"})
        assert r.headers["x-cache"] == "MISS" and r.content == good.content
        assert metric(proxy, "dicomweb_edge_cache_lookups_total", kind="instance", result="corrupt") == 1
        r = c.get(url.format(base=proxy.dicomweb_url), headers={"Accept": "application/dicom"})
        assert r.headers["x-cache"] == "HIT" and r.content == good.content


def test_composed_bulkdata_shares_entries_with_the_element_urls(archive, data, tmp_path):
    """`.../bulkdata` is made of the instance's bulk data elements: each element is one cache entry, whether
    it was first asked through its own URL or inside the composed resource."""
    any_bulk = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
    for order in ("element first", "composed first"):
        with ProxyProcess({"a": archive.dicomweb_url}, tmp_path / order, ["--cache-dir", str(tmp_path / order / "c")],
                          ) as proxy, httpx.Client(trust_env=False, timeout=30) as c:
            url = inst(proxy.dicomweb_url, data)
            element = c.get(url + "/metadata").json()[0]["7FE00010"]["BulkDataURI"]
            first = c.get(element if order == "element first" else url + "/bulkdata", headers=any_bulk)
            assert first.status_code == 200
            wait_disk_entries(c, proxy, 2)  # the element and its `*` index
            before = upstream(proxy, "bulkdata")
            second = c.get(url + "/bulkdata" if order == "element first" else element, headers=any_bulk)
            assert second.status_code == 200 and upstream(proxy, "bulkdata") == before
            for r in (first, second):
                (headers, body), = split_multipart(r.content, r.headers["content-type"])[1]
                assert body == data.PixelData and dict(headers)["Content-Location"] == element
            if order == "composed first":
                assert second.headers["x-cache"] == "HIT"


@pytest.mark.parametrize("proxies", [1, 2])
@pytest.mark.parametrize("kind", ["retrieve", "rendered", "bulk"])
async def test_concurrent_identical_object_misses_ask_the_archive_once(data, tmp_path, kind, proxies):
    """Single-flight for whole objects: 30 clients asking for the same instance, rendering or bulk data
    element while the archive is slow answer from one archive request (the others wait for it and are
    served from the cache), all with the same bytes; with two siblings on one cache directory (as two
    workers are) too, the other reading it from the shared disk tier."""
    import asyncio
    from contextlib import ExitStack

    from proxy.demo.archive import ArchiveServer, Faults, SampleArchive

    archive = SampleArchive("OBJ_SF", Faults(first_byte_delay=0.5))
    archive.add(data)
    path, accept = {"retrieve": ("", ANY_DICOM), "rendered": ("/rendered", JPEG),
                    "bulk": ("/bulk/7fe00010", {"Accept": "application/octet-stream"})}[kind]
    with ArchiveServer(archive) as server, ExitStack() as stack:
        fronts = [stack.enter_context(ProxyProcess({"a": server.dicomweb_url}, tmp_path / str(i),
                                                   ["--cache-dir", str(tmp_path / "c")])) for i in range(proxies)]
        async with httpx.AsyncClient(trust_env=False, timeout=30, limits=httpx.Limits(max_connections=30)) as c:
            rs = await asyncio.gather(*(c.get(inst(fronts[i % proxies].dicomweb_url, data) + path, headers=accept)
                                        for i in range(30)))
        waiters = sum(metric(p, "dicomweb_edge_cache_singleflight_waiters_total") for p in fronts)
        asked = archive.requests[kind]
        if kind == "rendered":  # what the archive renders (asked once more, directly, after the count)
            expected = httpx.get(inst(server.dicomweb_url, data) + path, headers=accept, trust_env=False).content
    assert {r.status_code for r in rs} == {200}
    bodies = {r.content if kind != "retrieve" else split_multipart(r.content, r.headers["content-type"])[1][0][1]
              for r in rs}
    if kind == "retrieve":
        expected = to_part10(data)  # the Part 10 bytes the archive holds
    elif kind == "bulk":
        expected = data.PixelData
    assert bodies == {expected}  # every client got the archive's bytes, not just the same bytes
    assert asked == 1 and waiters == 29
    assert sorted(r.headers["x-cache"] for r in rs).count("MISS") == 1
