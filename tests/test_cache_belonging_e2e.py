"""A cached answer is the archive's answer for that exact URL (issue 21).

A cache entry belongs to the study and series the archive placed its object in, and to whoever's
credentials fetched it. A URL that names one study and appends another study's series and instance is
never answered from the cache: every archive answers it 404 (a real Orthanc checks the hierarchy), and so
does the proxy, for every cached kind, with one worker and with two. Under token pass-through an entry
is served only to callers the archive it came from confirmed for its study, whatever the URL and
whatever other archives hold.

Orthanc has no per-token study ACL, so the pass-through cases run against the in-process sample archive,
whose access rule answers per bearer token (401 for an unknown token, 403 for a study the token may not
see, searches listing only the token's studies) and which, like Orthanc, answers 404 for a URL whose
series or instance is not in its study.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from authkeys import AUDIENCE, ISSUER, SigningKey, jwks
from support import ProxyProcess, first_payload, native_frame, orthanc_holding

from proxy.demo.archive import ArchiveServer, SampleArchive
from proxy.demo.synth import Patient, Study, multiframe_native

FRAMES = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
INSTANCE = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
BULK = {"Accept": 'multipart/related; type="application/octet-stream"'}
PNG = {"Accept": "image/png"}
JPEG = {"Accept": "image/jpeg"}
JSON = {"Accept": "application/dicom+json"}
# (what the URL ends with, its Accept): every kind the cache keeps, frames twice (one learned from a
# frames request, one from the instance's Part 10 passing through)
KINDS = [("/frames/1", FRAMES), ("", INSTANCE), ("/frames/2", FRAMES), ("/rendered", PNG),
         ("/thumbnail", JPEG), ("/bulk/7fe00010", BULK), ("/metadata", JSON)]


@pytest.fixture(scope="module")
def doe():
    return multiframe_native(Study(Patient("DOE^JANE", "PIDDOE")), n_frames=3, rows=32, cols=32, seed=21)


@pytest.fixture(scope="module")
def bob():
    return multiframe_native(Study(Patient("BOB^PUBLIC", "PIDBOB")), n_frames=2, rows=32, cols=32, seed=22)


def instance_url(base, ds, study=None):
    return (f"{base}/studies/{study or ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")




def leaks(r, ds):
    """Whether a response carries any frame of `ds` (or its patient's name)."""
    return (any(native_frame(ds, n) in r.content for n in range(1, ds.NumberOfFrames + 1))
            or str(ds.PatientName).encode() in r.content)


def cache_everything(client, base, ds, headers=None):
    """Every kind of object of `ds` fetched twice through the proxy: a miss, then a hit. The ETags seen."""
    etags = {}
    for suffix, accept in KINDS:
        url = instance_url(base, ds) + suffix
        if suffix == "/frames/2":
            continue  # learned from the instance retrieve above, not asked for
        first = client.get(url, headers={**accept, **(headers or {})})
        assert first.status_code == 200, (suffix, first.status_code, first.text[:200])
        again = client.get(url, headers={**accept, **(headers or {})})
        assert again.headers.get("x-cache") == "HIT", (suffix, again.headers)
        etags[suffix] = again.headers.get("etag")
    r = client.get(instance_url(base, ds) + "/frames/2", headers={**FRAMES, **(headers or {})})
    assert r.headers["x-cache"] == "HIT"  # split from the instance that passed through
    etags["/frames/2"] = r.headers["etag"]
    return etags


def wait_written(client, proxy, at_least, headers=None):
    deadline = time.monotonic() + 20
    while client.get(f"{proxy.url}/admin/cache", headers=headers or {}).json()["disk_entries"] < at_least:
        assert time.monotonic() < deadline, "the cache's writes did not reach the disk tier"
        time.sleep(0.05)


def assert_no_cross_study_answer(proxy, ds, other_study, etags, headers=None, status=404):
    """Each kind, under a URL naming `other_study`, on fresh connections (so that, with two workers, both
    answer, one from its memory tier, the other from the shared disk tier): the archive's 404, no byte of
    `ds`, and no 304 for the ETag of the real entry. Every kind is tried before the verdict."""
    wrong = []
    for suffix, accept in KINDS:
        url = instance_url(proxy.dicomweb_url, ds, study=other_study) + suffix
        for _ in range(6):
            r = httpx.get(url, headers={**accept, **(headers or {})}, trust_env=False, timeout=30)
            if r.status_code != status or r.headers.get("x-cache") == "HIT" or leaks(r, ds):
                wrong.append((suffix, r.status_code, r.headers.get("x-cache"), leaks(r, ds)))
                break
        if etags.get(suffix):
            r = httpx.get(url, headers={**accept, **(headers or {}), "If-None-Match": etags[suffix]},
                          trust_env=False, timeout=30)
            if r.status_code != status:
                wrong.append((suffix, "If-None-Match", r.status_code))
    assert not wrong, "answered from another study's cache entry:\n" + "\n".join(map(str, wrong))


# -- without any authentication, a real Orthanc ----------------------------------------------------------------

@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, doe, bob):
    yield from orthanc_holding(tmp_path_factory, "BELONGING", [doe, bob])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_url_mixing_two_studies_is_answered_by_the_archive_not_the_cache(orthanc, doe, bob, tmp_path, workers):
    (tmp_path / "edge.toml").write_text(f'[server]\nworkers = {workers}\n[cache]\ndir = "cache"\nprefetch = false\n'
                                        f'[[archives]]\nname = "pacs"\nurl = "{orthanc.dicomweb_url}"\n')
    with ProxyProcess({}, tmp_path, ["--config", str(tmp_path / "edge.toml")]) as proxy, \
            httpx.Client(timeout=30, trust_env=False) as client:
        etags = cache_everything(client, proxy.dicomweb_url, doe)
        wait_written(client, proxy, at_least=8)  # in the shared disk tier: the other worker hits it there
        assert_no_cross_study_answer(proxy, doe, bob.StudyInstanceUID, etags)
        # ... while the right URLs stay hits, on either worker.
        for _ in range(4):
            r = httpx.get(instance_url(proxy.dicomweb_url, doe) + "/frames/1", headers=FRAMES, trust_env=False)
            assert r.headers["x-cache"] == "HIT" and first_payload(r) == native_frame(doe, 1)


def test_an_entry_learned_from_a_series_retrieve_belongs_to_its_own_study(orthanc, doe, bob, tmp_path):
    """Frames split from the Part 10 instances of a series retrieve are placed by the instances' own
    UIDs: the retrieve itself names the study, the frames asked for afterwards under another study miss."""
    (tmp_path / "edge.toml").write_text(f'[cache]\ndir = "cache"\nprefetch = false\n'
                                        f'[[archives]]\nname = "pacs"\nurl = "{orthanc.dicomweb_url}"\n')
    with ProxyProcess({}, tmp_path, ["--config", str(tmp_path / "edge.toml")]) as proxy, \
            httpx.Client(timeout=30, trust_env=False) as client:
        series = f"{proxy.dicomweb_url}/studies/{doe.StudyInstanceUID}/series/{doe.SeriesInstanceUID}"
        assert client.get(series, headers=INSTANCE).status_code == 200
        assert client.get(instance_url(proxy.dicomweb_url, doe) + "/frames/3", headers=FRAMES).headers["x-cache"] \
            == "HIT"
        r = client.get(instance_url(proxy.dicomweb_url, doe, study=bob.StudyInstanceUID) + "/frames/3",
                       headers=FRAMES)
        assert r.status_code == 404 and not leaks(r, doe)


# -- token pass-through: the sample archive's per-token access rule ---------------------------------------------

@pytest.fixture(scope="module")
def signer():
    return SigningKey("RS256", "belonging")


@pytest.fixture(scope="module")
def tokens(signer):
    # a: DOE and BOB; b: BOB only; c: DOE (never asked before the archive fails); d: BOB only
    return {name: signer.token(sub=name, lifetime=3600) for name in "abcd"}


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def acl(doe, bob, tokens):
    archive = SampleArchive("ACL")
    archive.extend([doe, bob])
    archive.access = {tokens["a"]: {doe.StudyInstanceUID, bob.StudyInstanceUID},
                      tokens["b"]: {bob.StudyInstanceUID}, tokens["c"]: {doe.StudyInstanceUID},
                      tokens["d"]: {bob.StudyInstanceUID}}
    with ArchiveServer(archive) as server:
        yield server


def jwt_proxy(tmp_path, signer, archives, workers=1, extra="", auth=""):
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(signer)))
    listed = "".join(f'[[archives]]\nname = "{name}"\nurl = "{url}"\n{more}\n' for name, url, more in archives)
    (tmp_path / "edge.toml").write_text(
        f'[server]\nworkers = {workers}\n[cache]\ndir = "cache"\nprefetch = false\n{extra}'
        f'[auth]\nmode = "jwt"\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\njwks_file = "jwks.json"\n'
        f'admin_scope = "dicomweb.read"\n{auth}{listed}')
    return ProxyProcess({}, tmp_path, ["--config", str(tmp_path / "edge.toml")])


@pytest.mark.parametrize("workers", [1, 2])
def test_pass_through_a_caller_never_reads_another_studys_objects_through_its_own_study(
        acl, doe, bob, tokens, signer, tmp_path, workers):
    with jwt_proxy(tmp_path, signer, [("acl", acl.dicomweb_url, "forward_authorization = true")], workers) as proxy, \
            httpx.Client(timeout=30, trust_env=False) as client:
        etags = cache_everything(client, proxy.dicomweb_url, doe, bearer(tokens["a"]))
        wait_written(client, proxy, at_least=8, headers=bearer(tokens["a"]))
        # b may see BOB only: BOB's study UID in front of DOE's series and instance is no key to DOE's data.
        assert_no_cross_study_answer(proxy, doe, bob.StudyInstanceUID, etags, bearer(tokens["b"]))
        # Under DOE's own URL b is refused by the archive, an ETag of a's answer included: no 304.
        url = instance_url(proxy.dicomweb_url, doe) + "/frames/1"
        r = client.get(url, headers={**FRAMES, **bearer(tokens["b"]), "If-None-Match": etags["/frames/1"]})
        assert r.status_code in (403, 404) and not leaks(r, doe)


@pytest.fixture()
def public():
    return multiframe_native(Study(Patient("PUBLIC^OWN", "PIDPUB")), n_frames=2, rows=32, cols=32, seed=23)


def test_mixed_deployment_an_unauthenticated_caller_gets_nothing_cached_through_pass_through(
        acl, doe, public, tokens, tmp_path):
    """One archive read with the proxy's own credentials, one with pass-through; inbound `mode = "none"`.
    A caller with no credentials names a study of the own-credentials archive in front of DOE's series and
    instance, which a token holder cached through the pass-through archive."""
    with ArchiveServer(SampleArchive("OPEN")) as open_server:
        open_server.archive.add(public)
        (tmp_path / "edge.toml").write_text(
            f'[cache]\ndir = "cache"\nprefetch = false\n[auth]\nmode = "none"\n'
            f'[[archives]]\nname = "acl"\nurl = "{acl.dicomweb_url}"\nforward_authorization = true\n'
            f'[[archives]]\nname = "open"\nurl = "{open_server.dicomweb_url}"\n')
        with ProxyProcess({}, tmp_path, ["--config", str(tmp_path / "edge.toml")]) as proxy, \
                httpx.Client(timeout=30, trust_env=False) as client:
            etags = cache_everything(client, proxy.dicomweb_url, doe, bearer(tokens["a"]))
            assert_no_cross_study_answer(proxy, doe, public.StudyInstanceUID, etags)
            r = client.get(instance_url(proxy.dicomweb_url, doe) + "/frames/1", headers=FRAMES)
            assert r.status_code == 401 and not leaks(r, doe)  # no token: the archive says so


def test_pass_through_when_the_archive_cannot_be_asked_nothing_comes_from_the_cache(acl, doe, tokens, signer,
                                                                                     tmp_path):
    with jwt_proxy(tmp_path, signer, [("acl", acl.dicomweb_url, "forward_authorization = true")],
                   extra="metadata_cache_ttl = 1\n") as proxy, httpx.Client(timeout=30, trust_env=False) as client:
        url = instance_url(proxy.dicomweb_url, doe)
        etags = cache_everything(client, proxy.dicomweb_url, doe, bearer(tokens["a"]))
        acl.archive.faults.status = 503
        try:
            for suffix, accept in KINDS:  # c may see DOE, but the archive cannot confirm it now
                r = client.get(url + suffix, headers={**accept, **bearer(tokens["c"])})
                assert r.status_code == 502 and not leaks(r, doe), (suffix, r.status_code)
                if etags.get(suffix):
                    r = client.get(url + suffix, headers={**accept, **bearer(tokens["c"]),
                                                          "If-None-Match": etags[suffix]})
                    assert r.status_code == 502, suffix
            # a was confirmed moments ago (access_ttl): a keeps its hits, and its stale metadata once the
            # document is past its TTL; c never gets the stale document.
            assert client.get(url + "/frames/1", headers={**FRAMES, **bearer(tokens["a"])}).headers["x-cache"] == "HIT"
            deadline = time.monotonic() + 10
            while (r := client.get(url + "/metadata", headers=bearer(tokens["a"]))).headers.get("x-cache") != "STALE":
                assert r.status_code == 200 and time.monotonic() < deadline, r.headers
                time.sleep(0.1)
            r = client.get(url + "/metadata", headers=bearer(tokens["c"]))
            assert r.status_code == 502 and not leaks(r, doe)
        finally:
            acl.archive.faults.clear()
        r = client.get(url + "/frames/1", headers={**FRAMES, **bearer(tokens["c"])})  # back: c is confirmed
        assert (r.status_code, r.headers["x-cache"]) == (200, "HIT")


def test_a_study_held_by_a_pass_through_archive_and_an_own_credentials_archive(acl, doe, tokens, signer, tmp_path):
    """What was learned through the pass-through archive is served only to callers it confirmed; what was
    learned with the proxy's own credentials is served to every reader, as that archive would serve them."""
    with ArchiveServer(SampleArchive("OWN")) as own:
        own.archive.add(doe)
        archives = [("acl", acl.dicomweb_url, "forward_authorization = true\npriority = 10"),
                    ("own", own.dicomweb_url, "priority = 1")]
        with jwt_proxy(tmp_path, signer, archives) as proxy, httpx.Client(timeout=30, trust_env=False) as client:
            first, second = (instance_url(proxy.dicomweb_url, doe) + f"/frames/{n}" for n in (1, 2))
            r = client.get(first, headers={**FRAMES, **bearer(tokens["a"])})
            assert r.headers["x-cache"] == "MISS" and own.archive.requests["frames"] == 0  # through "acl"
            assert client.get(first, headers={**FRAMES, **bearer(tokens["a"])}).headers["x-cache"] == "HIT"
            # b may not see DOE at "acl": a's entry is not b's, although "own" holds DOE too.
            r = client.get(first, headers={**FRAMES, **bearer(tokens["b"])})
            assert r.status_code in (403, 404) and not leaks(r, doe)
            acl.stop()  # "acl" goes down: d's miss is answered by "own", with the proxy's own credentials
            r = client.get(second, headers={**FRAMES, **bearer(tokens["d"])})
            assert (r.status_code, r.headers["x-cache"]) == (200, "MISS") and own.archive.requests["frames"] == 1
            # That answer is every reader's, as "own" would give it to them: b gets it from the cache.
            r = client.get(second, headers={**FRAMES, **bearer(tokens["b"])})
            assert (r.status_code, r.headers["x-cache"]) == (200, "HIT")
            assert first_payload(r) == native_frame(doe, 2)
            # ... while a's entry from "acl" is not served to b, nor to d, who "acl" cannot confirm now.
            for who in "bd":
                r = client.get(first, headers={**FRAMES, **bearer(tokens[who])})
                assert r.status_code in (403, 404, 502) and not leaks(r, doe), (who, r.status_code)


def test_pass_through_an_archive_that_ignores_the_uid_filter_confirms_nothing(acl, doe, bob, tokens, signer,
                                                                              tmp_path):
    with jwt_proxy(tmp_path, signer, [("acl", acl.dicomweb_url, "forward_authorization = true")]) as proxy, \
            httpx.Client(timeout=30, trust_env=False) as client:
        url = instance_url(proxy.dicomweb_url, doe) + "/frames/1"
        assert client.get(url, headers={**FRAMES, **bearer(tokens["a"])}).status_code == 200
        acl.archive.faults.ignore_uid_filters = True  # b's check search lists b's own studies: BOB only
        try:
            r = client.get(url, headers={**FRAMES, **bearer(tokens["b"])})
        finally:
            acl.archive.faults.clear()
        assert r.status_code in (403, 404) and not leaks(r, doe)
        assert any(kind == "qido" and doe.StudyInstanceUID in query for kind, query in acl.archive.queries)


def test_pass_through_a_confirmation_lasts_access_ttl(acl, doe, bob, tokens, signer, tmp_path):
    """Revocation at the archive reaches the cache within `access_ttl`: served until then (stated in
    SECURITY.md), refused after."""
    with jwt_proxy(tmp_path, signer, [("acl", acl.dicomweb_url, "forward_authorization = true")],
                   auth="access_ttl = 2\n") as proxy, httpx.Client(timeout=30, trust_env=False) as client:
        url = instance_url(proxy.dicomweb_url, bob) + "/frames/1"
        assert client.get(url, headers={**FRAMES, **bearer(tokens["a"])}).headers["x-cache"] == "MISS"
        checks = acl.archive.requests["qido"]
        r = client.get(url, headers={**FRAMES, **bearer(tokens["d"])})
        confirmed = time.monotonic()
        assert (r.status_code, r.headers["x-cache"]) == (200, "HIT") and acl.archive.requests["qido"] == checks + 1
        acl.archive.access[tokens["d"]] = set()  # d loses BOB at the archive
        r = client.get(url, headers={**FRAMES, **bearer(tokens["d"])})
        if time.monotonic() - confirmed < 2:
            assert r.status_code == 200 and acl.archive.requests["qido"] == checks + 1  # remembered
        time.sleep(max(0.0, confirmed + 2.05 - time.monotonic()))  # the TTL itself, not a guess at timing
        r = client.get(url, headers={**FRAMES, **bearer(tokens["d"])})
        assert r.status_code in (403, 404) and not leaks(r, bob) and acl.archive.requests["qido"] == checks + 2
