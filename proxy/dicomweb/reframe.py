"""Re-framing an archive's multipart answer as ours: the proxy's boundary, part headers and URLs.

Each archive part becomes a part under the proxy's boundary with a truthful `Content-Type`
(a DICOM part without `transfer-syntax=` is labelled from its File Meta), a `Content-Location` that
points at the proxy, and the payload passed on as the slices the parser produced. Parts from several
archives can share one response (a study split across archives): an instance already sent is
skipped, recognised by the SOP Instance UID in its File Meta.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from itertools import islice

from proxy.errors import StreamAborted
from proxy.formats import part10
from proxy.formats.media import ANY_TS, Selection, parse_content_type
from proxy.formats.multipart import Event, MultipartError, MultipartWriter, PartEnd, PartHeaders
from proxy.upstream.archive import Archive, UpstreamError
from proxy.upstream.parts import TEE_LIMIT, Held, Keep, Kept, PartEvents, part_payload
from proxy.upstream.splice import MIN_RELAY, Relay


@dataclass
class PartOut:
    """A part ready to go out: its content type, read-ahead payload, and whether to drop it."""

    content_type: str
    location: str | None
    length: int | None
    held: list[Event] = field(default_factory=list)  # payload read ahead; may end with PartEnd
    skip: bool = False


async def label(events: PartEvents, headers: PartHeaders, sel: Selection,
                seen: set[str] | None = None) -> PartOut:
    """Read just enough of a part to label it truthfully (and to recognise a duplicate instance)."""
    ctype = headers.headers.get("content-type", sel.media_type)
    mtype, params = parse_content_type(ctype)
    ts = params.get("transfer-syntax")
    held: list[Event] = []
    skip = False
    if mtype == "application/dicom" and (not ts or seen is not None):
        head = b""
        while True:
            ev = await events.next()
            if ev is None:
                break
            held.append(ev)
            if isinstance(ev, PartEnd | PartHeaders):
                break
            small = bytes(ev[:4096])  # the File Meta is small: look at the start of the piece first
            meta = part10.file_meta(head + small)
            if meta == part10.NEED_MORE and len(ev) > len(small):
                small = bytes(ev[: part10.MAX_META - len(head)])  # rare: a long File Meta
                meta = part10.file_meta(head + small)
            head += small
            if meta != part10.NEED_MORE:
                if isinstance(meta, dict):
                    ts = ts or meta.get("ts")
                    sop = meta.get("sop")
                    if seen is not None and sop:
                        skip = sop in seen
                        seen.add(sop)
                break
    return _part_out(headers, mtype, ts, sel, held, skip)


def _part_out(headers: PartHeaders, mtype: str, ts: str | None, sel: Selection, held: list[Event],
              skip: bool) -> PartOut:
    if not mtype:
        mtype = sel.media_type
    if ts is None and sel.transfer_syntax not in (None, ANY_TS):
        ts = sel.transfer_syntax
    length = headers.headers.get("content-length")
    return PartOut(f"{mtype}; transfer-syntax={ts}" if ts else mtype, headers.headers.get("content-location"),
                   int(length) if length and length.isdigit() else None, held, skip)


def label_now(headers: PartHeaders, first: bytes | memoryview, sel: Selection,
              seen: set[str] | None) -> PartOut | None:
    """`label` for a part whose first payload piece is at hand: None when that piece does not hold the
    whole File Meta, or when the part repeats an instance already sent (then `label` deals with it)."""
    mtype, params = parse_content_type(headers.headers.get("content-type", sel.media_type))
    ts = params.get("transfer-syntax")
    if mtype == "application/dicom" and (not ts or seen is not None):
        meta = part10.file_meta(bytes(first[:4096]))
        if meta == part10.NEED_MORE:
            return None
        if isinstance(meta, dict):
            ts = ts or meta.get("ts")
            sop = meta.get("sop")
            if seen is not None and sop:
                if sop in seen:
                    return None
                seen.add(sop)
    return _part_out(headers, mtype, ts, sel, [], False)


class Reframer:
    """Writes parts from one or more archives under one boundary."""

    def __init__(self, sel: Selection, base: str, locations: list[str] | None = None,
                 dedupe: bool = False) -> None:
        self.writer = MultipartWriter()
        self.sel = sel
        self.base = base
        self.locations = locations
        self.seen: set[str] | None = set() if dedupe else None
        self.count = 0
        # Called with (content type, payload pieces) for every complete part that was sent, when set
        # (the frame cache learns frames from instances passing through); parts larger than
        # `tee_limit` are not collected.
        self.tee: Keep | None = None
        self.tee_limit = TEE_LIMIT
        # Payloads nothing collects may be relayed past Python (splice.py) when the server offers it.
        self.relay = False

    def header(self, part: PartOut, archive: Archive) -> bytes:
        """Our delimiter and headers for `part`."""
        loc = part.location
        if loc:  # the archive's own URL, pointed at the proxy; any other location is not passed on (SSRF)
            rest = archive.rewriter.archive_path(loc)
            loc = None if rest is None else self.base + archive.rewriter.proxy_path(rest)
        if not loc and self.locations and self.count < len(self.locations):
            loc = self.locations[self.count]
        self.count += 1
        return self.writer.part(part.content_type, loc, part.length)

    async def parts(self, events: PartEvents, first: PartOut | None, max_parts: int | None = None,
                    first_header: bytes | None = None) -> AsyncIterator[bytes | memoryview | Relay]:
        """Every part of one archive response, re-framed; StreamAborted if the body breaks."""
        archive = events.archive
        part = first
        sent = 0
        try:
            while part is not None:
                head = None
                if not part.skip:
                    head = first_header if first_header is not None and sent == 0 else self.header(part, archive)
                sent += 1
                if head is not None and self.relay and self.tee is None:
                    follow = self.chained(events, archive) if max_parts is None else None
                    async for piece in _relayed(events, part, head, follow):
                        yield piece
                    part = await self._next_part(events, sent, max_parts)
                    continue
                if head is not None:
                    yield head
                kept = Held(self.tee_limit) if self.tee is not None and not part.skip else None
                async for piece in part_payload(events, part.held, kept):
                    if not part.skip:
                        yield piece
                if kept is not None and kept.pieces is not None and self.tee is not None:
                    self.tee(part.content_type, kept.pieces, archive.audience)
                part = await self._next_part(events, sent, max_parts)
        except (MultipartError, UpstreamError) as exc:
            raise StreamAborted(f"archive '{archive.name}': {exc}") from None

    def chained(self, events: PartEvents, archive: Archive) -> Callable[[Relay], Relay | None]:
        """What the server calls when a relay was sent whole, to go on with the next part at once.

        It makes the next part's relay when everything that takes is already received (the delimiter,
        the part's headers and the start of its payload, which the connection reads as soon as a relay
        ends): then the server moves part after part without coming back through the response's
        generators. Anything else (a part that is short, a duplicate, headers not yet complete, the end
        of the body) returns None, and `parts` goes on from exactly there.
        """
        def follow(prev: Relay) -> Relay | None:
            try:
                events.relayed(prev)
                events.take_ready()
            except (MultipartError, UpstreamError) as exc:  # raised where `parts` resumes, as its own would be
                events.broken = exc
                return None
            pending = events.pending
            left = events.reader.counted_left()
            if left is None or left < MIN_RELAY or len(pending) < 3 or not isinstance(pending[0], PartEnd) \
                    or not isinstance(pending[1], PartHeaders) \
                    or any(isinstance(ev, PartEnd | PartHeaders) for ev in islice(pending, 2, None)):
                return None
            part = label_now(pending[1], pending[2], self.sel, self.seen)  # type: ignore[arg-type]
            if part is None or part.length is None:
                return None
            relay = events.resp.relay(left, prev.pipe)
            if relay is None:
                return None
            pending.popleft()
            pending.popleft()
            prefix: list[bytes | memoryview] = [self.header(part, archive)]
            while pending:
                prefix.append(pending.popleft())  # type: ignore[arg-type]
            relay.prepend(prefix, sum(len(p) for p in prefix))
            relay.follow = follow
            return relay
        return follow

    async def _next_part(self, events: PartEvents, sent: int, max_parts: int | None) -> PartOut | None:
        """The next part of the archive's body, labelled; None at its end (or after `max_parts`)."""
        if max_parts is not None and sent >= max_parts:
            return None
        nxt = await events.next_headers()
        return None if nxt is None else await label(events, nxt, self.sel, self.seen)

    def close(self) -> bytes:
        """The closing delimiter."""
        return self.writer.close()


async def _relayed(events: PartEvents, part: PartOut, head: bytes,
                   follow: Callable[[Relay], Relay | None] | None) -> AsyncIterator[bytes | memoryview | Relay]:
    """One part, its payload relayed past Python where it can be (splice.py). What is already at hand
    (our part header, the payload the parser has seen) goes out with the relay, in one message."""
    prefix: list[bytes | memoryview] = [head]
    size = len(head)
    ev: Event | None
    for ev in part.held:
        if isinstance(ev, PartEnd | PartHeaders):
            for piece in prefix:
                yield piece
            return
        prefix.append(ev)
        size += len(ev)
    while True:
        relay = events.relay()
        if relay is not None:
            relay.prepend(prefix, size)
            relay.follow = follow
            prefix, size = [], 0
            yield relay
            events.relayed(relay)
            continue
        ev = await events.next()
        if ev is None:
            raise MultipartError("body ended inside a part")
        if isinstance(ev, PartEnd):
            break
        prefix.append(ev)  # type: ignore[arg-type]
        size += len(ev)  # type: ignore[arg-type]
        if size >= MIN_RELAY:  # no relay yet: pass on what was gathered
            for piece in prefix:
                yield piece
            prefix, size = [], 0
    for piece in prefix:
        yield piece


async def payload(events: PartEvents, first: PartOut, keep: Keep | None = None,
                  relay: bool = False) -> AsyncIterator[bytes | memoryview | Relay]:
    """The payload of one part, as a single-part body; `keep` gets the whole payload once the part
    ended cleanly (never a truncated one). `relay`: what nothing keeps may be relayed (splice.py)."""
    kept = Kept(keep, first.content_type, events.archive.audience)
    ev: Event | None
    try:
        for ev in first.held:
            if isinstance(ev, PartEnd | PartHeaders):
                if isinstance(ev, PartEnd):
                    kept.done()
                return
            kept.add(ev)
            yield ev
        while True:
            if relay and keep is None and (moving := events.relay()) is not None:
                yield moving
                events.relayed(moving)
                continue
            ev = await events.next()
            if ev is None or isinstance(ev, PartEnd | PartHeaders):
                if isinstance(ev, PartEnd):
                    kept.done()
                return
            kept.add(ev)
            yield ev
    except (MultipartError, UpstreamError) as exc:
        raise StreamAborted(f"archive '{events.archive.name}': {exc}") from None
