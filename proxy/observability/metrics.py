"""Every Prometheus metric of the proxy, in one place.

With several uvicorn workers, `PROMETHEUS_MULTIPROC_DIR` is set by the CLI before any worker starts
(`workers_directory`) and the `/metrics` endpoint aggregates all workers: counters and histograms add up
every worker that ever ran; gauges count the live workers only (`livesum`, `livemax`), because the
supervisor marks a worker that dies (`worker_gone`) and its last values leave `/metrics`; the
`process_*` metrics are read per live worker at scrape time, labelled with its `pid`. Labels never hold
UIDs or patient data: only the service, the archive's configured name, the status code and similar
closed sets.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import glob
import importlib.metadata
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric

SERVICES = ("qido", "metadata", "instance", "frames", "bulkdata", "rendered", "thumbnail", "stow", "other")
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("dicomweb_edge_requests_total", "Requests answered, by DICOMweb service and status.",
                   ["service", "status"])
REQUEST_DURATION = Histogram("dicomweb_edge_request_duration_seconds",
                             "Time from request to the last byte of the response, by service and status class.",
                             ["service", "code"], buckets=_LATENCY)
REQUEST_TTFB = Histogram("dicomweb_edge_request_ttfb_seconds",
                         "Time from request to the response headers (time to first byte), by service.",
                         ["service"], buckets=_LATENCY)
RESPONSE_BYTES = Counter("dicomweb_edge_response_bytes_total", "Response body bytes sent, by service.",
                         ["service"])
REQUEST_BYTES = Counter("dicomweb_edge_request_bytes_total", "Request body bytes received (STOW), by service.",
                        ["service"])
REQUESTS_IN_FLIGHT = Gauge("dicomweb_edge_requests_in_flight", "Requests being answered, all workers.",
                           multiprocess_mode="livesum")
UPSTREAM_REQUESTS = Counter("dicomweb_edge_upstream_requests_total",
                            "Requests sent to archives, by archive, service and upstream status "
                            "('error' when no status was received).", ["archive", "service", "status"])
UPSTREAM_TTFB = Histogram("dicomweb_edge_upstream_ttfb_seconds",
                          "Time until an archive's response headers arrived.", ["archive", "service"],
                          buckets=_LATENCY)
UPSTREAM_DURATION = Histogram("dicomweb_edge_upstream_duration_seconds",
                              "Time an archive response was held open.", ["archive", "service"],
                              buckets=_LATENCY)
UPSTREAM_ERROR_KINDS = ("connect_timeout", "first_byte_timeout", "unreachable", "protocol", "idle_timeout", "reset",
                        "http_5xx")
UPSTREAM_ERRORS = Counter("dicomweb_edge_upstream_errors_total",
                          "Archive failures by kind: connect_timeout, first_byte_timeout, unreachable, protocol, "
                          "idle_timeout, reset (mid-body), http_5xx.", ["archive", "kind"])
UPSTREAM_BYTES = Counter("dicomweb_edge_upstream_received_bytes_total", "Response body bytes read from archives.",
                         ["archive"])
RELAYED_BYTES = Counter("dicomweb_edge_relayed_bytes_total",
                        "Response body bytes moved from an archive's socket to the client's with splice(2), "
                        "never copied through the proxy (part of upstream_received_bytes).", ["archive"])
UPSTREAM_IN_FLIGHT = Gauge("dicomweb_edge_upstream_in_flight", "Requests in flight to each archive.",
                           ["archive"], multiprocess_mode="livesum")


ARCHIVE_BREAKER = Gauge("dicomweb_edge_archive_breaker_state",
                        "Circuit breaker of each archive: 0 closed, 1 half-open, 2 open.", ["archive"],
                        multiprocess_mode="livemax")
ARCHIVE_UP = Gauge("dicomweb_edge_archive_up", "1 when the last health probe of the archive succeeded.",
                   ["archive"], multiprocess_mode="livemax")
SEARCH_FANOUT = Histogram("dicomweb_edge_search_fanout_archives", "Archives asked by one federated search.",
                          buckets=(1, 2, 3, 4, 6, 8, 12, 16))
SEARCH_PARTIAL = Counter("dicomweb_edge_search_partial_total",
                         "Federated searches answered without some archive, by archive and reason (error, timeout, "
                         "circuit_open).",
                         ["archive", "reason"])


CACHE_KINDS = ("frame", "metadata", "search", "instance", "bulkdata", "rendered", "thumbnail")
CACHE_RESULTS = Counter("dicomweb_edge_cache_lookups_total", "Cache lookups by tier, kind (frame, metadata, "
                        "search, instance, bulkdata, rendered, thumbnail) and result (hit, miss, stale, corrupt, "
                        "write-failed).", ["tier", "kind", "result"])
CACHE_SERVED_BYTES = Counter("dicomweb_edge_cache_hit_bytes_total", "Bytes found in the cache, by tier and kind.",
                             ["tier", "kind"])
CACHE_BYTES_WRITTEN = Counter("dicomweb_edge_cache_written_bytes_total", "Bytes stored in the cache, by tier.",
                              ["tier"])
CACHE_EVICTIONS = Counter("dicomweb_edge_cache_evictions_total",
                          "Entries dropped to stay within the size bound, by tier.", ["tier"])
CACHE_MEMORY_BYTES = Gauge("dicomweb_edge_cache_memory_bytes", "Bytes held by the memory tiers, all workers.",
                           multiprocess_mode="livesum")
CACHE_MEMORY_ENTRIES = Gauge("dicomweb_edge_cache_memory_entries", "Entries held by the memory tiers, all workers.",
                             multiprocess_mode="livesum")
CACHE_DEFERRED_BYTES = Gauge("dicomweb_edge_cache_deferred_bytes",
                             "Bytes of frames served from memory and waiting for a quiet moment to be written to "
                             "the disk tier, all workers.", multiprocess_mode="livesum")
CACHE_DEFERRED_WRITES = Counter("dicomweb_edge_cache_deferred_writes_total",
                                "Frames served from memory that were to wait for a quiet moment, handed to the "
                                "disk writer, by why: quiet (no client for a moment), wanted (a sibling worker "
                                "waits for them), waited (their longest), bound (too many bytes deferred), stop "
                                "(the worker stops).", ["why"])

CACHE_WAITERS = Counter("dicomweb_edge_cache_singleflight_waiters_total",
                        "Requests (frames, metadata, searches, instances, bulk data, renderings) that waited for "
                        "an identical fetch already in flight instead of asking the archive.")
SHARED_FAILURES = Counter("dicomweb_edge_shared_failures_total",
                          "Requests answered with the failure of an identical request's archive fetch they "
                          "waited for (single-flight), by the failure's status: archive failures answered more "
                          "than once.", ["status"])
CACHE_HANDOVERS = Counter("dicomweb_edge_cache_handovers_total",
                          "Frames a worker asked a sibling worker for and received from its memory tier "
                          "(instead of waiting for them on the shared disk tier), by outcome: given, none "
                          "(the sibling did not hold them: the disk tier then).", ["outcome"])

PREFETCH_QUEUE = Gauge("dicomweb_edge_prefetch_queued", "Series prefetches waiting for a slot.",
                       multiprocess_mode="livesum")
PREFETCHES = Counter("dicomweb_edge_prefetches_total", "Series prefetches by outcome.", ["outcome"])

SHARED_LOOKUPS = Counter("dicomweb_edge_shared_lookups_total",
                         "Lookups in the shared tier (Redis) after a local miss, by table (locator, search) and "
                         "result (hit, miss; a failed lookup is a miss).", ["table", "result"])
SHARED_FALLBACKS = Counter("dicomweb_edge_shared_fallbacks_total",
                           "Shared-tier (Redis) operations not done because Redis failed, was too slow or is being "
                           "left alone after a failure; the process used its local state instead. By operation "
                           "(locate, learn, forget, search_get, search_put, invalidate, subscribe).", ["operation"])
AUTH_FAILURES = Counter("dicomweb_edge_auth_failures_total",
                        "Requests refused by inbound authentication, by reason: missing, invalid, expired (401), "
                        "scope (403), access (a pass-through archive refused the caller a study).", ["reason"])

_children: dict[tuple[int, tuple[str, ...]], Any] = {}
FLUSH_INTERVAL = 0.05  # seconds: per-request updates reach the shared values this often


class Tally:
    """Per-request metric updates added up in plain dicts, written to the metric values at most every
    FLUSH_INTERVAL.

    In multi-process mode each write to a value is a locked mmap write (~2 µs); a request answered
    from the cache made ten of them. Added up here, a burst of requests costs a few writes per series
    per interval instead. Only for the event loop's thread; `/metrics` flushes first, so a scrape of a
    single worker is exact, and another worker's last updates are at most FLUSH_INTERVAL late.
    """

    def __init__(self) -> None:
        self.counts: dict[Any, float] = {}  # counter or gauge child → amount to add
        self.histograms: dict[Any, list[Any]] = {}  # histogram child → [sum, count per bucket]
        self.levels: dict[Any, float] = {}  # gauge child → its latest value
        self.handle: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def inc(self, metric_child: Any, amount: float = 1.0) -> None:
        """`child.inc(amount)` (a gauge's dec is a negative amount), later."""
        if not self._armed():
            metric_child.inc(amount)
            return
        self.counts[metric_child] = self.counts.get(metric_child, 0.0) + amount

    def set(self, metric_child: Any, value: float) -> None:
        """`child.set(value)` on a gauge, later (only the latest value is written)."""
        if not self._armed():
            metric_child.set(value)
            return
        self.levels[metric_child] = value

    def observe(self, metric_child: Any, value: float) -> None:
        """`child.observe(value)` on a histogram, later."""
        if not self._armed():
            metric_child.observe(value)
            return
        pending = self.histograms.get(metric_child)
        if pending is None:
            pending = self.histograms[metric_child] = [0.0, [0] * len(metric_child._upper_bounds)]
        pending[0] += value
        pending[1][bisect.bisect_left(metric_child._upper_bounds, value)] += 1

    def _armed(self) -> bool:
        """True on a thread running an event loop, with a flush scheduled on it. Elsewhere (the threads
        the disk tier works in) updates are written at once: the dicts here are the loop's alone."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self.handle is None or self.loop is not loop:
            self.loop = loop
            self.handle = loop.call_later(FLUSH_INTERVAL, self.flush)
        return True

    def flush(self) -> None:
        """Write what was added up."""
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        counts, self.counts = self.counts, {}
        histograms, self.histograms = self.histograms, {}
        levels, self.levels = self.levels, {}
        for metric_child, value in levels.items():
            metric_child.set(value)
        for metric_child, amount in counts.items():
            if amount:
                metric_child.inc(amount)
        for metric_child, (total, buckets) in histograms.items():
            metric_child._sum.inc(total)
            for bucket, n in zip(metric_child._buckets, buckets, strict=True):
                if n:
                    bucket.inc(n)


TALLY = Tally()


def count_hit(tier: str, kind: str, size: int) -> None:
    """A cache hit served `size` bytes from `tier` (memory, disk): the path that must be cheap, so the
    updates are added up (TALLY)."""
    TALLY.inc(child(CACHE_RESULTS, tier, kind, "hit"))
    TALLY.inc(child(CACHE_SERVED_BYTES, tier, kind), size)


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, memoised: label sets are small and closed, and `labels()` costs
    about 10 µs a call, several times per request on the hot path."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


class _Snapshot:
    """Gauges read at scrape time from shared state (the disk tier is one directory for all workers)."""

    def __init__(self, cache_stats: dict[str, int | bool] | None) -> None:
        self.cache_stats = cache_stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily("dicomweb_edge_build_info", "The running proxy's version.", labels=["version"])
        info.add_metric([_version()], 1)
        yield info
        st = self.cache_stats
        if st is None:
            return
        for name, doc, value in (
            ("dicomweb_edge_cache_disk_entries", "Entries in the shared disk tier.", st["disk_entries"]),
            ("dicomweb_edge_cache_disk_bytes", "Bytes used by the shared disk tier.", st["disk_bytes"]),
            ("dicomweb_edge_cache_disk_limit_bytes", "Size bound of the shared disk tier.", st["disk_limit_bytes"]),
            ("dicomweb_edge_cache_writable", "1 while the disk tier accepts writes (0 while they fail: a full disk).",
             int(st["writable"])),
            ("dicomweb_edge_cache_filesystem_free_bytes", "Free bytes on the filesystem of the cache directory.",
             st.get("filesystem_free_bytes", 0)),
            ("dicomweb_edge_cache_filesystem_size_bytes", "Size of the filesystem of the cache directory.",
             st.get("filesystem_size_bytes", 0)),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("dicomweb-edge")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def render(cache_stats: dict[str, int | bool] | None = None) -> tuple[bytes, str]:
    """The exposition text for `/metrics`: every worker's counters (multi-process mode), plus the
    scrape-time gauges (`cache_stats` from `FrameCache.stats()`, when the cache is on)."""
    TALLY.flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(_WorkerProcesses())
    else:
        from prometheus_client import REGISTRY as registry  # noqa: N811
    snapshot = CollectorRegistry()
    snapshot.register(_Snapshot(cache_stats))
    return generate_latest(registry) + generate_latest(snapshot), CONTENT_TYPE_LATEST


WORKERS_FILE = "workers.pids"  # in the metrics directory: the supervisor's live workers, one pid a line


def workers_directory() -> str:
    """The directory the workers keep their metric files in (`PROMETHEUS_MULTIPROC_DIR`), made empty: a
    new one, or the operator's with an earlier run's files removed (they would count as this run's).
    Called by the supervisor, before it starts the workers."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dicomweb-edge-metrics-")
    for stale in [*glob.glob(os.path.join(directory, "*.db")), os.path.join(directory, WORKERS_FILE)]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    return directory


def workers_now(pids: Iterable[int | None], gone: Iterable[int | None] = ()) -> None:
    """The supervisor's word on its workers: these serve, those ended (their gauges leave `/metrics`; their
    counts stay in the totals)."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for pid in gone:
        if pid is not None:
            multiprocess.mark_process_dead(pid, directory)
    path = os.path.join(directory, WORKERS_FILE)
    with open(path + ".new", "w") as out:
        out.writelines(f"{pid}\n" for pid in pids if pid is not None)
    os.replace(path + ".new", path)


def live_workers() -> list[int]:
    """The worker processes serving beside this one, as the supervisor recorded them."""
    try:
        with open(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], WORKERS_FILE)) as listing:
            return sorted(int(pid) for pid in listing.read().split())
    except (KeyError, OSError, ValueError):
        return [os.getpid()]


class _WorkerProcesses:
    """`process_*` (memory, CPU, open files) of every live worker, read from /proc at scrape time."""

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for pid in live_workers():
            for family in ProcessCollector(pid=functools.partial(int, pid), registry=None).collect():
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        yield from merged.values()


class Activity:
    """When this worker last served a client, for work that can wait for a quiet moment.

    Background work, such as writing frames the memory tier already serves to the shared disk tier
    (cache/writer.py), competes with the clients being served for the same cores: it asks `quiet_for()`
    and waits while clients keep coming. Every DICOMweb request marks the worker busy when it starts and
    when it ends (http/edge.py); operations requests (health checks, metric scrapes) do not. One per
    worker, made by the composition root (runtime.py)."""

    def __init__(self) -> None:
        self.last = -1e9  # monotonic time a client request last started or ended

    def client(self) -> None:
        """A client request starts or ends now."""
        self.last = time.monotonic()

    def quiet_for(self) -> float:
        """Seconds since a client request last started or ended."""
        return time.monotonic() - self.last
