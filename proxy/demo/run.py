"""`dicomweb-edge demo`: two sample archives with generated studies, and the proxy in front.

Uses real Orthanc (with its DICOMweb plugin) when it is installed, else the built-in sample archive.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TypeAlias

from proxy.config import ArchiveConfig, Settings, validate
from proxy.http.viewer import ViewerError, check_viewer_dir, fetched_viewer_dir
from proxy.runtime import check_settings, create_app

# The synthetic studies need numpy and Pillow: the `demo` extra, which the proxy itself (and its container
# image) goes without. Without them the CLI still starts; `dicomweb-edge demo` says what to install.
DEMO_EXTRA = {"numpy": "numpy", "PIL": "Pillow"}  # module → the distribution that brings it
missing_extra: str | None = None
try:
    from proxy.demo.archive import ArchiveServer, SampleArchive
    from proxy.demo.orthanc import OrthancServer, find_orthanc
    from proxy.demo.synth import demo_set
except ModuleNotFoundError as exc:
    if exc.name not in DEMO_EXTRA:
        raise
    missing_extra = DEMO_EXTRA[exc.name]

log = logging.getLogger("dicomweb_edge.demo")


Server: TypeAlias = "OrthancServer | ArchiveServer"  # a demo archive: a real Orthanc, or the sample archive


def _start_archives(workdir: Path, force_sample: bool, stack: contextlib.ExitStack) -> tuple[str, list[Server]]:
    servers: list[Server]
    if find_orthanc() is not None and not force_sample:
        servers = [stack.enter_context(OrthancServer(workdir / n, f"DEMO_{n.upper()}")) for n in ("a", "b")]
        return "Orthanc " + "with the DICOMweb plugin", servers

    servers = [stack.enter_context(ArchiveServer(SampleArchive(f"DEMO_{n.upper()}"))) for n in ("a", "b")]
    return "the built-in sample archive (Orthanc is not installed)", servers


def _load(server: Server, datasets: list) -> None:
    if hasattr(server, "store"):
        server.store(datasets)
    else:
        server.archive.extend(datasets)


def run_demo(port: int = 8080, force_sample: bool = False, ct_slices: int = 40, host: str = "127.0.0.1",
             viewer: str | None = None) -> int:
    """Start everything, print how to try it, serve until Ctrl-C; returns the exit code.

    `viewer`: a built OHIF dist/ to serve at / ("" for the one scripts/fetch-ohif.sh fetched).
    """
    import uvicorn

    if missing_extra is not None:
        print(f"dicomweb-edge demo: the demo needs {missing_extra}, which is not installed. Install the demo extra:\n"
              "  pip install 'dicomweb-edge[demo]'     (in a clone: pip install -e '.[demo]'; ./scripts/demo.sh "
              "does it for you)", file=sys.stderr)
        return 2
    try:
        viewer_dir = None if viewer is None else str(check_viewer_dir(viewer or fetched_viewer_dir()))
    except ViewerError as exc:
        print(f"dicomweb-edge demo: {exc}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="dicomweb-edge-demo-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        kind, servers = _start_archives(workdir, force_sample, stack)
        data = demo_set(ct_slices)
        _load(servers[0], data.archive_a)
        _load(servers[1], data.archive_b)
        settings = Settings(host=host, port=port, viewer_dir=viewer_dir, archives=[
            ArchiveConfig("a", servers[0].dicomweb_url), ArchiveConfig("b", servers[1].dicomweb_url)])
        validate(settings)
        check_settings(settings)
        base = f"http://{host}:{port}/dicomweb"
        u = data.uids
        viewer_line = f"\n  viewer (OHIF): http://{host}:{port}/" if viewer_dir else ""
        print(f"""
dicomweb-edge demo
  archives ({kind}):
    a  {servers[0].dicomweb_url}   {len(data.archive_a)} instances: CT ({ct_slices} slices), JPEG slide, split study
    b  {servers[1].dicomweb_url}   {len(data.archive_b)} instances: multi-frame, non-Latin patient, split study
  proxy: {base}{viewer_line}

Try:
{_commands(base, u['ct_study'], u['ct_series'], data.archive_a[0].SOPInstanceUID)}
Press Ctrl-C to stop.
""", flush=True)
        config = uvicorn.Config(create_app(settings), host=host, port=port, access_log=False, log_level="warning",
                                loop="uvloop", http="httptools")
        # uvicorn handles Ctrl-C and SIGTERM, then re-raises them once it has stopped; turn both into
        # exceptions so that the archives it started are stopped below, not orphaned.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            uvicorn.Server(config).run()
        except (KeyboardInterrupt, SystemExit):
            pass
    return 0


def _commands(base: str, study: str, series: str, sop: str) -> str:
    """Three commands that work as printed: this interpreter (the one with dicomweb-client installed, by
    its full path), and curl where the machine has it (a fresh Debian may not: then this interpreter too)."""
    py = shlex.quote(sys.executable)
    frame = f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/1"
    accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    if shutil.which("curl"):
        search = f"  curl -s '{base}/studies?PatientName=DOE*' | {py} -m json.tool | head -40"
        fetch = f"  curl -s -o frame.bin -D - -H 'Accept: {accept}' \\\n       '{frame}'"
    else:  # (single-quoted for the shell: the programs hold no single quote)
        quoted = accept.replace('"', '\\"')
        search = (f"  {py} -c 'import httpx, json; print(json.dumps(httpx.get(\"{base}/studies?PatientName=DOE*\")"
                  f".json(), indent=1)[:2000])'")
        fetch = (f"  {py} -c 'import httpx; r = httpx.get(\"{frame}\", headers={{\"Accept\": \"{quoted}\"}}); "
                 f"open(\"frame.bin\", \"wb\").write(r.content); print(r.status_code, r.headers[\"content-type\"])'")
    retrieve = (f"  {py} -c \"from dicomweb_client.api import DICOMwebClient as C; \\\n"
                f"print(len(C('{base}').retrieve_series('{study}', '{series}')), 'instances')\"")
    return "\n".join((search, fetch, retrieve))
