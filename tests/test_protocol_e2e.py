"""The server protocol's cache phase (proxy/http/protocol.py): hits answered before any ASGI request exists must
behave on the wire like every other answer: in order on a pipelined connection, honouring
`Connection: close`, following forwarding headers, logged and counted, and never stale after a purge."""

import json
import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ProxyProcess, orthanc_holding, split_multipart

from proxy.demo.synth import Patient, Study, multiframe_native

ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
FRAME = 64 * 64 * 2


@pytest.fixture(scope="module")
def native():
    return multiframe_native(Study(Patient("PROTO^LANE", "PIDP1")), n_frames=4, rows=64, cols=64)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, native):
    yield from orthanc_holding(tmp_path_factory, "PROTO", [native])


@pytest.fixture()
def proxy(archive, tmp_path):
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")]) as p:
        yield p


def path(ds, frames):
    return (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
            f"/frames/{frames}")


def frame(ds, n):
    return ds.PixelData[(n - 1) * FRAME : n * FRAME]


def warm(proxy, ds, frames):
    """Fill the cache (a miss), then make sure the next request is a memory hit."""
    for expected in ("MISS", "HIT"):
        r = httpx.get(proxy.url + path(ds, frames), headers={"Accept": ANY}, trust_env=False)
        assert r.status_code == 200 and r.headers["x-cache"] == expected


def read_response(f):
    """One HTTP/1.1 response (Content-Length or chunked) from a socket file: (status, headers, body)."""
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") != "chunked":
        return status, headers, f.read(int(headers.get("content-length", 0)))
    body = b""
    while size := int(f.readline().split(b";")[0], 16):
        body += f.read(size)
        f.readline()
    f.readline()  # the empty trailer
    return status, headers, body


def request(host, target, extra=""):
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: {ANY}\r\n{extra}\r\n".encode()


def parts(headers, body):
    return [b for _, b in split_multipart(body, headers["content-type"])[1]]


def test_pipelined_requests_are_answered_in_order(proxy, native):
    """A hit pipelined behind a miss waits for the miss's answer: responses keep the order of requests."""
    warm(proxy, native, "1")
    warm(proxy, native, "2")
    host = proxy.url.split("//")[1]
    with socket.create_connection(("127.0.0.1", int(host.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(request(host, path(native, "1")) + request(host, path(native, "3")) + request(host, path(native, "2"))
                  + request(host, path(native, "1") + "?x=routed"))
        f = s.makefile("rb")
        answers = [read_response(f) for _ in range(4)]
    assert [a[0] for a in answers] == [200] * 4
    assert [a[1]["x-cache"] for a in answers] == ["HIT", "MISS", "HIT", "HIT"]
    assert [parts(h, b) for _, h, b in answers] == [[frame(native, n)] for n in (1, 3, 2, 1)]


def test_connection_close_is_honoured(proxy, native):
    warm(proxy, native, "1")
    host = proxy.url.split("//")[1]
    with socket.create_connection(("127.0.0.1", int(host.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(request(host, path(native, "1"), "Connection: close\r\n"))
        f = s.makefile("rb")
        status, headers, body = read_response(f)
        assert status == 200 and headers["x-cache"] == "HIT" and headers["connection"] == "close"
        assert parts(headers, body) == [frame(native, 1)]
        assert f.read() == b""  # the server closed the connection


def test_forwarded_base_url_is_followed(proxy, native):
    """A trusted hop's X-Forwarded-Host/Proto name the base URL of the parts' Content-Location, in
    the cache phase and on the routed path alike, also when the hop relays a client from elsewhere
    (X-Forwarded-For): the proxy judges forwarding headers by `trusted_proxies`, not uvicorn."""
    warm(proxy, native, "1")
    forwarded = {"Accept": ANY, "X-Forwarded-Host": "pacs.example.org", "X-Forwarded-Proto": "https",
                 "X-Forwarded-For": "203.0.113.7"}
    for query in ("", "?routed=1"):
        r = httpx.get(proxy.url + path(native, "1") + query, trust_env=False, headers=forwarded)
        assert r.headers["x-cache"] == "HIT"
        (headers, body), = split_multipart(r.content, r.headers["content-type"])[1]
        assert dict(headers)["Content-Location"] == "https://pacs.example.org" + path(native, "1")
    r = httpx.get(proxy.url + path(native, "1"), headers={"Accept": ANY}, trust_env=False)
    (headers, body), = split_multipart(r.content, r.headers["content-type"])[1]
    assert dict(headers)["Content-Location"] == proxy.url + path(native, "1")


@pytest.mark.parametrize("networks, trusted", [(["127.0.0.0/8", "fd00::/8"], True), (["10.0.0.0/8"], False)])
def test_trusted_proxies_are_networks(archive, native, tmp_path, networks, trusted):
    """`trusted_proxies` names networks: with 127.0.0.0/8 (no address of it listed as such) the scraper on
    127.0.0.1 reads /metrics without a key and the hop's X-Forwarded-* name the base URL, on the cache's hit
    lane and on the routed path; with only 10.0.0.0/8 trusted, neither."""
    from proxy.auth.inbound import key_digest

    secret = "key-proto-reader-0123456789"
    (tmp_path / "edge.toml").write_text(
        f"[server]\ntrusted_proxies = {json.dumps(networks)}\n[cache]\ndir = \"c\"\n"
        f'[auth]\nmode = "api_key"\napi_keys = [{{ name = "r", sha256 = "{key_digest(secret)}", '
        f'scopes = ["read"] }}]\n[[archives]]\nname = "a"\nurl = "{archive.dicomweb_url}"\n')
    key = {"Authorization": f"Bearer {secret}"}
    with ProxyProcess({}, tmp_path, ["--config", str(tmp_path / "edge.toml")]) as proxy:
        assert httpx.get(proxy.url + "/metrics", trust_env=False).status_code == (200 if trusted else 401)
        forwarded = {"Accept": ANY, "X-Forwarded-Host": "pacs.example.org", "X-Forwarded-Proto": "https", **key}
        seen = set()
        for query in ("", "", "?routed=1"):  # a miss, a hit on the lane, a routed hit
            r = httpx.get(proxy.url + path(native, "1") + query, trust_env=False, headers=forwarded)
            assert r.status_code == 200
            (headers, body), = split_multipart(r.content, r.headers["content-type"])[1]
            assert body == frame(native, 1)
            seen.add(dict(headers)["Content-Location"])
        assert seen == {("https://pacs.example.org" if trusted else proxy.url) + path(native, "1")}


@pytest.mark.parametrize("allowed", ["https://viewer.example.org", "*"])
def test_hits_carry_the_cors_headers_of_the_routed_path(archive, native, tmp_path, allowed):
    """A viewer on another origin sends Origin with every frame request: the cache phase answers those hits
    too, with the headers the CORS layer gives a routed answer, and every answer varies on Origin."""
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path, ["--cache-dir", str(tmp_path / "c")],
                      env={"DICOMWEB_EDGE_CORS_ORIGINS": allowed}) as proxy:
        warm(proxy, native, "1")
        for origin in (None, "https://viewer.example.org", "https://elsewhere.example.net"):
            seen = []
            for query in ("", "?routed=1"):
                headers = {"Accept": ANY} | ({"Origin": origin} if origin else {})
                r = httpx.get(proxy.url + path(native, "1") + query, trust_env=False, headers=headers)
                assert r.status_code == 200 and r.headers["x-cache"] == "HIT"
                assert parts(r.headers, r.content) == [frame(native, 1)]
                seen.append({k: v for k, v in r.headers.items() if k == "vary" or k.startswith("access-control-")})
            lane, routed = seen
            assert lane == routed, origin
            assert lane["vary"] == "Accept, Origin"
            allow = lane.get("access-control-allow-origin")
            if origin is None:
                assert allow is None
            elif allowed == "*":
                assert allow == "*"
            else:
                assert allow == (origin if origin == allowed else None)
            if origin:
                assert "X-Cache" in lane["access-control-expose-headers"]
            etag = r.headers["etag"]
            r = httpx.get(proxy.url + path(native, "1"), trust_env=False,
                          headers={"Accept": ANY, "If-None-Match": etag} | ({"Origin": origin} if origin else {}))
            assert r.status_code == 304
            assert {k: v for k, v in r.headers.items() if k == "vary" or k.startswith("access-control-")} == lane


def test_a_hit_is_logged_and_counted(proxy, native):
    warm(proxy, native, "2")

    def frame_requests():
        text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "dicomweb_edge_requests_total" and s.labels == {"service": "frames", "status": "200"})

    before = frame_requests()
    for i in range(5):
        r = httpx.get(proxy.url + path(native, "2"), trust_env=False,
                      headers={"Accept": ANY, "X-Request-Id": f"lane-{i}"})
        assert r.headers["x-cache"] == "HIT" and r.headers["x-request-id"] == f"lane-{i}"
    deadline = time.monotonic() + 10  # the metrics are added up and flushed at most 50 ms late
    while frame_requests() - before < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert frame_requests() - before == 5
    deadline = time.monotonic() + 5
    while True:
        logged = [json.loads(ln) for ln in proxy.log_path.read_text().splitlines() if '"lane-' in ln]
        if len(logged) == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert sorted(r["request_id"] for r in logged) == [f"lane-{i}" for i in range(5)]
    for rec in logged:
        assert rec["service"] == "frames" and rec["status"] == 200 and rec["cache"] == "hit"
        assert rec["bytes_out"] > FRAME
        assert native.SOPInstanceUID not in json.dumps(rec)  # no UIDs in the access log at INFO


def test_a_prepared_answer_never_outlives_its_entries(proxy, native):
    """Purging the study makes the next request a miss (not the answer prepared before); a 304 and another
    Accept of the same frame are answered from the same entry correctly."""
    warm(proxy, native, "4")
    hit = httpx.get(proxy.url + path(native, "4"), headers={"Accept": ANY}, trust_env=False)
    single = httpx.get(proxy.url + path(native, "4"), trust_env=False,
                       headers={"Accept": "application/octet-stream; transfer-syntax=*"})
    assert single.headers["x-cache"] == "HIT" and single.content == frame(native, 4)
    r = httpx.get(proxy.url + path(native, "4"), headers={"Accept": ANY, "If-None-Match": hit.headers["etag"]},
                  trust_env=False)
    assert r.status_code == 304 and r.headers["etag"] == hit.headers["etag"] and r.content == b""
    purge = httpx.post(f"{proxy.url}/admin/cache/purge", params={"study": native.StudyInstanceUID}, trust_env=False)
    assert purge.status_code == 200 and purge.json()["removed"] > 0
    r = httpx.get(proxy.url + path(native, "4"), headers={"Accept": ANY}, trust_env=False)
    assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
    assert parts(r.headers, r.content) == [frame(native, 4)]


def test_admin_is_not_served_to_a_relayed_client(proxy):
    """Admin endpoints answer a trusted address asking directly, not a client a trusted front relays."""
    assert httpx.get(f"{proxy.url}/admin/cache", trust_env=False).status_code == 200
    r = httpx.get(f"{proxy.url}/admin/cache", headers={"X-Forwarded-For": "203.0.113.7"}, trust_env=False)
    assert r.status_code == 403


def test_disk_hits_are_answered_and_every_lookup_counted_once(archive, native, tmp_path):
    """After a restart the frames are on disk only: the cache phase answers them from the disk tier, and a
    frame it cannot answer goes on to the routed path with what was looked up, so that each request is
    one lookup in the metrics (a disk hit, or a disk miss), never two."""
    args = ["--cache-dir", str(tmp_path / "c")]
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path / "first", args) as first:
        warm(first, native, "1")
    with ProxyProcess({"a": archive.dicomweb_url}, tmp_path / "second", args) as proxy:
        def lookups(result):
            text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
            return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                       if s.name == "dicomweb_edge_cache_lookups_total"
                       and s.labels == {"tier": "disk", "kind": "frame", "result": result})

        r = httpx.get(proxy.url + path(native, "1"), headers={"Accept": ANY}, trust_env=False)
        assert r.headers["x-cache"] == "HIT" and parts(r.headers, r.content) == [frame(native, 1)]
        r = httpx.get(proxy.url + path(native, "3"), headers={"Accept": ANY}, trust_env=False)
        assert r.headers["x-cache"] == "MISS" and parts(r.headers, r.content) == [frame(native, 3)]
        deadline = time.monotonic() + 10
        while (lookups("hit"), lookups("miss")) != (1, 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (lookups("hit"), lookups("miss")) == (1, 1)
        r = httpx.get(proxy.url + path(native, "1"), headers={"Accept": ANY}, trust_env=False)
        assert r.headers["x-cache"] == "HIT"  # now from memory: no disk lookup at all
        r = httpx.get(proxy.url + path(native, "4"), headers={"Accept": ANY}, trust_env=False)
        assert r.headers["x-cache"] == "MISS"
        while lookups("miss") < 2 and time.monotonic() < deadline + 10:  # counted after the memory hit
            time.sleep(0.05)
        assert (lookups("hit"), lookups("miss")) == (1, 2)
