"""The optional shared tier (Redis): what one replica learns about study locations and searches, all know.

Each process keeps its own in-memory tables in front; Redis is asked only on a local miss, so a local
hit makes no round trip. Keys hold digests, never UIDs or queries; values are archive names and search
answers. A store through any replica bumps the search generation (older shared answers stop counting)
and tells every replica, over pub/sub, to drop its local search answers and where the stored studies are.

Redis down or slow never fails a request: every call has a short deadline, and after a failure the
process leaves Redis alone for `RETRY_AFTER` seconds and runs on its local tables, with a warning in
the log (at most one a minute) and `dicomweb_edge_shared_fallbacks_total` counting what was skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from proxy.observability import metrics

log = logging.getLogger("dicomweb_edge.shared")
T = TypeVar("T")
RETRY_AFTER = 2.0  # seconds without Redis after a failure
WARN_EVERY = 60.0  # seconds between two warnings about Redis
_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError)
try:  # the `redis` extra: without it the shared tier cannot be configured (config.validate says so)
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError, RedisError

    _ERRORS = (RedisError, OSError, TimeoutError)
except ImportError:  # pragma: no cover - checked by config validation
    aioredis = None  # type: ignore[assignment]


def available() -> bool:
    """Whether the redis client library is installed."""
    return aioredis is not None


def digest(text: str) -> str:
    """A short, stable digest: what a Redis key holds instead of a UID or a query."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class SharedStore:
    """Study locations and search answers in Redis, with a search generation and an event channel."""

    def __init__(self, url: str, prefix: str = "dicomweb-edge:", timeout: float = 0.25) -> None:
        if aioredis is None:
            raise RuntimeError("the shared tier needs the redis package: pip install 'dicomweb-edge[redis]'")
        self.url, self.prefix, self.timeout = url, prefix, timeout
        self.node = secrets.token_hex(8)  # this process, named in its events (for debugging)
        # One immediate retry on a broken connection (a pooled one from before a Redis restart), none on
        # a timeout: a slow Redis costs a request at most `timeout` per call.
        self._client = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                         retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)))
        self._gen_key = prefix + "search-gen"
        self.channel = prefix + "events"
        self._down_until = 0.0
        self._warned = 0.0

    def _loc(self, study: str) -> str:
        return f"{self.prefix}loc:{digest(study)}"

    def _search(self, key: str) -> str:
        return f"{self.prefix}search:{key}"

    async def _run(self, operation: str, call: Callable[[Any], Awaitable[T]]) -> T | None:
        """`call(client)` within the deadline, or None (counted, logged) when Redis is failing."""
        if time.monotonic() < self._down_until:
            metrics.child(metrics.SHARED_FALLBACKS, operation).inc()
            return None
        try:
            async with asyncio.timeout(self.timeout * 4):
                return await call(self._client)
        except _ERRORS as exc:
            self.failed(operation, exc)
            return None

    def failed(self, operation: str, exc: BaseException) -> None:
        """Note a Redis failure: leave it alone a while, count it, warn now and then."""
        self._down_until = time.monotonic() + RETRY_AFTER
        metrics.child(metrics.SHARED_FALLBACKS, operation).inc()
        if time.monotonic() - self._warned >= WARN_EVERY:
            self._warned = time.monotonic()
            log.warning("shared tier (Redis) unavailable, running on local state: %s: %s",
                        type(exc).__name__, str(exc)[:200])

    async def locations(self, study: str) -> tuple[tuple[str, ...], float] | None:
        """The archives Redis says hold `study` and the seconds that entry has left, or None."""
        key = self._loc(study)

        async def read(r: Any) -> tuple[tuple[str, ...], float] | None:
            async with r.pipeline(transaction=False) as p:
                names, ttl = await p.smembers(key).pttl(key).execute()
            return (tuple(sorted(n.decode() for n in names)), ttl / 1000) if names and ttl > 0 else None

        found = await self._run("locate", read)
        metrics.child(metrics.SHARED_LOOKUPS, "locator", "miss" if found is None else "hit").inc()
        return found

    async def remember(self, studies: Mapping[str, tuple[str, ...]], ttl: float, replace: bool = False) -> None:
        """Add (or with `replace`, set) the archives holding each study, for `ttl` seconds."""
        if not studies:
            return

        async def write(r: Any) -> None:
            async with r.pipeline(transaction=False) as p:
                for study, names in studies.items():
                    key = self._loc(study)
                    if replace:
                        p.delete(key)
                    p.sadd(key, *names).pexpire(key, max(1, int(ttl * 1000)))
                await p.execute()

        await self._run("learn", write)

    async def forget(self, study: str) -> None:
        """Drop what Redis says about `study`."""
        await self._run("forget", lambda r: r.delete(self._loc(study)))

    async def search_get(self, key: str) -> tuple[bytes | None, int | None, float]:
        """(the shared answer of this generation or None, the current generation, seconds it has left)."""
        rkey = self._search(key)

        async def read(r: Any) -> tuple[bytes | None, int, float]:
            async with r.pipeline(transaction=False) as p:
                gen, entry, ttl = await p.get(self._gen_key).get(rkey).pttl(rkey).execute()
            current = int(gen or 0)
            if entry is None or ttl <= 0:
                return None, current, 0.0
            tag, _, blob = entry.partition(b"\n")
            return (blob, current, ttl / 1000) if tag == str(current).encode() else (None, current, 0.0)

        found = await self._run("search_get", read)
        blob, gen, ttl = found if found is not None else (None, None, 0.0)
        metrics.child(metrics.SHARED_LOOKUPS, "search", "miss" if blob is None else "hit").inc()
        return blob, gen, ttl

    async def search_put(self, key: str, blob: bytes, generation: int, ttl: float) -> None:
        """Share an answer computed while `generation` was current (a later store makes it stale)."""
        value = str(generation).encode() + b"\n" + blob
        await self._run("search_put", lambda r: r.set(self._search(key), value, px=max(1, int(ttl * 1000))))

    async def stored(self, studies: Mapping[str, str]) -> None:
        """A store went through this process: stale every shared search answer and tell the others."""
        event = json.dumps({"node": self.node, "stored": {digest(s): a for s, a in studies.items()}})

        async def write(r: Any) -> None:
            async with r.pipeline(transaction=False) as p:
                await p.incr(self._gen_key).publish(self.channel, event).execute()

        await self._run("invalidate", write)

    async def listen(self, on_event: Callable[[dict[str, str]], None], on_connect: Callable[[], None]) -> None:
        """Apply other processes' store events until cancelled, reconnecting after failures.

        `on_event` gets {study digest: archive}; `on_connect` runs on every (re)subscription, since
        events sent while this process was not listening are lost.
        """
        while True:
            client = aioredis.from_url(self.url, socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0))
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self.timeout * 4):
                    await pubsub.subscribe(self.channel)
                on_connect()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        event = json.loads(message["data"])
                    except (ValueError, TypeError):
                        continue
                    # Its own events too: a store through /upstreams/{name} cleared only that URL space here.
                    if isinstance(event, dict) and isinstance(event.get("stored"), dict):
                        on_event({str(k): str(v) for k, v in event["stored"].items()})
            except _ERRORS as exc:
                self.failed("subscribe", exc)
            finally:
                try:
                    await pubsub.aclose()
                    await client.aclose()
                except _ERRORS:
                    pass
            await asyncio.sleep(RETRY_AFTER)

    async def close(self) -> None:
        """Release the connections."""
        try:
            await self._client.aclose()
        except _ERRORS:
            pass
