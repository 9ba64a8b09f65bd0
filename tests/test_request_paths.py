"""How many modules of `proxy/` a request passes through, counted, not guessed (ARCHITECTURE.md).

The proxy runs in a thread of this process (uvicorn with the proxy's own server protocol, as `serve` runs
it) in front of two real Orthanc archives; a profile hook on that thread records every module of
`proxy/` whose code runs between sending a request and reading its answer. Three requests a user makes
all day: a frame the cache does not hold (then fetched from the archive), the same frame again (a hit),
and a federated search. Each is made three times (three frames, three searches) and only the modules all
three passed count: a timer of the event loop that happens to run during one request (the disk writer's
look for a quiet moment) is not the request's. The lists must be the ones ARCHITECTURE.md prints (the
document cannot drift from the code), and their lengths may not grow past where the code stands.
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import pytest
import uvicorn
from support import native_frame

from proxy.config import load
from proxy.demo.orthanc import free_port
from proxy.http.protocol import EdgeHttpProtocol
from proxy.runtime import create_app

ARCHITECTURE = Path(__file__).resolve().parent.parent / "ARCHITECTURE.md"
# Where the code stands; may only go down. The architecture's targets are 12, 6 and 10 (ARCHITECTURE.md).
# The search: 23 since the query (parse, per-archive form, edge match) left search.py for dicomweb/query.py.
CEILINGS = {"frame miss": 33, "frame hit": 13, "federated search": 23}
FRAMES = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}


class Recorder:
    """A profile hook: the `proxy.*` modules whose functions are called while `on`; `accounted` is set when
    the edge layer's `account` (the last thing the server does for a request: metrics, access record)
    returns, after the client may already have read the answer."""

    def __init__(self) -> None:
        self.on = False
        self.modules: set[str] = set()
        self.accounted = threading.Event()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if not self.on:
            return
        name = frame.f_globals.get("__name__", "")
        if event == "call" and name.startswith("proxy."):
            self.modules.add(name)
        elif event == "return" and name == "proxy.http.edge" and frame.f_code.co_name == "account":
            self.accounted.set()


@pytest.fixture(scope="module")
def proxy(orthanc_a, orthanc_b, tmp_path_factory) -> Iterator[tuple[str, Recorder]]:
    settings = load(None, {"archives": [{"name": "a", "url": orthanc_a.dicomweb_url},
                                        {"name": "b", "url": orthanc_b.dicomweb_url}],
                           "cache_dir": str(tmp_path_factory.mktemp("cache")), "prefetch": False,
                           "health_interval": 0.0, "memory_warm_bytes": 0}, environ={})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, loop="uvloop",
                                           http=EdgeHttpProtocol, access_log=False, log_level="warning"))
    recorder = Recorder()

    def serve() -> None:
        sys.setprofile(recorder)
        asyncio.run(server.serve())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the proxy did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/dicomweb", recorder
    server.should_exit = True
    thread.join(10)


def traced(recorder: Recorder, client: httpx.Client, url: str, headers: dict[str, str]) -> tuple[httpx.Response,
                                                                                                   set[str]]:
    recorder.modules = set()
    recorder.accounted.clear()
    recorder.on = True
    try:
        r = client.get(url, headers=headers)
        assert recorder.accounted.wait(10), "the request was never accounted for"
    finally:
        recorder.on = False
    return r, recorder.modules


def documented(path: str, report: str) -> set[str]:
    """The modules ARCHITECTURE.md lists for a request path: the line `- <path> (N): a, b, c`."""
    m = re.search(rf"^- {re.escape(path)} \((\d+)\): (.+)$", ARCHITECTURE.read_text(), re.M)
    assert m, f"ARCHITECTURE.md lists no modules for {path!r}; the traced lists:\n{report}"
    names = {n.strip().strip("`") for n in m.group(2).split(",")}
    assert int(m.group(1)) == len(names)
    return names


def test_a_frame_miss_a_hit_and_a_federated_search_pass_few_modules(proxy, demo_data):
    base, recorder = proxy
    cts = [ds for ds in demo_data.archive_a if ds.Modality == "CT"][:3]
    urls = [f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
            "/frames/1" for ds in cts]
    searches = [f"{base}/studies?PatientName={name}&includefield=all" for name in ("*", "D*", "S*")]
    json = {"Accept": "application/dicom+json"}
    seen: dict[str, set[str]] = {}
    with httpx.Client(trust_env=False, timeout=30) as client:
        for url, ds in zip(urls, cts, strict=True):
            miss, modules = traced(recorder, client, url, FRAMES)
            assert (miss.status_code, miss.headers["x-cache"]) == (200, "MISS")
            seen["frame miss"] = seen.get("frame miss", modules) & modules
            # What the miss does once its answer is out (its flight ends when the stream closes) may still run
            # during the next request on a busy machine: a health check goes first (an operations request,
            # served without the cache, so the hit traced next is still the first).
            assert client.get(base.rsplit("/dicomweb", 1)[0] + "/healthz").status_code == 200
            hit, modules = traced(recorder, client, url, FRAMES)
            assert (hit.status_code, hit.headers["x-cache"]) == (200, "HIT")
            assert native_frame(ds, 1) in miss.content and native_frame(ds, 1) in hit.content
            seen["frame hit"] = seen.get("frame hit", modules) & modules
        for url in searches:
            search, modules = traced(recorder, client, url, json)
            assert search.status_code == 200 and search.json()
            seen["federated search"] = seen.get("federated search", modules) & modules
    report = "\n".join(f"- {k} ({len(v)}): " + ", ".join(f"`{m}`" for m in sorted(v)) for k, v in seen.items())
    for path, modules in seen.items():
        assert documented(path, report) == modules, f"ARCHITECTURE.md is out of date; the traced lists:\n{report}"
    for path, modules in seen.items():
        assert len(modules) <= CEILINGS[path], f"{path} passes {len(modules)} modules (at most {CEILINGS[path]})"
