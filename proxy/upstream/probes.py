"""Archive health probes: one worker of a process group asks each archive, every worker learns the answer.

Each archive is probed every `health_interval` seconds (its own, or the server-wide one; 0: never) with
the cheapest request its profile allows (`Profile.probe`). A probe's answer feeds the archive's circuit
breaker, its `up` (which `/readyz` reports: `/readyz` itself never sends an archive a request) and the
`archive_up` gauge. An archive whose breaker is open is not asked until its cool-down is over.

With several workers, the CLI hands them one run directory (`RUN_DIR_ENV`). Only the worker holding the
probe lock (`flock` on `probes.lock` there) sends probes; it writes each answer to `health.json`, and
every other worker applies the answers it has not seen yet, as if it had asked itself. The kernel drops
the lock of a worker that dies, and another worker takes it on its next tick. So 8 replicas of 2 workers
probing every 5 s send each archive 8 probes per 5 s (about 138,000 a day), not 16 plus one per `/readyz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time

from proxy.observability import metrics
from proxy.upstream.archive import STATE_VALUE, Archive

RUN_DIR_ENV = "DICOMWEB_EDGE_RUN_DIR"  # a directory private to one process group (the CLI's workers)
_LOCK, _ANSWERS = "probes.lock", "health.json"
SHORTEST_TICK = 0.05  # seconds: how often a worker looks at the shared answers, at most


class Probes:
    """The health probes of one worker's archives (made by the composition root; `run` is its loop)."""

    def __init__(self, archives: list[Archive], interval: float, run_dir: str | None = None) -> None:
        self.archives = archives
        self.every = {a.name: interval if a.config.health_interval is None else a.config.health_interval
                      for a in archives}
        self.run_dir = run_dir
        self._due = {a.name: 0.0 for a in archives}  # monotonic time of the next probe
        self._answers: dict[str, tuple[bool, bool, float]] = {}  # name -> (up, asked, wall time)
        self._seen: dict[str, float] = {}  # name -> wall time of the answer last applied here
        self._lock: int | None = None

    @property
    def enabled(self) -> bool:
        """Whether any archive is probed at all."""
        return any(every > 0 for every in self.every.values())

    async def run(self) -> None:
        """Probe (when this worker leads) and learn the answers, until cancelled."""
        # A follower looks at the shared answers twice an interval; the leader wakes when a probe is due.
        tick = max(SHORTEST_TICK, min((e for e in self.every.values() if e > 0), default=1.0) / 2)
        try:
            while True:
                if self.leads():
                    await self.probe_due()
                    wait = min(self._due[n] for n, e in self.every.items() if e > 0) - time.monotonic()
                    await asyncio.sleep(max(SHORTEST_TICK, wait))
                else:
                    self.learn()
                    await asyncio.sleep(tick)
        finally:
            self.close()

    def leads(self) -> bool:
        """Whether this worker sends the probes: always alone; with siblings, while it holds the lock."""
        if self.run_dir is None or self._lock is not None:
            return True
        fd = os.open(os.path.join(self.run_dir, _LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock = fd
        return True

    async def probe_due(self) -> list[Archive]:
        """Probe the archives whose interval has passed; their answers applied here and shared."""
        now = time.monotonic()
        due = [a for a in self.archives if self.every[a.name] > 0 and self._due[a.name] <= now]
        asked = [a.breaker.allow() for a in due]
        answers = await asyncio.gather(*(a.probe() if ask else _false() for a, ask in zip(due, asked, strict=True)))
        for archive, ask, up in zip(due, asked, answers, strict=True):
            self._due[archive.name] = now + self.every[archive.name]
            self._answers[archive.name] = (up, ask, time.time())
            _show(archive, up)  # the probe itself fed the breaker (Archive.open)
        if due and self.run_dir is not None:
            path = os.path.join(self.run_dir, _ANSWERS)
            with open(path + ".new", "w") as out:
                json.dump(self._answers, out)
            os.replace(path + ".new", path)
        return due

    def learn(self) -> None:
        """Apply the answers the leading worker shared since the last look."""
        try:
            with open(os.path.join(self.run_dir or "", _ANSWERS)) as shared:
                answers = json.load(shared)
        except (OSError, ValueError):
            return  # none yet, or being replaced: the next tick looks again
        for archive in self.archives:
            up, asked, at = answers.get(archive.name, (None, False, 0.0))
            if up is None or at <= self._seen.get(archive.name, 0.0):
                continue
            self._seen[archive.name] = at
            if asked:
                archive.report_health(bool(up))
            _show(archive, bool(up))

    def close(self) -> None:
        """Let another worker lead."""
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock)
            self._lock = None


async def _false() -> bool:
    return False


def _show(archive: Archive, up: bool) -> None:
    archive.up = up
    metrics.child(metrics.ARCHIVE_UP, archive.name).set(1 if up else 0)
    metrics.child(metrics.ARCHIVE_BREAKER, archive.name).set(STATE_VALUE[archive.breaker.state])
