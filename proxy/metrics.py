"""Every Prometheus metric of the proxy, in one place.

With several uvicorn workers, `PROMETHEUS_MULTIPROC_DIR` is set by the CLI before any worker starts
and the `/metrics` endpoint aggregates all workers. Labels never hold UIDs or patient data: only
the service, the archive's configured name, the status code and similar closed sets.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

SERVICES = ("qido", "metadata", "instance", "frames", "bulkdata", "rendered", "thumbnail", "stow", "other")
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("dicomweb_edge_requests_total", "Requests answered, by DICOMweb service and status.",
                   ["service", "status"])
REQUEST_DURATION = Histogram("dicomweb_edge_request_duration_seconds",
                             "Time from request to the last byte of the response, by service.",
                             ["service"], buckets=_LATENCY)
RESPONSE_BYTES = Counter("dicomweb_edge_response_bytes_total", "Response body bytes sent, by service.",
                         ["service"])
UPSTREAM_REQUESTS = Counter("dicomweb_edge_upstream_requests_total",
                            "Requests sent to archives, by archive, service and upstream status "
                            "('error' when no status was received).", ["archive", "service", "status"])
UPSTREAM_TTFB = Histogram("dicomweb_edge_upstream_ttfb_seconds",
                          "Time until an archive's response headers arrived.", ["archive", "service"],
                          buckets=_LATENCY)
UPSTREAM_DURATION = Histogram("dicomweb_edge_upstream_duration_seconds",
                              "Time an archive response was held open.", ["archive", "service"],
                              buckets=_LATENCY)
UPSTREAM_IN_FLIGHT = Gauge("dicomweb_edge_upstream_in_flight", "Requests in flight to each archive.",
                           ["archive"], multiprocess_mode="livesum")


ARCHIVE_BREAKER = Gauge("dicomweb_edge_archive_breaker_state",
                        "Circuit breaker of each archive: 0 closed, 1 half-open, 2 open.", ["archive"],
                        multiprocess_mode="max")
ARCHIVE_UP = Gauge("dicomweb_edge_archive_up", "1 when the last health probe of the archive succeeded.",
                   ["archive"], multiprocess_mode="max")
SEARCH_FANOUT = Histogram("dicomweb_edge_search_fanout_archives", "Archives asked by one federated search.",
                          buckets=(1, 2, 3, 4, 6, 8, 12, 16))
SEARCH_PARTIAL = Counter("dicomweb_edge_search_partial_total",
                         "Federated searches answered without some archive, by archive and reason.",
                         ["archive", "reason"])


CACHE_RESULTS = Counter("dicomweb_edge_cache_lookups_total", "Frame cache lookups by tier and result "
                        "(hit, miss, corrupt).", ["tier", "result"])
CACHE_BYTES_WRITTEN = Counter("dicomweb_edge_cache_written_bytes_total", "Bytes stored in the frame cache.",
                              ["tier"])

CACHE_WAITERS = Counter("dicomweb_edge_cache_singleflight_waiters_total",
                        "Frame requests that waited for a fetch already in flight instead of asking the archive.")

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

_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, memoised: label sets are small and closed, and `labels()` costs
    about 10 µs a call, several times per request on the hot path."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


def render() -> tuple[bytes, str]:
    """The exposition text for `/metrics` (all workers when running multi-process)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
