"""Sibling workers: the processes that share one cache directory tell each other what is in flight.

This is the cross-process half of flights.py (the one way fetches are collapsed), which alone uses it:
a worker's own table of flights only knows that worker's fetches. With
`--workers 2`, a prefetch running in one worker would not stop the other from asking the archive for
every frame of the same series. So a worker that starts fetching something *announces* it, and *settles*
it once the bytes are on the shared disk tier (or the fetch gave up); a sibling that misses waits for
the settle instead of going upstream, then reads the disk tier; a settle may carry the status the
archive refused the fetch with (a 404, a 502), and then that is the waiting sibling's answer too. A
worker writes what it serves from memory to disk when it is quiet (cache/writer.py), so a sibling that
starts waiting says it *wants* the key: whoever holds it writes it next.

A fetch is also *claimed* (`claim`): this worker binds an abstract socket named after the key, which
no other process can bind while it is held. Messages take a moment to arrive; the claim is seen by every
worker at once, so two workers missing the same frame in the same instant do not both ask the archive:
the one that fails to claim waits for the other's settle. The kernel releases the name of a worker that
dies, so a claim never outlives its holder.

Transport: one Unix datagram socket per worker in the abstract namespace (Linux), named after the cache
directory and the pid; siblings are found in /proc/net/unix. Messages name keys by a 12-byte digest,
never by UID. It is best-effort by design: a message that cannot be delivered, a sibling that died, or
a platform without abstract sockets only costs the duplicate upstream request we would have made anyway
(a waiter never waits past its own timeout, and a vanished sibling's announcements are dropped).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator

from proxy.errors import Problem

log = logging.getLogger("dicomweb_edge.siblings")
_ANNOUNCE, _SETTLE, _FAILED, _HELLO, _WANT, _YIELD = b"A", b"S", b"F", b"H", b"W", b"Y"
_DIGEST = 12
_STATUS = 2  # a failed settle carries the HTTP status its followers answer with (big-endian)
DATAGRAM = 60_000  # bytes of whole messages per datagram at most
MAX_FLIGHT = 120.0  # seconds an announcement counts without its settle
REFRESH = 1.0  # seconds between two looks for siblings
REFRESH_ALONE = 0.05  # the same while none was found (workers start together)
MAX_CLAIMS = 1024  # claims (one descriptor each) a worker holds at most; beyond, fetches go unclaimed


def _claims_allowed() -> int:
    """MAX_CLAIMS, or an eighth of the descriptors this process may open if that is less: claims must
    never keep a worker from accepting connections."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_CLAIMS
    return MAX_CLAIMS if soft == resource.RLIM_INFINITY else max(0, min(MAX_CLAIMS, soft // 8))


def digest(key: str) -> bytes:
    """What a message carries instead of the key (keys hold UIDs)."""
    return hashlib.blake2b(key.encode(), digest_size=_DIGEST).digest()


class Siblings:
    """This worker's end of the channel between the workers sharing `cache_dir`."""

    def __init__(self, cache_dir: str, ident: str | None = None) -> None:
        tag = hashlib.blake2b(os.path.realpath(cache_dir).encode(), digest_size=8).hexdigest()
        self.prefix = f"dicomweb-edge/{tag}/"
        self.name = f"{self.prefix}{ident or os.getpid()}"
        self.claim_prefix = f"dicomweb-edge-claim/{tag}/"  # (not under `prefix`: claims are not workers)
        self._claims: dict[bytes, socket.socket] = {}  # digest → the bound socket that holds the claim
        self.max_claims = _claims_allowed()
        self.sock: socket.socket | None = None
        self.peers: list[str] = []
        self._looked = -REFRESH
        self._outbox: list[bytes] = []
        self._flushing = False
        self._announced: dict[bytes, tuple[str, float]] = {}  # digest → (announcing sibling, until)
        self._waiters: dict[bytes, asyncio.Future[None]] = {}  # done; or failed with the leader's status
        self._mine: set[bytes] = set()  # announced here, not settled yet: told again to a newcomer
        self.on_want: Callable[[bytes], None] | None = None  # a sibling waits for this digest's key
        self.on_yield: Callable[[bytes], None] | None = None  # a sibling's client fetches what this key names

    def start(self) -> bool:
        """Open the socket and listen (from the app's lifespan); False where the platform cannot."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind("\0" + self.name)
            sock.setblocking(False)
        except OSError as exc:
            log.info("sibling channel unavailable (%s): workers coordinate only within themselves", exc)
            return False
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._receive)
        # Workers start together: whoever binds later finds the earlier ones and says hello, so that
        # they know it at once rather than at their next look (a viewer may be served within that second).
        self._looked = -REFRESH
        if self._peers():
            self._send(_HELLO + bytes(_DIGEST))
        return True

    def close(self) -> None:
        """Stop listening; waiters are released (they will find a miss and fetch for themselves)."""
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for held in self._claims.values():
            held.close()
        self._claims.clear()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    # -- this worker's fetches -------------------------------------------------------------------

    def announce(self, key: str) -> None:
        """This worker starts fetching `key`."""
        if self.sock is not None:
            d = digest(key)
            self._mine.add(d)
            self._send(_ANNOUNCE + d)

    def settle(self, key: str, failure: int | None = None) -> None:
        """What this worker fetched is on the disk tier now, or will not be (its claim, if any, ends).
        `failure`: the archive's answer was this status, which the siblings waiting for it answer too."""
        if self.sock is not None:
            d = digest(key)
            self._mine.discard(d)
            self._unclaim(d)
            self._send(_SETTLE + d if failure is None else _FAILED + d + failure.to_bytes(_STATUS, "big"))

    def claim(self, keys: list[str]) -> bool:
        """Claim the fetch of every key for this worker, atomically across processes: False, holding none
        of them, when a sibling holds one (it fetches it now; `flying` waits for it). A claim ends with
        the key's settle. Where a claim cannot be made (no abstract sockets, too many held), the fetch
        goes ahead unclaimed, as before claims existed. Alone, nothing is claimed: a sibling that starts
        meanwhile hears of this worker's fetches from their announcements (its hello)."""
        if self.sock is None or not self._peers():
            return True
        taken: list[bytes] = []
        for key in keys:
            d = digest(key)
            if d in self._claims:
                continue
            if self._bind_claim(d) is False:  # a sibling holds it
                for t in taken:
                    self._unclaim(t)
                return False
            taken.append(d)
        return True

    def _bind_claim(self, d: bytes, hold: bool = True) -> bool | None:
        """Bind the claim of digest `d`: True (held, or released again unless `hold`), False when another
        process holds it, None when no claim can be made."""
        if len(self._claims) >= self.max_claims:
            return None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            sock.bind("\0" + self.claim_prefix + d.hex())
        except OSError as exc:
            sock.close()
            return False if exc.errno == errno.EADDRINUSE else None
        if hold:
            self._claims[d] = sock
        else:
            sock.close()
        return True

    def _unclaim(self, d: bytes) -> None:
        held = self._claims.pop(d, None)
        if held is not None:
            held.close()

    def ask_to_yield(self, key: str) -> None:
        """A client of this worker fetches what `key` names: a sibling doing the same in the background
        (a prefetch) may stop."""
        if self.sock is not None:
            self._send(_YIELD + digest(key))

    # -- the siblings' fetches -------------------------------------------------------------------

    def flying(self, key: str, want: bool = True) -> asyncio.Future[None] | None:
        """Done when the sibling fetching `key` settles it; None when no sibling is fetching it (none
        announced it, and none holds its claim: its announcement may still be on its way). `want`:
        say that this worker waits for it (the sibling writes it to disk next; see `want`)."""
        d = digest(key)
        found = self._announced.get(d)
        if found is None:
            if d in self._claims or not self._peers() or self._bind_claim(d, hold=False) is not False:
                return None
            return self._waiter(d, want)
        if found[1] < time.monotonic() or found[0] not in self._peers():
            self._release(d)
            return None
        return self._waiter(d, want)

    def landing(self, key: str, want: bool = True) -> asyncio.Future[None]:
        """Done when any sibling settles `key` (whether or not it was announced)."""
        return self._waiter(digest(key), want)

    def want(self, keys: list[str]) -> None:
        """Tell the siblings this worker waits for `keys` on disk: whoever holds them back writes them next
        (when a hand-over, which needs no disk, did not bring them)."""
        for key in keys:
            self._send(_WANT + digest(key))

    def peers_now(self) -> list[str]:
        """The other workers on this cache directory, as last looked up (at most once a second)."""
        return self._peers()

    def holders(self, keys: list[str]) -> list[str]:
        """The siblings that announced any of `keys`; all of them when none did (a claim seen before its
        announcement names nobody)."""
        now = time.monotonic()
        named = {found[0] for key in keys if (found := self._announced.get(digest(key))) and found[1] >= now}
        peers = self._peers()
        return [p for p in peers if p in named] or list(peers)

    def _waiter(self, d: bytes, want: bool = True) -> asyncio.Future[None]:
        fut = self._waiters.get(d)
        if fut is None or fut.done():
            fut = self._waiters[d] = asyncio.get_running_loop().create_future()
            if want:
                self._send(_WANT + d)  # whoever has it deferred writes it next
        return fut

    def _release(self, d: bytes, failure: int | None = None) -> None:
        self._announced.pop(d, None)
        fut = self._waiters.pop(d, None)
        if fut is None or fut.done():
            return
        if failure is None:
            fut.set_result(None)
        else:
            fut.set_exception(Problem(failure, f"the archive answered {failure} to the same request in another "
                                               "worker of this proxy a moment ago"))
            fut.add_done_callback(lambda f: f.exception())  # (retrieved: no warning when nobody waits any more)

    def _receive(self) -> None:
        assert self.sock is not None
        now = time.monotonic()
        while True:
            try:
                data, sender = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            peer = sender[1:].decode("latin-1", "replace") if isinstance(sender, bytes) else str(sender)[1:]
            if peer not in self.peers and peer != self.name:
                self.peers.append(peer)  # a worker started since we last looked
            for kind, d, status in _messages(data):
                if kind == _ANNOUNCE:
                    self._announced[d] = (peer, now + MAX_FLIGHT)
                elif kind in (_SETTLE, _FAILED):
                    self._release(d, status)
                elif kind in (_WANT, _YIELD):
                    handler = self.on_want if kind == _WANT else self.on_yield
                    try:
                        if handler is not None:
                            handler(d)
                    except Exception:  # the channel outlives a fault in what a message sets off
                        log.exception("a sibling's message could not be handled")
                elif kind == _HELLO and self._mine:  # a worker that started after our announcements
                    self._tell(peer, [_ANNOUNCE + m for m in self._mine])
        if len(self._announced) > 10_000:
            for d in [d for d, (_, until) in self._announced.items() if until < now]:
                self._release(d)

    # -- delivery --------------------------------------------------------------------------------

    def _peers(self) -> list[str]:
        """The other workers on this cache directory (looked up at most once a second)."""
        now = time.monotonic()
        if now - self._looked >= (REFRESH if self.peers else REFRESH_ALONE):
            self._looked = now
            try:
                with open("/proc/net/unix", "rb") as f:
                    names = [line.rsplit(b" ", 1)[-1].strip() for line in f]
                found = [n[1:].decode() for n in names if n.startswith(b"@" + self.prefix.encode())]
            except OSError:
                found = []
            self.peers = [n for n in found if n != self.name]
        return self.peers

    def _send(self, message: bytes) -> None:
        """Queue a message; all queued in one turn of the loop go out as one datagram per sibling."""
        self._outbox.append(message)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if self.sock is None or not self._outbox:
            return
        messages, self._outbox = self._outbox, []
        for peer in self._peers():
            self._tell(peer, messages)

    def _tell(self, peer: str, messages: list[bytes]) -> None:
        assert self.sock is not None
        for datagram in _datagrams(messages):
            try:
                self.sock.sendto(datagram, "\0" + peer)
            except BlockingIOError:  # the sibling is behind: it will time out and fetch for itself
                log.debug("sibling queue full, message dropped")
            except OSError:  # gone since we looked
                self._looked = -REFRESH


def _messages(data: bytes) -> Iterator[tuple[bytes, bytes, int | None]]:
    """(kind, digest, status of a failed settle) of each whole message in a datagram."""
    at = 0
    while at + 1 + _DIGEST <= len(data):
        kind, d = data[at : at + 1], data[at + 1 : at + 1 + _DIGEST]
        at += 1 + _DIGEST
        status = None
        if kind == _FAILED:
            if at + _STATUS > len(data):
                return
            status = int.from_bytes(data[at : at + _STATUS], "big")
            at += _STATUS
        yield kind, d, status


def _datagrams(messages: list[bytes]) -> Iterator[bytes]:
    """The messages joined into datagrams of at most DATAGRAM bytes, none cut in two."""
    batch: list[bytes] = []
    size = 0
    for message in messages:
        if size + len(message) > DATAGRAM and batch:
            yield b"".join(batch)
            batch, size = [], 0
        batch.append(message)
        size += len(message)
    if batch:
        yield b"".join(batch)


def workers_on(cache_dir: str) -> int:
    """How many worker processes serve `cache_dir` now (their channels in /proc/net/unix; 0 where there
    is no such table)."""
    return len(Siblings(cache_dir, ident="probe")._peers())
