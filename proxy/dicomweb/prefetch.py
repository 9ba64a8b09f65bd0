"""Prefetch: when a viewer asks for series metadata, fetch the whole series into the frame cache.

A viewer asks for a series' metadata and then for every frame of it; one series retrieve in the
background (a single upstream request) turns those frame requests into hits. Prefetches run with
bounded concurrency, yield to client requests between parts, are skipped when the series (or its
study) is already being retrieved or was prefetched recently, stop when a client retrieves the same
series or study through any worker (`yield_to`, and the siblings channel: its retrieve teaches the cache
the same instances), and never fail a client request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from proxy.cache import documents
from proxy.cache.flights import Fetching, covering, learn_instance
from proxy.coordination import siblings
from proxy.dicomweb.context import Context
from proxy.dicomweb.fetch import open_upstream
from proxy.dicomweb.reframe import PartOut, label
from proxy.errors import Problem
from proxy.formats.media import Selection
from proxy.formats.multipart import MultipartError
from proxy.observability import metrics
from proxy.upstream.archive import UpstreamError
from proxy.upstream.parts import TEE_LIMIT, Held, PartEvents, part_payload

log = logging.getLogger("dicomweb_edge.prefetch")
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_recent: dict[str, float] = {}
_tasks: set[asyncio.Task[None]] = set()
_running: dict[str, tuple[str, asyncio.Task[Any]]] = {}  # series → (study, its prefetch) streaming now
_yielding: set[asyncio.Task[Any]] = set()  # prefetches stopped by yield_to
_slots: asyncio.Semaphore | None = None


def schedule(ctx: Context, study: str, series: str) -> None:
    """Start a background prefetch of one series, unless it is pointless or already under way."""
    global _slots
    if ctx.cache is None or not ctx.settings.prefetch:
        return
    now = time.monotonic()
    if _recent.get(series, 0.0) > now or covering(study, series, ""):
        return
    _recent[series] = now + ctx.settings.prefetch_ttl
    if len(_recent) > 10_000:
        for key in [k for k, until in _recent.items() if until <= now]:
            del _recent[key]
    if _slots is None:
        _slots = asyncio.Semaphore(ctx.settings.prefetch_concurrency)
    metrics.PREFETCH_QUEUE.inc()
    task = asyncio.ensure_future(_prefetch(ctx, study, series, _slots))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def yield_to(study: str, series: str | None) -> None:
    """A client retrieves this series (None: the whole study) through this worker, and its retrieve teaches
    the cache the same instances: the prefetches of it stop, here and in the sibling workers, so that the
    archive streams them once, not twice (a script that reads a series' metadata and then retrieves it)."""
    siblings.ask_to_yield(_scope_key(study, series))
    _stop(lambda of, key: of == study and (series is None or key == series))


def sibling_yield(d: bytes) -> None:
    """A sibling worker's client retrieves what digest `d` names (`yield_to` there)."""
    _stop(lambda of, key: d in (siblings.digest(_scope_key(of, key)), siblings.digest(_scope_key(of, None))))


def _scope_key(study: str, series: str | None) -> str:
    return f"prefetch/{study}" + (f"/{series}" if series else "")


def _stop(matches: Callable[[str, str], bool]) -> None:
    for key, (of, task) in list(_running.items()):
        if matches(of, key) and not task.done():
            _yielding.add(task)
            task.cancel()


async def _prefetch(ctx: Context, study: str, series: str, slots: asyncio.Semaphore) -> None:
    cache = ctx.cache
    assert cache is not None
    async with slots:
        metrics.PREFETCH_QUEUE.dec()
        ttl = ctx.settings.prefetch_ttl
        if covering(study, series, "") or not await asyncio.to_thread(documents.claim_prefetch, cache, study, series,
                                                                      ttl):
            metrics.child(metrics.PREFETCHES, "skipped").inc()  # another worker has it, or is on it
            return
        fetching = Fetching(study, series, None, cache)
        outcome = "done"
        me = asyncio.current_task()
        assert me is not None
        _running[series] = (study, me)
        try:
            sel = Selection(True, "application/dicom", "*")
            resp, stack = await open_upstream(ctx, study, f"/studies/{study}/series/{series}", ACCEPT,
                                              _NoRequest(), "prefetch")
            async with stack:
                if resp.status >= 300:
                    outcome = "refused"
                    return
                events = PartEvents(resp)
                head = await events.first()
                while head is not None:  # the event loop serves clients between reads
                    part = await label(events, head, sel)
                    payload = await _payload(events, part)
                    if payload is not None:
                        learn_instance(cache, part.content_type, payload, resp.archive.audience, fetching=fetching)
                    head = await events.next_headers()
        except (Problem, UpstreamError, MultipartError, Exception) as exc:  # a prefetch never hurts anyone
            outcome = "failed"
            log.info("prefetch failed: %s", type(exc).__name__)
        except asyncio.CancelledError:
            if me not in _yielding:
                raise  # the worker stops
            outcome = "yielded"  # to a client's retrieve of the same instances: its claim stays
            me.uncancel()
        finally:
            _running.pop(series, None)
            _yielding.discard(me)
            if outcome not in ("done", "yielded"):
                await asyncio.to_thread(documents.release_prefetch, cache, series)
            await fetching.done()
            metrics.child(metrics.PREFETCHES, outcome).inc()


async def _payload(events: PartEvents, part: PartOut) -> list[bytes | memoryview] | None:
    """The payload of the part `label` started reading, received whole into one buffer when it declared
    its length (parts.part_payload); None for a part too large to keep (read past, not collected)."""
    held = Held(TEE_LIMIT)
    async for _ in part_payload(events, part.held, held):
        pass
    return held.pieces


class _NoRequest:
    """Stands in for the client request a prefetch does not have (only its request id is read)."""

    scope: dict[str, dict[str, str]] = {"state": {}}
