"""Contract tests for the private parts of libraries the proxy leans on (ARCHITECTURE.md, "Private APIs").

Each is pinned with an upper bound in pyproject.toml; when a new release changes one of them, the test of
that use fails here with a message naming what moved, before anything fails in production.
"""

from __future__ import annotations

import inspect

import diskcache
import diskcache.core
import prometheus_client
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.supervisors import Multiprocess


def missing(owner: object, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not hasattr(owner, n)]


def test_uvicorn_httptools_protocol_still_has_what_the_server_protocol_overrides_and_reads():
    """proxy/http/protocol.py subclasses HttpToolsProtocol: it overrides its parser callbacks and flow
    control, and reads its connection state to run the hit lane before an ASGI request exists."""
    hooks = ("on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body", "on_message_complete",
             "connection_made", "connection_lost", "pause_writing", "resume_writing",
             "_unset_keepalive_if_required", "timeout_keep_alive_handler")
    lost = missing(HttpToolsProtocol, hooks)
    assert not lost, f"uvicorn's HttpToolsProtocol lost {lost}"
    source = inspect.getsource(HttpToolsProtocol)
    state = ("self.parser", "self.transport", "self.flow", "self.server_state", "self.pipeline", "self.cycle",
             "self.timeout_keep_alive_task", "self.timeout_keep_alive", "self.root_path", "self.app", "self.loop",
             "self.scope", "self.headers", "self.url")
    gone = [s for s in state if s not in source]
    assert not gone, f"uvicorn's HttpToolsProtocol no longer sets {gone}"
    assert isinstance(STATUS_LINE, dict) and STATUS_LINE[200].startswith(b"HTTP/1.1 200")


def test_uvicorn_response_cycle_and_flow_control_as_the_relay_uses_them():
    """proxy/upstream/splice.py takes over a response cycle's send to move a relay's bytes itself."""
    source = inspect.getsource(RequestResponseCycle)
    gone = [a for a in ("self.send", "self.flow", "self.disconnected", "self.response_complete",
                        "self.chunked_encoding", "self.expected_content_length", "self.scope") if a not in source]
    assert not gone, f"uvicorn's RequestResponseCycle no longer has {gone}"
    assert not missing(FlowControl, ("drain",)) and "write_paused" in inspect.getsource(FlowControl)


def test_uvicorn_multiprocess_supervisor_as_cli_subclasses_it():
    """proxy/cli.py subclasses Multiprocess to close the listening socket before the workers stop."""
    assert not missing(Multiprocess, ("terminate_all", "run")), "uvicorn's Multiprocess changed"
    assert "self.sockets" in inspect.getsource(Multiprocess), "Multiprocess no longer keeps its sockets"


def test_prometheus_histogram_internals_the_tally_adds_to():
    """proxy/observability/metrics.py batches histogram observations on the event loop (TALLY) and adds
    them to each child's `_sum` and `_buckets` at once, by the child's `_upper_bounds`."""
    registry = prometheus_client.CollectorRegistry()
    h = prometheus_client.Histogram("contract_seconds", "contract", ["a"], registry=registry, buckets=(0.1, 1.0))
    child = h.labels("x")
    assert list(child._upper_bounds) == [0.1, 1.0, float("inf")], "Histogram._upper_bounds changed"
    child._sum.inc(2.5)
    child._buckets[1].inc(3)
    samples = {(s.name, s.labels.get("le")): s.value for s in registry.collect().__next__().samples}
    assert samples[("contract_seconds_sum", None)] == 2.5, "Histogram._sum no longer feeds the _sum sample"
    assert samples[("contract_seconds_bucket", "1.0")] == 3, "Histogram._buckets no longer feeds the buckets"


def test_diskcache_disk_and_core_as_the_disk_tier_uses_them(tmp_path):
    """proxy/cache/entries.py subclasses diskcache.Disk (flat file layout, pieces written without a join);
    purges and checks open the index by diskcache.core.DBNAME and read UNKNOWN."""
    assert "filename" in vars(diskcache.Disk), "diskcache.Disk.filename is gone"
    assert list(inspect.signature(diskcache.Disk.filename).parameters) == ["self", "key", "value"]
    assert "self._directory" in inspect.getsource(diskcache.Disk.__init__), "Disk no longer keeps _directory"
    assert diskcache.core.DBNAME == "cache.db" and diskcache.core.UNKNOWN is not None
    # The refusal of pickled rows overrides the three places diskcache converts a row (entries.FlatDisk).
    for name, params in (("fetch", ["self", "mode", "filename", "value", "read"]), ("get", ["self", "key", "raw"]),
                         ("store", ["self", "value", "read", "key"])):
        assert list(inspect.signature(getattr(diskcache.Disk, name)).parameters) == params, f"Disk.{name} changed"
    assert "pickle" in inspect.getsource(diskcache.Disk.fetch) and diskcache.core.MODE_PICKLE == 4, \
        "diskcache no longer marks pickled values with MODE_PICKLE"
    cache = diskcache.Cache(str(tmp_path), disk_min_file_size=16)
    try:
        assert cache.disk_min_file_size == 16, "diskcache.Cache.disk_min_file_size changed"
        assert isinstance(cache.disk, diskcache.Disk), "diskcache.Cache.disk changed"
        cache.reset("eviction_policy", "none", update=False)  # (the proxy's read-only handle)
    finally:
        cache.close()
