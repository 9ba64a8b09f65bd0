"""The frame cache against a real Orthanc (issue 4: tiers, keys, tee, safety)."""

import contextlib

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.encaps import generate_frames
from support import ProxyProcess, missing, orthanc_file, orthanc_holding, split_multipart

from proxy.demo.synth import Patient, Study, multiframe_jpeg, multiframe_native, to_part10

ANY = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
FRAME = 256 * 256 * 2


@pytest.fixture(scope="module")
def data():
    native = multiframe_native(Study(Patient("CACHE^NATIVE", "PIDC1")), n_frames=6, rows=256, cols=256)
    jpeg = multiframe_jpeg(Study(Patient("CACHE^JPEG", "PIDC2")), n_frames=4)
    return native, jpeg


@pytest.fixture(scope="module")
def archive(tmp_path_factory, data):
    yield from orthanc_holding(tmp_path_factory, "CACHE", data)


def url(base, ds, frames):
    return (f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
            f"/frames/{frames}")


def native_frame(ds, n):
    return ds.PixelData[(n - 1) * FRAME : n * FRAME]


def payloads(r):
    return [body for _, body in split_multipart(r.content, r.headers["content-type"])[1]]


def stow(client, proxy, ds):
    """Store one dataset through the proxy (STOW-RS); returns the response."""
    boundary = "cacheTestBoundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_part10(ds)
            + f"\r\n--{boundary}--\r\n".encode())
    return client.post(f"{proxy.dicomweb_url}/studies", content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def upstream_frame_requests(proxy):
    text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "dicomweb_edge_upstream_requests_total" and s.labels.get("service") == "frames")


def test_hits_need_no_archive_and_only_missing_frames_go_upstream(archive, data, tmp_path):
    native, _ = data
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False) as c:
        r = c.get(url(proxy.dicomweb_url, native, "1,3"), headers=ANY)
        assert r.headers["x-cache"] == "MISS" and payloads(r) == [native_frame(native, 1), native_frame(native, 3)]
        before = upstream_frame_requests(proxy)
        r = c.get(url(proxy.dicomweb_url, native, "3,2,1"), headers=ANY)  # 2 is new: one upstream request
        assert r.headers["x-cache"] == "PARTIAL"
        assert payloads(r) == [native_frame(native, n) for n in (3, 2, 1)]
        parts = split_multipart(r.content, r.headers["content-type"])[1]
        assert [dict(h)["Content-Location"].rsplit("/", 1)[1] for h, _ in parts] == ["3", "2", "1"]
        assert upstream_frame_requests(proxy) == before + 1
        r = c.get(url(proxy.dicomweb_url, native, "2"), headers=ANY)
        assert r.headers["x-cache"] == "HIT" and upstream_frame_requests(proxy) == before + 1
        etag = r.headers["etag"]
        assert c.get(url(proxy.dicomweb_url, native, "2"), headers={**ANY, "If-None-Match": etag}).status_code == 304


def test_keys_name_the_transfer_syntax(archive, data, tmp_path):
    """`*` is answered from the cached encoding, labelled truthfully; an explicit syntax only
    from an exact match (here the archive decodes JPEG to Explicit VR Little Endian)."""
    _, jpeg = data
    stored = list(generate_frames(jpeg.PixelData, number_of_frames=jpeg.NumberOfFrames))
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        first = c.get(url(proxy.dicomweb_url, jpeg, "2"), headers=ANY)
        again = c.get(url(proxy.dicomweb_url, jpeg, "2"), headers=ANY)
        assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
        parts = split_multipart(again.content, again.headers["content-type"])[1]
        assert dict(parts[0][0])["Content-Type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
        assert parts[0][1] == stored[1]
        decoded = c.get(url(proxy.dicomweb_url, jpeg, "2"))  # default: Explicit VR Little Endian
        assert decoded.headers["x-cache"] == "MISS"
        body = payloads(decoded)[0]
        assert len(body) == jpeg.Rows * jpeg.Columns * 3 and body != stored[1]
        direct = c.get(url(archive.dicomweb_url, jpeg, "2"), headers={
            "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'})
        assert body == payloads(direct)[0]  # the archive's decoding of frame 2, not just its size


@pytest.mark.parametrize("order", ["stored first", "decoded first"])
def test_any_transfer_syntax_prefers_the_archives_own_encoding(archive, data, tmp_path, order):
    """`transfer-syntax=*` is answered from the archive's stored encoding when that is cached, from another
    cached encoding (labelled truthfully) only when it is not: a `*` request gets the same bytes and ETag
    whatever was asked since (before, a decoded request cached after it turned the next `*` answer into
    the decoded frame: ten times the bytes, another ETag)."""
    import time

    _, jpeg = data
    stored = list(generate_frames(jpeg.PixelData, number_of_frames=jpeg.NumberOfFrames))
    jpeg_part = "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"

    def part(r):
        (headers, body), = split_multipart(r.content, r.headers["content-type"])[1]
        return dict(headers)["Content-Type"], body

    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        frame = url(proxy.dicomweb_url, jpeg, "3")
        if order == "stored first":
            assert c.get(frame, headers=ANY).headers["x-cache"] == "MISS"
            first = c.get(frame, headers=ANY)
            assert first.headers["x-cache"] == "HIT" and part(first) == (jpeg_part, stored[2])
            assert c.get(frame).headers["x-cache"] == "MISS"  # the decoded frame, cached too
            again = c.get(frame, headers=ANY)
            assert again.headers["x-cache"] == "HIT" and part(again) == (jpeg_part, stored[2])
            assert again.headers["etag"] == first.headers["etag"]
            return
        decoded = c.get(frame)
        fallback = c.get(frame, headers=ANY)  # only the decoded frame is cached: it answers, labelled as what it is
        assert fallback.headers["x-cache"] == "HIT"
        assert part(fallback) == ("application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1", part(decoded)[1])
        instance = frame.rsplit("/frames/", 1)[0]
        r = c.get(instance, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert r.status_code == 200, r.text  # the archive's own encoding passes through: its frames are learned
        deadline = time.monotonic() + 10
        while part(now := c.get(frame, headers=ANY))[0] != jpeg_part and time.monotonic() < deadline:
            time.sleep(0.05)  # (an instance is split into frames off the event loop)
        assert now.headers["x-cache"] == "HIT" and part(now) == (jpeg_part, stored[2])


def test_shared_by_workers_survives_restart_and_archive_outage(archive, data, tmp_path):
    native, _ = data
    cache_dir = str(tmp_path / "shared")
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path / "one", ["--cache-dir", cache_dir]) as proxy:
        r = httpx.get(url(proxy.dicomweb_url, native, "4,5"), headers=ANY, trust_env=False)
        assert r.headers["x-cache"] == "MISS"
    archive.stop()
    try:
        with ProxyProcess({"a": archive.dicomweb_url}, tmp_path / "two",
                          ["--cache-dir", cache_dir, "--workers", "2"]) as proxy:
            for _ in range(8):  # fresh connections: both workers answer, both from the shared disk tier
                r = httpx.get(url(proxy.dicomweb_url, native, "5,4"), trust_env=False,
                              headers={**ANY, "Connection": "close"})
                assert r.status_code == 200 and r.headers["x-cache"] == "HIT"
                assert payloads(r) == [native_frame(native, 5), native_frame(native, 4)]
            miss = httpx.get(url(proxy.dicomweb_url, native, "6"), headers=ANY, trust_env=False)
            assert miss.status_code == 502  # not cached, archive down: an answer, not a hang
    finally:
        archive.start()


def test_a_corrupt_entry_is_never_served(archive, data, tmp_path):
    native, _ = data
    cache_dir = tmp_path / "c"
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path / "one", ["--cache-dir", str(cache_dir)]) as proxy:
        httpx.get(url(proxy.dicomweb_url, native, "1"), headers=ANY, trust_env=False)
    blobs = [p for p in cache_dir.rglob("*.val")]
    assert blobs, "frames of 128 KB are stored as files"
    for p in blobs:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # truncate every entry
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path / "two", ["--cache-dir", str(cache_dir)]) as proxy:
        r = httpx.get(url(proxy.dicomweb_url, native, "1"), headers=ANY, trust_env=False)
        assert r.headers["x-cache"] == "MISS" and payloads(r) == [native_frame(native, 1)]
        r = httpx.get(url(proxy.dicomweb_url, native, "1"), headers=ANY, trust_env=False)
        assert r.headers["x-cache"] == "HIT" and payloads(r) == [native_frame(native, 1)]


async def burst(targets: list[tuple[int, str]], accept: str = ANY["Accept"],
                host: str | None = None) -> list[tuple[int, dict[str, str], bytes]]:
    """GET each (port, path) on 127.0.0.1 with every connection open first and every request written in
    one go: the requests reach the servers in the same instant. (status, headers, body) of each. `host`:
    the Host every request names (servers behind one public name)."""
    import asyncio

    import h11

    conns = [await asyncio.open_connection("127.0.0.1", port) for port, _ in targets]
    for (port, path), (_, writer) in zip(targets, conns, strict=True):
        writer.write(h11.Connection(h11.CLIENT).send(h11.Request(
            method="GET", target=path, headers=[("Host", host or f"127.0.0.1:{port}"), ("Connection", "close"),
                                                ("Accept", accept)])))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, dict, bytes]:
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        parser.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                parser.receive_data(await reader.read(1 << 16))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                writer.close()
                return status, headers, body

    return await asyncio.gather(*(answer(r, w) for r, w in conns))


@contextlib.contextmanager
def siblings_of(server, tmp_path, proxies: int):
    """`proxies` proxies on one cache directory in front of `server`: siblings, as workers are."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(ProxyProcess({"sf": server.dicomweb_url}, tmp_path / str(i),
                                                ["--cache-dir", str(tmp_path / "c")])) for i in range(proxies)]


def waiters_of(fronts) -> float:
    """Requests that waited for a fetch in flight, over all of `fronts`."""
    texts = [httpx.get(f"{p.url}/metrics", trust_env=False).text for p in fronts]
    return sum(s.value for text in texts for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "dicomweb_edge_cache_singleflight_waiters_total")


@pytest.mark.parametrize("proxies", [1, 2])
async def test_concurrent_identical_misses_make_one_upstream_request(data, tmp_path, proxies):
    """Single-flight: 100 clients ask for the same uncached frame in the same instant; the archive sees
    one request (counted at the archive side; the archive answers slowly so that all 100 overlap). With
    2 (two proxies on one cache directory are siblings, as two workers are, and each gets half the
    requests) both miss it before either's announcement reaches the other: the claim (siblings.py)
    still lets only one of them ask."""
    from urllib.parse import urlsplit

    from proxy.demo.archive import ArchiveServer, Faults, SampleArchive

    native, _ = data
    archive = SampleArchive("SF", Faults(first_byte_delay=0.5))
    archive.add(native)
    with ArchiveServer(archive) as server, siblings_of(server, tmp_path, proxies) as fronts:
        rs = await burst([(p.port, urlsplit(url(p.dicomweb_url, native, "2")).path)
                          for _ in range(100 // proxies) for p in fronts])
        waiters = waiters_of(fronts)
    assert all(status == 200 for status, _, _ in rs)
    assert all(payloads(httpx.Response(200, headers=h, content=body)) == [native_frame(native, 2)] for _, h, body in rs)
    assert archive.requests["frames"] == 1
    assert waiters == len(rs) - 1


@pytest.mark.parametrize("proxies", [1, 2])
async def test_concurrent_identical_metadata_misses_make_one_upstream_request(data, tmp_path, proxies):
    """Single-flight for what else the cache keeps: a study's metadata asked by 100 clients in the same
    instant (a study opened on many workstations at once) is asked of the archive once; with two siblings
    too (one cache directory, one public name), the other reading it from the shared disk tier. Every
    client gets the same document."""
    import json
    from urllib.parse import urlsplit

    from proxy.demo.archive import ArchiveServer, Faults, SampleArchive

    native, _ = data
    archive = SampleArchive("SFM", Faults(first_byte_delay=0.5))
    archive.add(native)
    with ArchiveServer(archive) as server, siblings_of(server, tmp_path, proxies) as fronts:
        path = f"/studies/{native.StudyInstanceUID}/metadata"
        rs = await burst([(p.port, urlsplit(p.dicomweb_url + path).path)
                          for _ in range(100 // proxies) for p in fronts], "application/dicom+json",
                         "imaging.test:8042")  # (one public name: the documents' URLs are the same in both)
        waiters = waiters_of(fronts)
    assert [status for status, _, _ in rs] == [200] * 100
    documents = {body for _, _, body in rs}
    assert len(documents) == 1 and json.loads(documents.pop())[0]["00080018"]["Value"] == [native.SOPInstanceUID]
    assert archive.requests["metadata"] == 1
    assert sorted(h.get("x-cache") for _, h, _ in rs).count("MISS") == 1
    assert waiters == 99


@pytest.mark.parametrize("proxies", [1, 2])
async def test_a_leaders_refusal_is_the_answer_of_the_identical_misses_that_followed_it(data, tmp_path, proxies):
    """The archive's 404 for a frame of an instance it does not hold, met by the first of 20 identical
    misses in the same instant, is the answer of the 19 that followed it, in its worker and in a sibling
    worker (two proxies on one cache directory, as two workers are: 10 requests each): the archive is asked
    once, and the followers are counted as answered with another request's failure. (A refusal is not
    cached: the next request after the burst asks again.)"""
    from urllib.parse import urlsplit

    from proxy.demo.archive import ArchiveServer, Faults, SampleArchive

    native, _ = data
    # The archive takes 1.5 s to refuse: every request of the burst arrives while the first is in flight
    # (a request after the leader's answer asks again, rightly: a refusal is not cached).
    archive = SampleArchive("SF404", Faults(first_byte_delay=1.5))
    archive.add(native)
    with ArchiveServer(archive) as server, siblings_of(server, tmp_path, proxies) as fronts:
        missing = url(fronts[0].dicomweb_url, native, "1").replace(native.SOPInstanceUID,
                                                                   native.SOPInstanceUID + ".9")
        for p in fronts:  # each front warmed up on another missing frame (its first request costs the most)
            other = url(p.dicomweb_url, native, "1").replace(native.SOPInstanceUID, native.SOPInstanceUID + ".8")
            assert httpx.get(other, headers=ANY, trust_env=False).status_code == 404
        before = archive.requests["frames"]
        path = urlsplit(missing).path
        rs = await burst([(p.port, path) for _ in range(20 // proxies) for p in fronts])
        texts = [httpx.get(f"{p.url}/metrics", trust_env=False).text for p in fronts]
        shared_404 = sum(s.value for text in texts for f in text_string_to_metric_families(text) for s in f.samples
                         if s.name == "dicomweb_edge_shared_failures_total" and s.labels.get("status") == "404")
        assert [status for status, _, _ in rs] == [404] * 20
        assert archive.requests["frames"] == before + 1
        assert shared_404 == 19
        assert httpx.get(missing, headers=ANY, trust_env=False).status_code == 404
        assert archive.requests["frames"] == before + 2


def test_instances_passing_through_become_frame_entries(archive, data, tmp_path):
    """A study retrieve teaches the cache every frame of its instances (native frames cut by size,
    JPEG frames by fragments): later frame requests need no archive at all."""
    import time

    native, jpeg = data
    stored = list(generate_frames(jpeg.PixelData, number_of_frames=jpeg.NumberOfFrames))
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        for ds in (native, jpeg):
            r = c.get(f"{proxy.dicomweb_url}/studies/{ds.StudyInstanceUID}",
                      headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
            assert payloads(r) == [orthanc_file(archive, ds.SOPInstanceUID)]  # the retrieve itself is whole
        expected = len(native.PixelData) + sum(len(f) for f in stored)
        deadline = time.monotonic() + 20
        while True:  # the split happens off the event loop: wait for it, bounded
            text = c.get(f"{proxy.url}/metrics").text
            written = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                          if s.name == "dicomweb_edge_cache_written_bytes_total")
            if written >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert written >= expected
        before = upstream_frame_requests(proxy)
        r = c.get(url(proxy.dicomweb_url, native, "6,1"))  # no Accept: Explicit VR Little Endian
        assert r.headers["x-cache"] == "HIT" and payloads(r) == [native_frame(native, 6), native_frame(native, 1)]
        r = c.get(url(proxy.dicomweb_url, jpeg, "3"), headers=ANY)
        assert r.headers["x-cache"] == "HIT" and payloads(r) == [stored[2]]
        assert upstream_frame_requests(proxy) == before


def test_a_study_retrieved_again_is_not_written_to_disk_again(archive, data, tmp_path):
    """A SOP Instance's frames never change: a study retrieved again through the proxy (an AI pipeline
    pulling the same study) finds its frames in the disk tier and writes none of them again. Splits run
    in order on one thread, so once a third retrieve's frames are counted, the second's were skipped."""
    import time

    native, jpeg = data
    jpeg_bytes = sum(len(f) for f in generate_frames(jpeg.PixelData, number_of_frames=jpeg.NumberOfFrames))
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        def written_when(at_least: int) -> float:
            deadline = time.monotonic() + 20
            while True:
                text = c.get(f"{proxy.url}/metrics").text
                got = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                          if s.name == "dicomweb_edge_cache_written_bytes_total")
                if got >= at_least or time.monotonic() > deadline:
                    return got
                time.sleep(0.05)

        for ds in (jpeg, jpeg, native):
            assert c.get(f"{proxy.dicomweb_url}/studies/{ds.StudyInstanceUID}", headers=accept).status_code == 200
        # Written in order too: a second copy of the JPEG frames would be counted before the native ones.
        assert written_when(jpeg_bytes + len(native.PixelData)) == jpeg_bytes + len(native.PixelData)


async def study_retrieve_in_flight(c, base, native, archive):
    """Start a study retrieve through the proxy at `base`; return it once it has reached the archive
    (whose first byte is delayed: the retrieve is in flight while the test goes on)."""
    import asyncio

    study = asyncio.ensure_future(c.get(
        f"{base}/studies/{native.StudyInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}))
    async with asyncio.timeout(10):
        while archive.requests["retrieve"] == 0:
            await asyncio.sleep(0.01)
    return study


async def test_a_frame_request_during_a_series_retrieve_waits_for_it(data, tmp_path):
    """Single-flight across granularities: while a study retrieve is in flight, a frame of an instance
    it carries is not asked of the archive (counted at the archive side)."""

    from proxy.demo.archive import ArchiveServer, Faults, SampleArchive

    native, _ = data
    archive = SampleArchive("SLOWBODY", Faults(first_byte_delay=0.3))
    archive.add(native)
    with ArchiveServer(archive) as server, \
            ProxyProcess({"s": server.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
            task = await study_retrieve_in_flight(c, proxy.dicomweb_url, native, archive)
            frame = await c.get(url(proxy.dicomweb_url, native, "4"), headers=ANY)
            assert payloads(await task) == [to_part10(native)]  # the retrieve the frame waited on, whole
    assert frame.status_code == 200 and payloads(frame) == [native_frame(native, 4)]
    assert archive.requests["frames"] == 0


async def test_a_retrieve_in_one_worker_serves_frame_requests_in_the_other(data, tmp_path):
    """Two worker processes: while one streams a study retrieve (or a prefetch), frame requests that
    reach the other wait for it instead of asking the archive (proxy/coordination/siblings.py), and are answered
    from the shared disk tier. Fresh connections, so that both workers take some of them."""
    import asyncio

    from proxy.demo.archive import ArchiveServer, Faults, SampleArchive

    native, _ = data
    archive = SampleArchive("SIBLINGS", Faults(first_byte_delay=0.5))
    archive.add(native)
    args = ["--cache-dir", str(tmp_path / "c"), "--workers", "2"]
    with ArchiveServer(archive) as server, ProxyProcess({"s": server.dicomweb_url}, tmp_path, args) as proxy:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
            study = await study_retrieve_in_flight(c, proxy.dicomweb_url, native, archive)

            async def fresh(n: int) -> httpx.Response:
                async with httpx.AsyncClient(trust_env=False, timeout=30) as one:
                    return await one.get(url(proxy.dicomweb_url, native, str(n)), headers=ANY)

            frames = await asyncio.gather(*(fresh(1 + i % 6) for i in range(12)))
            assert payloads(await study) == [to_part10(native)]
    assert [payloads(r) for r in frames] == [[native_frame(native, 1 + i % 6)] for i in range(12)]
    assert archive.requests["frames"] == 0


async def test_a_frame_a_sibling_is_bringing_is_handed_over_from_its_memory(data, tmp_path):
    """Frames a worker serves from memory wait for a quiet moment before they go to the shared disk tier
    (proxy/cache/writer.py). A sibling that misses one of them while it is being retrieved asks for it
    (proxy/cache/handover.py) and gets it from the first worker's memory, not from the disk and not from the
    archive; the first worker's writes keep waiting. Two proxies on one cache directory (siblings, as
    two workers are), so that each request goes to the one the test means."""

    from proxy.demo.archive import ArchiveServer, Faults, SampleArchive

    native, _ = data
    archive = SampleArchive("WANTED", Faults(first_byte_delay=0.5))
    archive.add(native)
    args = ["--cache-dir", str(tmp_path / "c")]
    with ArchiveServer(archive) as server, \
            ProxyProcess({"s": server.dicomweb_url}, tmp_path / "a", args) as first, \
            ProxyProcess({"s": server.dicomweb_url}, tmp_path / "b", args) as second:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
            study = await study_retrieve_in_flight(c, first.dicomweb_url, native, archive)
            frame = await c.get(url(second.dicomweb_url, native, "4"), headers=ANY)
            assert payloads(await study) == [to_part10(native)]
            texts = [(await c.get(f"{p.url}/metrics")).text for p in (first, second)]
            again = await c.get(url(second.dicomweb_url, native, "4"), headers=ANY)
    assert again.headers["x-cache"] == "HIT" and payloads(again) == [native_frame(native, 4)]

    def total(text: str, name: str, **labels: str) -> float:
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert frame.status_code == 200 and payloads(frame) == [native_frame(native, 4)]
    assert archive.requests["frames"] == 0
    assert total(texts[1], "dicomweb_edge_cache_handovers_total", outcome="given") == 1
    assert total(texts[0], "dicomweb_edge_cache_deferred_writes_total", why="wanted") == 0


def test_series_metadata_prefetches_the_series(archive, data, tmp_path):
    """A viewer asks for series metadata, then for frames: the proxy fetched the series meanwhile,
    in one upstream request, so the frame requests are hits."""
    import time

    native, _ = data
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        r = c.get(f"{proxy.dicomweb_url}/studies/{native.StudyInstanceUID}/series/{native.SeriesInstanceUID}"
                  "/metadata")
        assert r.status_code == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # bounded wait for the background prefetch to finish
            text = c.get(f"{proxy.url}/metrics").text
            done = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "dicomweb_edge_prefetches_total" and s.labels.get("outcome") == "done"]
            if done and done[0] >= 1:
                break
            time.sleep(0.05)
        before = upstream_frame_requests(proxy)
        r = c.get(url(proxy.dicomweb_url, native, "1,2,3,4,5,6"), headers=ANY)
        assert r.headers["x-cache"] == "HIT"
        assert payloads(r) == [native_frame(native, n) for n in range(1, 7)]
        assert upstream_frame_requests(proxy) == before == 0


def test_a_series_is_prefetched_once_whichever_worker_is_asked(archive, data, tmp_path):
    """Two workers, series metadata asked again and again on fresh connections (both workers take
    some): one worker claims the prefetch, the archive sees one series retrieve."""
    import time

    native, _ = data
    meta = f"/studies/{native.StudyInstanceUID}/series/{native.SeriesInstanceUID}/metadata"
    args = ["--cache-dir", str(tmp_path / "c"), "--workers", "2"]
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, args) as proxy:
        for _ in range(10):
            with httpx.Client(trust_env=False, timeout=30) as fresh:
                assert fresh.get(proxy.dicomweb_url + meta).status_code == 200

        def outcomes() -> dict[str, float]:
            text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
            return {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "dicomweb_edge_prefetches_total"}

        deadline = time.monotonic() + 20
        while not outcomes().get("done") and time.monotonic() < deadline:  # the claimed prefetch ends
            time.sleep(0.05)
        done = outcomes()
        text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
        series_retrieves = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                               if s.name == "dicomweb_edge_upstream_requests_total"
                               and s.labels.get("service") == "prefetch")
    assert done.get("done") == 1 and series_retrieves == 1, (done, series_retrieves)


def test_purge_a_study_through_the_admin_endpoint_and_the_command(archive, data, tmp_path):
    import json
    import subprocess
    import sys

    native, jpeg = data
    cache_dir = tmp_path / "c"
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(cache_dir)]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        for ds in (native, jpeg):
            c.get(url(proxy.dicomweb_url, ds, "1"), headers=ANY)
            assert c.get(url(proxy.dicomweb_url, ds, "1"), headers=ANY).headers["x-cache"] == "HIT"
        import time

        deadline = time.monotonic() + 20
        while (stats := c.get(f"{proxy.url}/admin/cache").json())["disk_entries"] < 4:  # writes are off-loop
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        assert stats["writable"] is True
        r = c.post(f"{proxy.url}/admin/cache/purge", params={"study": native.StudyInstanceUID})
        assert r.status_code == 200 and r.json()["removed"] >= 2
        assert c.get(url(proxy.dicomweb_url, native, "1"), headers=ANY).headers["x-cache"] == "MISS"
        assert c.get(url(proxy.dicomweb_url, jpeg, "1"), headers=ANY).headers["x-cache"] == "HIT"
        assert c.post(f"{proxy.url}/admin/cache/purge", params={"study": "1.2.x"}).status_code == 400
    cli = [sys.executable, "-m", "proxy.cli", "cache"]
    out = subprocess.run([*cli, "stats", "--cache-dir", str(cache_dir)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["disk_entries"] >= 2  # (what the proxy held back was written as it stopped)
    assert "memory_bytes" not in json.loads(out.stdout)  # a worker's own figures: the admin endpoint has them
    subprocess.run([*cli, "purge", "--cache-dir", str(cache_dir)], capture_output=True, text=True, check=True)
    out = subprocess.run([*cli, "stats", "--cache-dir", str(cache_dir)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["disk_entries"] == 0


def test_metadata_is_cached_briefly_and_a_store_invalidates_it(archive, data, tmp_path):
    """Metadata changes as instances arrive; it is reused for a short TTL, bypassed by
    `Cache-Control: no-cache`, and dropped by a store through the proxy."""
    from proxy.demo.synth import Study, ct_series

    native, _ = data
    study_url = lambda p: f"{p.dicomweb_url}/studies/{native.StudyInstanceUID}/metadata"  # noqa: E731
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        first = c.get(study_url(proxy))
        second = c.get(study_url(proxy))
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        assert second.content == first.content and len(second.json()) == 1
        assert c.get(study_url(proxy), headers={"Cache-Control": "no-cache"}).headers.get("x-cache") == "MISS"
        same = Study(Patient(str(native.PatientName), native.PatientID), study_uid=native.StudyInstanceUID)
        extra = next(ct_series(same, 1, rows=16, cols=16))
        assert stow(c, proxy, extra).status_code == 200
        after = c.get(study_url(proxy))
        assert after.headers.get("x-cache") == "MISS", (after.status_code, after.headers, after.text[:300])
        assert {m["00080018"]["Value"][0] for m in after.json()} == {native.SOPInstanceUID, extra.SOPInstanceUID}


def test_a_full_disk_turns_cache_writes_off_not_the_proxy(archive, data, tmp_path):
    """A cache directory that fills up (a real ENOSPC, on a tiny tmpfs) makes the cache read-only; every
    request is still answered with the right bytes. A purge frees the cache's space even when the disk is
    full to the last byte, and the next miss is written again (no restart)."""
    import os
    import subprocess
    import time

    if os.geteuid() != 0:
        missing("mounting a small tmpfs needs root")
    native, _ = data
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(small)], check=True)
    try:
        with ProxyProcess({"a": archive.dicomweb_url}, tmp_path / "p", ["--cache-dir", str(small / "c")]) as proxy, \
                httpx.Client(trust_env=False, timeout=30) as c:
            for n in range(1, 7):  # 6 frames of 128 KB: more than the disk holds
                r = c.get(url(proxy.dicomweb_url, native, str(n)), headers=ANY)
                assert r.status_code == 200 and payloads(r) == [native_frame(native, n)]
            deadline = time.monotonic() + 20
            while c.get(f"{proxy.url}/admin/cache").json()["writable"]:  # the writes happen off-loop
                assert time.monotonic() < deadline, "the disk never filled up"
                time.sleep(0.05)
            for n in range(6, 0, -1):
                r = c.get(url(proxy.dicomweb_url, native, str(n)), headers=ANY)
                assert r.status_code == 200 and payloads(r) == [native_frame(native, n)]
            assert c.get(f"{proxy.url}/healthz").status_code == 200
            with open(small / "filler", "wb", buffering=0) as filler:  # something else takes the last bytes
                try:
                    while True:
                        filler.write(b"\0" * 4096)
                except OSError:
                    pass
            assert c.post(f"{proxy.url}/admin/cache/purge").status_code == 200  # (SQLite itself has no room)
            r = c.get(url(proxy.dicomweb_url, native, "1"), headers=ANY)  # a miss again: written this time
            assert r.status_code == 200 and r.headers["x-cache"] == "MISS" and payloads(r) == [native_frame(native, 1)]
            deadline = time.monotonic() + 20
            while not (stats := c.get(f"{proxy.url}/admin/cache").json())["writable"] or stats["disk_entries"] < 2:
                assert time.monotonic() < deadline, f"the cache never wrote again: {stats}"
                time.sleep(0.05)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_search_results_are_reused_briefly_and_a_store_clears_them(archive, data, tmp_path):
    """With the cache on, a single archive's search answers are reused for a short time, bypassed by
    `Cache-Control: no-cache` and dropped by a store through the proxy."""
    from proxy.demo.synth import Patient, Study, ct_series

    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False, timeout=30) as c:
        search = f"{proxy.dicomweb_url}/studies?PatientName=CACHE*"
        first, second = c.get(search), c.get(search)
        assert "x-cache" not in first.headers and second.headers["x-cache"] == "HIT"
        assert second.content == first.content
        assert "x-cache" not in c.get(search, headers={"Cache-Control": "no-cache"}).headers
        new = next(ct_series(Study(Patient("CACHE^NEW", "PIDC9")), 1, rows=16, cols=16))
        assert stow(c, proxy, new).status_code == 200
        after = c.get(search)
        assert "x-cache" not in after.headers
        assert new.StudyInstanceUID in {s["0020000D"]["Value"][0] for s in after.json()}


def test_the_cache_phase_answers_a_hit_as_the_routed_path_does(archive, data, tmp_path):
    """hitlane.py answers full memory hits before routing; a query string sends the same request through
    the router. Both answers must be the same to a client: status, headers, parts, ETag and 304."""
    native, _ = data
    single = {"Accept": "application/octet-stream; transfer-syntax=*"}
    routed = {"accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as proxy, \
            httpx.Client(trust_env=False) as c:
        c.get(url(proxy.dicomweb_url, native, "1,2"), headers=ANY)  # miss: fills the cache
        for frames, headers, params in (("2,1,2", ANY, routed), ("1", single, {"accept": single["Accept"]})):
            lane = c.get(url(proxy.dicomweb_url, native, frames), headers=headers)
            router = c.get(url(proxy.dicomweb_url, native, frames), params=params)
            assert lane.status_code == router.status_code == 200
            assert lane.headers["x-cache"] == router.headers["x-cache"] == "HIT"
            same = ("etag", "vary", "cache-control", "content-length")
            assert {k: lane.headers[k] for k in same} == {k: router.headers[k] for k in same}
            assert lane.headers["content-type"].split("boundary=")[0] == router.headers["content-type"].split(
                "boundary=")[0]
            if "," in frames:
                assert payloads(lane) == payloads(router) == [native_frame(native, n) for n in (2, 1, 2)]
                locations = [[dict(h)["Content-Location"] for h, _ in split_multipart(r.content,
                              r.headers["content-type"])[1]] for r in (lane, router)]
                assert locations[0] == locations[1]
            else:
                assert lane.content == router.content == native_frame(native, 1)
            etag = {"If-None-Match": lane.headers["etag"]}
            assert c.get(url(proxy.dicomweb_url, native, frames), headers={**headers, **etag}).status_code == 304
            assert c.get(url(proxy.dicomweb_url, native, frames), params=params, headers=etag).status_code == 304
        assert c.get(url(proxy.dicomweb_url, native, "0"), headers=ANY).status_code == 400  # still validated
