"""The disk tier's writer: one thread, batched transactions, what a client waits for first, and frames
this worker already serves from memory once it is quiet.

Every write to the shared disk tier runs in this one thread: writes never contend with each other for
SQLite's lock and never block the event loop. Three queues, taken in this order:

- first: a write a client's answer waits for (a metadata document). It waits for the instance being
  written at most: the batch in progress is committed as far as it got and the rest queued again.
- now: frames a sibling worker waits for (it said so on the siblings channel: `want`; they go to the
  front), then every other frame of their study (a sibling serving a viewer of the study will want
  those next; for WANT_FOR seconds, frames of the study are not held back at all), frames that waited
  MAX_WAIT seconds, and the oldest of the deferred frames beyond the deferral bound.
- later: frames this worker serves from its memory tier already (a prefetch, an instance passing
  through; a frame fetched on a miss is written at once, frames.py). They go to disk, for the other
  workers and the next start, once no client request has started or ended for QUIET seconds, a batch
  at a time while it stays quiet; after MAX_WAIT seconds whatever happens; all of them when the worker
  stops.

Why later: writing a 512 KB frame (its file, the page-cache copy, ext4's allocation, two SQLite rows)
costs ~0.4 ms of CPU alone and 1-1.5 ms while a series streams in, on the cores that serve the viewer
waiting for that series (benchmarks/RESULTS.md, "Disk writes wait for a quiet moment").
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from proxy.observability import metrics

log = logging.getLogger("dicomweb_edge.cache")

T = TypeVar("T")
# the placed instance (Placement.key), frame, media type, transfer syntax, payload, checksum, and whether it is
# the archive's own encoding (what it answered to `transfer-syntax=*`: store.index_key)
FrameToWrite = tuple[str, int, str, str, bytes, int, bool]
Written = list[bool]  # for each frame of an item: whether it is on disk now
Item = tuple[list[FrameToWrite], str | None]  # frames, the study to tag them with
# Writes items in one transaction, stopping early (after the first) once `interrupted()`; tells, for each
# item it got to, in order, which of its frames are on disk.
Commit = Callable[[list[Item], Callable[[], bool]], list[Written]]
BATCH = 8  # frames written in one transaction at most (siblings see them a batch at a time)
QUIET = 0.2  # seconds without a client request before deferred frames are written
MAX_WAIT = 10.0  # seconds a deferred frame waits for a quiet moment at most
WANT_FOR = 30.0  # seconds a sibling's want is remembered for frames not queued yet


_Queued = tuple[list[FrameToWrite], str | None, asyncio.Future[Written], bytes | None]  # frames, study, done, token


@dataclass(slots=True)
class _Deferred:
    frames: list[FrameToWrite]
    study: str | None
    done: asyncio.Future[Written]
    token: bytes | None
    until: float  # monotonic deadline
    size: int


class DiskWriter:
    """The writer thread and its queues (see the module doc)."""

    def __init__(self, commit: Commit, defer_limit: int, activity: metrics.Activity) -> None:
        self.activity = activity  # when the worker last served a client (deferred frames wait for quiet)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="cache-writer")
        self.defer_limit = defer_limit
        self._commit = commit
        self._lock = threading.Lock()
        self._first: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self._now: list[_Queued] = []
        self._draining = False
        self._later: OrderedDict[int, _Deferred] = OrderedDict()  # oldest first
        self._later_bytes = 0
        self._seq = 0
        self._tokens: dict[bytes, list[int]] = {}  # token → deferred items it names
        self._wanted: dict[bytes, float] = {}  # token → until: asked for before it was queued
        self._shared: dict[str, float] = {}  # study → until: a sibling serves it too, hold nothing back
        self._aliases: dict[bytes, str] = {}  # token → study: wanting it wants the study (a retrieve in flight)
        self._timer: asyncio.TimerHandle | None = None
        self._pacing = False  # a batch written because it was quiet: look again once it is done

    @property
    def held_back_bytes(self) -> int:
        """Bytes of frames waiting for a quiet moment (this worker)."""
        return self._later_bytes

    def run(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run `fn` in the writer thread, in no particular order with the queues (fire and forget)."""
        return self.thread.submit(fn, *args)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run a blocking disk-tier write in the writer thread, awaitable."""
        return asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    def write_first(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `fn` in the writer thread ahead of every frame queued there (a write a client waits for).

        In any other thread it would contend for SQLite's write lock with the writer, which commits batch
        after batch while a series streams in, and lose for as long (measured: 541 ms for one metadata
        document during a prefetch, against 22 ms without one)."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue(self._first, (fn, args, done))
        return done

    def write_soon(self, frames: list[FrameToWrite], study: str | None, token: bytes | None = None,
                   defer: bool = False) -> asyncio.Future[Written]:
        """Queue frames for the disk tier; done once they are on disk (or failed to go there). With `defer`,
        they wait for a quiet moment unless a sibling wants `token` (or did before)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Written] = loop.create_future()
        if defer:
            now = time.monotonic()
            asked = token is not None and self._wanted.pop(token, 0.0) >= now  # before they came
            if asked:
                self._share(study, now)
            if asked or (study is not None and self._shared.get(study, 0.0) >= now):
                defer = False
                metrics.child(metrics.CACHE_DEFERRED_WRITES, "wanted").inc(len(frames))
        if not defer:
            self._queue(self._now, (frames, study, done, token))
            return done
        self._seq += 1
        size = sum(len(f[4]) for f in frames)
        self._later[self._seq] = _Deferred(frames, study, done, token, time.monotonic() + MAX_WAIT, size)
        self._later_bytes += size
        if token is not None:
            self._tokens.setdefault(token, []).append(self._seq)
        while self._later_bytes > self.defer_limit and len(self._later) > 1:
            self._promote(next(iter(self._later)), "bound")
        self._gauge()
        self._arm(loop)
        return done

    def want(self, token: bytes) -> None:
        """A sibling worker waits for the frames `token` names: write them next, with the rest of their
        study, or once they are queued."""
        now = time.monotonic()
        seqs = self._tokens.get(token)
        if not seqs and self._hurry(token):
            return
        if not seqs and token in self._aliases:
            self._share(self._aliases[token], now)
            self._gauge()
            return
        if not seqs:
            self._wanted[token] = now + WANT_FOR
            if len(self._wanted) > 10_000:
                self._wanted = {t: until for t, until in self._wanted.items() if until >= now}
            return
        study = self._later[seqs[0]].study
        for seq in list(seqs):
            self._promote(seq, "wanted", front=True)  # ahead of the rest of a study another want let go
        self._share(study, now)
        self._gauge()

    def _hurry(self, token: bytes) -> bool:
        """Frames `token` names queued already (behind a study another want let go): to the front."""
        with self._lock:
            for i, queued in enumerate(self._now):
                if queued[3] == token:
                    if i:
                        self._now.insert(0, self._now.pop(i))
                    return True
        return False

    def _share(self, study: str | None, now: float) -> None:
        """A sibling serves `study` too: write what is held back of it, and hold nothing of it back."""
        if study is None:
            return
        self._shared[study] = now + WANT_FOR
        if len(self._shared) > 10_000:
            self._shared = {s: until for s, until in self._shared.items() if until >= now}
        for seq, item in list(self._later.items()):
            if item.study == study:
                self._promote(seq, "wanted")

    def alias(self, token: bytes, study: str | None) -> None:
        """A sibling that wants `token` (a retrieve's scope) wants all of `study`; None: no longer."""
        if study is None:
            self._aliases.pop(token, None)
        else:
            self._aliases[token] = study

    def drop(self, study: str | None) -> int:
        """A purge: frames of `study` (every frame, for None) not written yet will not be; how many."""
        dropped = 0
        for seq, item in list(self._later.items()):
            if study is None or item.study == study:
                self._forget(seq)
                dropped += len(item.frames)
                _settle(item.done, [None] * len(item.frames), None)
        with self._lock:
            waiting = [q for q in self._now if study is None or q[1] == study]
            self._now = [q for q in self._now if not (study is None or q[1] == study)]
        for frames, _, done, _ in waiting:
            dropped += len(frames)
            _settle(done, [None] * len(frames), None)
        self._gauge()
        return dropped

    def close(self) -> None:
        """Write what is deferred, finish what is queued, stop the thread (the worker stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop to report to: nothing was deferred through write_soon anyway
            pass
        else:
            for seq in list(self._later):
                self._promote(seq, "stop")
            self._gauge()
        self.thread.shutdown(wait=True)

    # -- the queues ------------------------------------------------------------------------------

    def _forget(self, seq: int) -> _Deferred | None:
        item = self._later.pop(seq, None)
        if item is None:
            return None
        self._later_bytes -= item.size
        if item.token is not None:
            seqs = self._tokens.get(item.token, [])
            if seq in seqs:
                seqs.remove(seq)
            if not seqs:
                self._tokens.pop(item.token, None)
        return item

    def _promote(self, seq: int, why: str, front: bool = False) -> asyncio.Future[Written] | None:
        item = self._forget(seq)
        if item is None:
            return None
        metrics.child(metrics.CACHE_DEFERRED_WRITES, why).inc(len(item.frames))
        self._queue(self._now, (item.frames, item.study, item.done, item.token), front)
        return item.done

    def _gauge(self) -> None:
        metrics.CACHE_DEFERRED_BYTES.set(self._later_bytes)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Look again when the worker may have become quiet, or the oldest frame's wait ends."""
        if self._timer is not None or not self._later:
            return
        wait = max(QUIET - self.activity.quiet_for(), QUIET / 4)
        wait = min(wait, next(iter(self._later.values())).until - time.monotonic())
        self._timer = loop.call_later(max(wait, 0.0), self._look)

    def _look(self) -> None:
        self._timer = None
        now = time.monotonic()
        for seq, item in list(self._later.items()):
            if item.until > now:
                break
            self._promote(seq, "waited")
        if self._later and not self._pacing and self.activity.quiet_for() >= QUIET:
            # Quiet: one batch now, and another once it is written if it is still quiet then.
            size, last = 0, None
            for seq, item in list(self._later.items()):
                if size and size + len(item.frames) > BATCH:
                    break
                size += len(item.frames)
                last = self._promote(seq, "quiet")
            if last is not None:
                self._pacing = True
                last.add_done_callback(self._paced)
        self._gauge()
        self._arm(asyncio.get_running_loop())

    def _paced(self, _: asyncio.Future[Written]) -> None:
        self._pacing = False
        if self._later:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._look()

    def _queue(self, queue: list[Any], item: Any, front: bool = False) -> None:
        """Queue work for the writer thread; start it draining unless it is at it already."""
        with self._lock:
            if front:
                queue.insert(0, item)
            else:
                queue.append(item)
            start, self._draining = not self._draining, True
        if start:
            self.thread.submit(self._drain, asyncio.get_running_loop())

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Writer thread: the writes asked for first, then the queued frames, a batch per transaction;
        tell the loop as each is done."""
        while True:
            with self._lock:
                first, self._first = self._first, []
                batch: list[_Queued] = []
                size = 0
                while self._now and (size == 0 or size + len(self._now[0][0]) <= BATCH):
                    size += len(self._now[0][0])
                    batch.append(self._now.pop(0))
                if not batch and not first:
                    self._draining = False
                    return
            for fn, args, waiter in first:
                try:
                    outcome: tuple[Any, BaseException | None] = (fn(*args), None)
                except Exception as exc:
                    outcome = (None, exc)
                _tell(loop, waiter, *outcome)
            if not batch:
                continue
            try:
                results = self._commit([(frames, study) for frames, study, _, _ in batch], lambda: bool(self._first))
            except Exception as exc:  # whatever the disk tier raised, the writer goes on with the next batch
                log.exception("cache writer: a batch of frames was not written")
                for _, _, done, _ in batch:
                    _tell(loop, done, None, exc)
                continue
            if len(results) < len(batch):  # a write a client waits for came in: it goes next
                with self._lock:
                    self._now[:0] = batch[len(results):]
                batch = batch[:len(results)]
            for (_, _, done, _), written in zip(batch, results, strict=True):
                _tell(loop, done, written, None)


def _tell(loop: asyncio.AbstractEventLoop, done: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    try:
        loop.call_soon_threadsafe(_settle, done, result, exc)
    except RuntimeError:  # the loop closed (shutdown): what was written is on disk all the same
        pass


def _settle(done: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if not done.done():
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)
