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
from proxy.cache.learning import Learner
from proxy.coordination.flights import Flights
from proxy.dicomweb.context import Context
from proxy.dicomweb.fetch import locate, open_upstream
from proxy.dicomweb.reframe import PartOut, label
from proxy.errors import Problem
from proxy.formats.media import Selection
from proxy.formats.multipart import MultipartError
from proxy.observability import metrics
from proxy.upstream.archive import UpstreamError
from proxy.upstream.parts import TEE_LIMIT, Held, PartEvents, part_payload

log = logging.getLogger("dicomweb_edge.prefetch")
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
RECENT_BOUND = 10_000  # series remembered as prefetched recently before the expired ones are forgotten


def _scope_key(study: str, series: str | None) -> str:
    return f"prefetch/{study}" + (f"/{series}" if series else "")


class Prefetcher:
    """One worker's prefetches: which series were prefetched recently, which run now, how many at once."""

    def __init__(self, flights: Flights, learner: Learner, concurrency: int) -> None:
        self.flights = flights
        self.learner = learner
        self.slots = asyncio.Semaphore(concurrency)
        self.recent: dict[str, float] = {}  # series → monotonic time until which it is not prefetched again
        self.tasks: set[asyncio.Task[None]] = set()
        self.running: dict[str, tuple[str, asyncio.Task[Any]]] = {}  # series → (study, its prefetch) streaming now
        self.yielding: set[asyncio.Task[Any]] = set()  # prefetches stopped by yield_to

    def schedule(self, ctx: Context, study: str, series: str) -> None:
        """Start a background prefetch of one series, unless it is pointless or already under way."""
        if ctx.cache is None or not ctx.settings.prefetch:
            return
        now = time.monotonic()
        if self.recent.get(series, 0.0) > now or self.learner.covering(study, series, ""):
            return
        self.recent[series] = now + ctx.settings.prefetch_ttl
        if len(self.recent) > RECENT_BOUND:
            for key in [k for k, until in self.recent.items() if until <= now]:
                del self.recent[key]
        metrics.PREFETCH_QUEUE.inc()
        task = asyncio.ensure_future(self._prefetch(ctx, study, series))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def yield_to(self, study: str, series: str | None) -> None:
        """A client retrieves this series (None: the whole study) through this worker, and its retrieve
        teaches the cache the same instances: the prefetches of it stop, here and in the sibling workers, so
        that the archive streams them once, not twice (a script that reads a series' metadata and then
        retrieves it)."""
        self.flights.preempt(_scope_key(study, series))
        self._stop(lambda of, key: of == study and (series is None or key == series))

    def sibling_yield(self, d: bytes) -> None:
        """A sibling worker's client retrieves what digest `d` names (`yield_to` there)."""
        token = self.flights.token
        self._stop(lambda of, key: d in (token(_scope_key(of, key)), token(_scope_key(of, None))))

    def _stop(self, matches: Callable[[str, str], bool]) -> None:
        for key, (of, task) in list(self.running.items()):
            if matches(of, key) and not task.done():
                self.yielding.add(task)
                task.cancel()

    async def close(self) -> None:
        """Stop the prefetches (the worker stops)."""
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _prefetch(self, ctx: Context, study: str, series: str) -> None:
        cache = ctx.cache
        assert cache is not None
        async with self.slots:
            metrics.PREFETCH_QUEUE.dec()
            # Led among the workers (one prefetches a series at a time), and not again within prefetch_ttl
            # of the last one by any worker (the record on the disk tier).
            flight = None if self.learner.covering(study, series, "") else self.flights.lead(["prefetch/" + series])
            if flight is None or not await asyncio.to_thread(documents.mark_prefetched, cache, study, series,
                                                             ctx.settings.prefetch_ttl):
                if flight is not None:
                    flight.end()
                metrics.child(metrics.PREFETCHES, "skipped").inc()  # another worker has it, or is on it
                return
            try:
                await self._stream(ctx, study, series)
            finally:
                flight.end()

    async def _stream(self, ctx: Context, study: str, series: str) -> None:
        cache = ctx.cache
        assert cache is not None
        fetching = self.learner.retrieving(cache, study, series, None)
        outcome = "done"
        me = asyncio.current_task()
        assert me is not None
        self.running[series] = (study, me)
        try:
            sel = Selection(True, "application/dicom", "*")
            able = [a for a in await locate(ctx, study) if a.profile.whole_retrieve]
            if not able:  # no archive holding it retrieves a whole series (aws): not asked for one
                outcome = "refused"
                return
            resp, stack = await open_upstream(ctx, study, f"/studies/{study}/series/{series}", ACCEPT,
                                              _NoRequest(), "prefetch", archives=able)
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
                        self.learner.learn_instance(cache, part.content_type, payload, resp.archive.audience,
                                                    retrieving=fetching, native=True)  # (asked `*`)
                    head = await events.next_headers()
        except (Problem, UpstreamError, MultipartError, Exception) as exc:  # a prefetch never hurts anyone
            outcome = "failed"
            log.info("prefetch failed: %s", type(exc).__name__)
        except asyncio.CancelledError:
            if me not in self.yielding:
                raise  # the worker stops
            outcome = "yielded"  # to a client's retrieve of the same instances: its record stays
            me.uncancel()
        finally:
            self.running.pop(series, None)
            self.yielding.discard(me)
            if outcome not in ("done", "yielded"):
                await asyncio.to_thread(documents.forget_prefetched, cache, series)
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
