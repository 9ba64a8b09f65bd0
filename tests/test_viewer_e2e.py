"""OHIF, end to end: the pinned prebuilt viewer (scripts/fetch-ohif.sh) served by the proxy, in Debian's
headless Chromium driven by Playwright, reading the two federated Orthanc archives through the proxy.

What a user would notice is asserted: every study of both archives listed once; the CT, the multi-frame
and the JPEG-compressed studies drawn (viewport pixels that are not blank); no browser console error;
every frame the viewer asked for answered 200 with a part naming the instance's transfer syntax; a second
viewing served from the frame cache (archives asked for no frame). Screenshots go to
$DICOMWEB_EDGE_SCREENSHOTS (default .screenshots/); scripts/screenshots.sh regenerates the README's.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from federation_support import held
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from support import REPO_ROOT, ProxyProcess, free_port, missing, split_multipart

from proxy.demo.synth import SLIDE_KEYWORDS, Patient, Study, multiframe_jpeg
from proxy.http.viewer import ViewerError, fetched_viewer_dir

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MF_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"
LOAD_TIMEOUT = 60.0
SCREENSHOTS = Path(os.environ.get("DICOMWEB_EDGE_SCREENSHOTS", REPO_ROOT / ".screenshots"))


@pytest.fixture(scope="module")
def viewer_dir() -> Path:
    try:
        return fetched_viewer_dir()
    except ViewerError as exc:
        missing(f"{exc} (./scripts/test.sh fetches it)")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        missing("Debian's chromium is not installed (./scripts/test.sh installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright Python package is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def compressed(orthanc_b):
    """A JPEG Baseline multi-frame true-colour study, stored in B: it opens in OHIF's ordinary (stack)
    viewport, where the demo's JPEG slide opens in its whole-slide viewport."""
    study = Study(Patient("JPEG^PHANTOM", "PID900"), study_date="20210707", accession="ACC900",
                  description="JPEG MULTIFRAME")
    ds = multiframe_jpeg(study, n_frames=4, tile=256, seed=9)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MF_TRUE_COLOR_SC
    ds.Modality = "OT"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = "JPEG baseline"
    for keyword in ("TotalPixelMatrixColumns", "TotalPixelMatrixRows", "DimensionOrganizationType", *SLIDE_KEYWORDS):
        delattr(ds, keyword)
    orthanc_b.store([ds])
    return ds


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, orthanc_a, orthanc_b, viewer_dir, compressed) -> Iterator[ProxyProcess]:
    with ProxyProcess({"a": orthanc_a.dicomweb_url, "b": orthanc_b.dicomweb_url},
                      tmp_path_factory.mktemp("viewer_proxy"),
                      ["--viewer", str(viewer_dir), "--cache-dir", "cache"]) as p:
        yield p


@pytest.fixture(scope="module")
def transfer_syntaxes(demo_data, compressed) -> dict[str, str]:
    """SOP Instance UID → the transfer syntax it was stored with (what frames must come back in)."""
    return {str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID)
            for ds in [*demo_data.archive_a, *demo_data.archive_b, compressed]}


class Viewing:
    """One browser tab (fresh context: empty HTTP cache and storage) with what it saw recorded."""

    def __init__(self, browser, base: str) -> None:
        self.base = base
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        # The onboarding tour would cover the viewport; a returning user has seen it.
        self.context.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.responses: list = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        # A request the page itself cancels (net::ERR_ABORTED) is not a failure; any other one is.
        self.page.on("requestfailed", lambda r: None if r.failure == "net::ERR_ABORTED"
                     else self.errors.append(f"request failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: self.responses.append(r))

    def dicomweb(self, part: str) -> list:
        return [r for r in self.responses if "/dicomweb/" in r.url and part in r.url]

    def open_study(self, study_uid: str) -> None:
        self.page.goto(f"{self.base}/viewer?StudyInstanceUIDs={study_uid}")
        wait_for_pixels(self.page)
        self.page.wait_for_load_state("networkidle", timeout=LOAD_TIMEOUT * 1000)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def viewing(browser, proxy) -> Iterator[Viewing]:
    v = Viewing(browser, proxy.url)
    yield v
    v.close()


@pytest.fixture(scope="module")
def ct_viewing(browser, proxy, demo_data) -> Iterator[Viewing]:
    """The CT study opened once (the first viewing: frames come from the archives or the prefetch)."""
    v = Viewing(browser, proxy.url)
    v.open_study(demo_data.uids["ct_study"])
    yield v
    v.close()


def drawn_fraction(png: bytes) -> float:
    """Share of pixels in the middle half of a viewport screenshot that are not black (overlay text
    sits in the corners)."""
    img = Image.open(io.BytesIO(png)).convert("L")
    w, h = img.size
    middle = img.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    hist = middle.histogram()
    return 1 - sum(hist[:16]) / max(1, sum(hist))


def wait_for_pixels(page, timeout: float = LOAD_TIMEOUT) -> float:
    """Poll the first viewport's canvas until it shows an image; fail when it stays blank."""
    canvas = page.locator("canvas.cornerstone-canvas").first
    deadline = time.monotonic() + timeout
    fraction = 0.0
    while time.monotonic() < deadline:
        if canvas.count() and canvas.is_visible():
            fraction = drawn_fraction(canvas.screenshot())
            if fraction > 0.05:
                return fraction
        time.sleep(0.25)
    raise AssertionError(f"the viewport stayed blank for {timeout}s ({fraction:.1%} of it drawn)")


def check_frames(v: Viewing, study_uid: str, transfer_syntaxes: dict[str, str]) -> int:
    """Every frame request the viewer made for the study was answered 200, each part naming the
    transfer syntax the instance was stored in; returns how many."""
    frames = v.dicomweb(f"/studies/{study_uid}/")
    frames = [r for r in frames if "/frames/" in r.url]
    assert frames, "the viewer asked for no frames"
    for r in frames:
        assert r.status == 200, (r.status, r.url)
        sop = r.url.split("/instances/", 1)[1].split("/", 1)[0]
        ctype = r.headers["content-type"]
        if ctype.startswith("multipart/related"):
            _, parts = split_multipart(r.body(), ctype)
            assert len(parts) == 1
            part_type = dict(parts[0][0])["Content-Type"]
        else:
            part_type = ctype
        assert f"transfer-syntax={transfer_syntaxes[sop]}" in part_type, (part_type, r.url)
    return len(frames)


def shot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path))
    return path


def metrics(proxy: ProxyProcess) -> dict[tuple[str, tuple], float]:
    import httpx

    text = httpx.get(proxy.url + "/metrics", trust_env=False, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def upstream_frame_requests(m: dict) -> float:
    return sum(v for (name, labels), v in m.items()
               if name == "dicomweb_edge_upstream_requests_total" and dict(labels).get("service") == "frames")


def cache_hits(m: dict) -> float:
    return sum(v for (name, labels), v in m.items()
               if name == "dicomweb_edge_cache_lookups_total" and dict(labels).get("result") == "hit")


def test_study_list_shows_every_study_of_both_archives_once(viewing, proxy, orthanc_a, orthanc_b, demo_data,
                                                            compressed):
    expected = set(held(orthanc_a.dicomweb_url)) | set(held(orthanc_b.dicomweb_url))
    assert {demo_data.uids["ct_study"], demo_data.uids["multiframe_study"]} <= expected
    page = viewing.page
    page.goto(proxy.url + "/")
    rows = page.locator("tbody tr:not([data-filter-row])")
    deadline = time.monotonic() + LOAD_TIMEOUT
    while rows.count() < len(expected) and time.monotonic() < deadline:
        time.sleep(0.2)
    page.wait_for_load_state("networkidle")
    table = "\n".join(rows.all_inner_texts())
    assert rows.count() == len(expected), table
    [search] = [r for r in viewing.dicomweb("/studies?") if "StudyInstanceUID" not in r.url]
    assert search.status == 200 and search.headers["content-type"].startswith("application/dicom+json")
    listed = [rec["0020000D"]["Value"][0] for rec in json.loads(search.body())]
    assert sorted(listed) == sorted(expected)  # each study once, from both archives
    # Other test modules store studies of their own into the session archives (some with the default
    # description): uniqueness is checked by UID above, presence of the demo's studies here.
    for description in ("SYNTH CT CHEST", "SYNTH MULTIFRAME", "SHARED STUDY", "Thorax Übersicht", "SYNTH SLIDE",
                        "JPEG MULTIFRAME"):
        assert description in table, description
    assert "Müller, Jörg" in table  # the non-Latin patient, decoded
    shot(page, "study-list.png")
    assert viewing.errors == []


def test_ct_study_is_drawn(ct_viewing, demo_data, transfer_syntaxes):
    viewing = ct_viewing
    study = demo_data.uids["ct_study"]
    assert check_frames(viewing, study, transfer_syntaxes) >= 1
    thumbnails = viewing.dicomweb("/thumbnail")
    assert thumbnails and all(r.status == 200 and r.headers["content-type"] == "image/jpeg" for r in thumbnails)
    # Scroll to slice 6 (slice 1 has a deliberately odd RescaleSlope and shows white at the CT window).
    n = sum(1 for ds in demo_data.archive_a if ds.StudyInstanceUID == study)
    page = viewing.page
    box = page.locator("canvas.cornerstone-canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(5):
        page.mouse.wheel(0, 100)
    page.get_by_text(f"(6/{n})").wait_for(timeout=LOAD_TIMEOUT * 1000)
    wait_for_pixels(page)
    shot(page, "ct.png")
    assert viewing.errors == []


def test_multiframe_study_is_drawn(viewing, demo_data, transfer_syntaxes):
    study = demo_data.uids["multiframe_study"]
    viewing.open_study(study)
    assert check_frames(viewing, study, transfer_syntaxes) >= 1
    shot(viewing.page, "multiframe.png")
    assert viewing.errors == []


def test_compressed_study_is_drawn(viewing, compressed, transfer_syntaxes):
    study = str(compressed.StudyInstanceUID)
    viewing.open_study(study)
    assert check_frames(viewing, study, transfer_syntaxes) >= 1
    shot(viewing.page, "compressed.png")
    assert viewing.errors == []


def test_compressed_slide_is_drawn(viewing, demo_data, transfer_syntaxes):
    """The demo's JPEG whole-slide image, in OHIF's slide viewport (dicom-microscopy-viewer asks for
    JPEG-LS and JPEG 2000 before `transfer-syntax=*`: the stored JPEG must come back, not a transcode)."""
    study = demo_data.uids["slide_study"]
    viewing.open_study(study)
    assert check_frames(viewing, study, transfer_syntaxes) >= 1
    shot(viewing.page, "slide.png")
    assert viewing.errors == []


def test_second_viewing_is_served_from_the_cache(browser, proxy, demo_data, transfer_syntaxes, ct_viewing):
    study = demo_data.uids["ct_study"]
    before = metrics(proxy)
    second = Viewing(browser, proxy.url)
    try:
        second.open_study(study)
        served = check_frames(second, study, transfer_syntaxes)
        assert second.errors == []
    finally:
        second.close()
    after = metrics(proxy)
    assert upstream_frame_requests(after) == upstream_frame_requests(before), "archives were asked for frames"
    assert cache_hits(after) - cache_hits(before) >= served
    # The proxy's own count: every frame request it answered in this module was a 200.
    answered = {dict(labels)["status"]: v for (name, labels), v in after.items()
                if name == "dicomweb_edge_requests_total" and dict(labels).get("service") == "frames"}
    assert answered.get("200", 0) >= served and sum(answered.values()) == answered["200"], answered


def test_viewer_on_another_origin_reads_through_cors(browser, tmp_path, orthanc_a, orthanc_b, viewer_dir,
                                                     demo_data, transfer_syntaxes):
    """The page comes from http://localhost:PORT, its data source is http://127.0.0.1:PORT (public_url):
    a different origin, so every DICOMweb request is a CORS request the proxy must grant."""
    port = free_port()
    page_origin = f"http://localhost:{port}"
    with ProxyProcess({"a": orthanc_a.dicomweb_url, "b": orthanc_b.dicomweb_url}, tmp_path, port=port,
                      extra_args=["--viewer", str(viewer_dir), "--public-url", f"http://127.0.0.1:{port}"],
                      env={"DICOMWEB_EDGE_CORS_ORIGINS": page_origin}) as p:
        v = Viewing(browser, page_origin)
        try:
            study = demo_data.uids["multiframe_study"]
            v.open_study(study)
            calls = [r for r in v.responses if "/dicomweb/" in r.url]
            assert calls and all(r.url.startswith(p.url + "/dicomweb/") for r in calls)  # cross-origin, all
            assert all(r.headers.get("access-control-allow-origin") == page_origin for r in calls)
            assert check_frames(v, study, transfer_syntaxes) >= 1
            assert v.errors == []
        finally:
            v.close()


def test_bulkdata_single_part_as_ohif_asks(proxy, demo_data):
    """OHIF 3.13 fetches bulk data with `multipart: false` (Accept: <type>, application/octet-stream) and
    points media elements at the BulkDataURI with `?accept=<type>` appended: both must be single-part."""
    import httpx

    mf = demo_data.archive_b[0]
    assert int(mf.NumberOfFrames) > 1
    base = f"{proxy.dicomweb_url}/studies/{mf.StudyInstanceUID}/series/{mf.SeriesInstanceUID}"
    with httpx.Client(trust_env=False, timeout=30) as c:
        meta = c.get(f"{base}/metadata").json()
        [uri] = [m["7FE00010"]["BulkDataURI"] for m in meta if m["00080018"]["Value"][0] == mf.SOPInstanceUID]
        assert uri.startswith(proxy.dicomweb_url + "/")
        for r in (c.get(uri, headers={"Accept": "video/mp4, application/octet-stream"}),
                  c.get(uri + "?accept=application/octet-stream", headers={"Accept": "*/*"})):
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
            assert r.content == mf.PixelData


def test_demo_viewer_opens_the_federated_sample_archives(browser, viewer_dir, tmp_path):
    """`dicomweb-edge demo --viewer` prints the viewer's URL; there, both archives' studies are listed."""
    import re
    import signal
    import subprocess
    import sys

    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "demo", "--port", str(port), "--ct-slices", "5",
                             "--viewer"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        while not any("Press Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = re.search(r"viewer \(OHIF\): (http://\S+)", "".join(lines)).group(1)
        deadline = time.monotonic() + 30
        while True:  # the banner comes just before uvicorn binds
            try:
                if httpx.get(url + "healthz", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the demo's proxy did not come up"
            time.sleep(0.1)
        v = Viewing(browser, url.rstrip("/"))
        try:
            v.page.goto(url)
            rows = v.page.locator("tbody tr:not([data-filter-row])")
            for text in ("DOE, JOHN", "ROE, RICHARD", "SMITH, JANE", "Müller, Jörg", "POE, EDGAR"):
                rows.filter(has_text=text).first.wait_for(timeout=LOAD_TIMEOUT * 1000)
            assert rows.count() == 5  # A: CT, slide, split; B: multi-frame, non-Latin, split (once)
            assert v.errors == []
        finally:
            v.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    bad = subprocess.run([sys.executable, "-m", "proxy.cli", "demo", "--port", str(free_port()), "--viewer",
                          str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no index.html" in bad.stderr


def test_the_checks_fail_on_a_blank_viewport_and_on_console_errors(viewing, demo_data):
    """The harness itself: a viewer with nothing to draw stays blank and is reported as such; an error
    written to the browser console is collected."""
    viewing.page.goto(f"{viewing.base}/viewer?StudyInstanceUIDs={demo_data.uids['ct_study']}.999")
    with pytest.raises(AssertionError, match="stayed blank"):
        wait_for_pixels(viewing.page, timeout=8)
    viewing.page.evaluate("console.error('from the test')")
    deadline = time.monotonic() + 10
    while "from the test" not in viewing.errors and time.monotonic() < deadline:
        viewing.page.wait_for_timeout(50)  # lets Playwright deliver the page's events
    assert "from the test" in viewing.errors
