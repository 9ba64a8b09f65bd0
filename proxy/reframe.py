"""Re-framing an archive's multipart answer as ours (M-01..M-07).

Each archive part becomes a part under the proxy's boundary with a truthful `Content-Type`
(a DICOM part without `transfer-syntax=` is labelled from its File Meta), a `Content-Location` that
points at the proxy, and the payload passed on as the slices the parser produced. Parts from several
archives can share one response (a study split across archives): an instance already sent is
skipped, recognised by the SOP Instance UID in its File Meta.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from . import part10
from .media import ANY_TS, Selection, parse_content_type
from .multipart import Event, MultipartError, MultipartReader, MultipartWriter, PartEnd, PartHeaders
from .responses import Problem, StreamAborted
from .upstream import Archive, UpstreamError, UpstreamResponse


class PartEvents:
    """Pull-style events from an upstream multipart body."""

    def __init__(self, resp: UpstreamResponse) -> None:
        mtype, params = parse_content_type(resp.content_type)
        if not mtype.startswith("multipart/") or not params.get("boundary"):
            raise Problem(502, f"archive '{resp.archive.name}' sent {mtype or 'no content type'} "
                               "where multipart/related was expected")
        self.archive = resp.archive
        self.reader = MultipartReader(params["boundary"])
        self.chunks = resp.iter_chunks()
        self.pending: deque[Event] = deque()

    async def next(self) -> Event | None:
        """The next event, None at a clean end; MultipartError/UpstreamError on a broken body."""
        while not self.pending:
            chunk = await anext(self.chunks, None)
            if chunk is None:
                self.reader.close()
                return None
            self.pending.extend(self.reader.feed(chunk))
        return self.pending.popleft()

    async def finish(self, limit: int = 64 * 1024) -> None:
        """Read what is left (normally just the closing delimiter) so the connection can be reused;
        give up quietly after `limit` bytes or on a broken body (the connection is then closed)."""
        seen = 0
        try:
            while seen <= limit:
                chunk = await anext(self.chunks, None)
                if chunk is None:
                    return
                seen += len(chunk)
        except (UpstreamError, MultipartError):
            return

    async def first(self) -> PartHeaders | None:
        """The first part's headers (None for an empty multipart), as a 502 Problem if broken."""
        try:
            ev = await self.next()
        except (MultipartError, UpstreamError) as exc:
            raise Problem(502, f"archive '{self.archive.name}' sent a broken multipart body ({exc})") from None
        if ev is not None and not isinstance(ev, PartHeaders):
            raise Problem(502, f"archive '{self.archive.name}' sent a malformed multipart body")
        return ev


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
            meta = part10.file_meta(head)
            if meta != part10.NEED_MORE:
                if isinstance(meta, dict):
                    ts = ts or meta.get("ts")
                    sop = meta.get("sop")
                    if seen is not None and sop:
                        skip = sop in seen
                        seen.add(sop)
                break
            ev = await events.next()
            if ev is None:
                break
            held.append(ev)
            if isinstance(ev, PartEnd | PartHeaders):
                break
            small = bytes(ev[:4096])  # the File Meta is small: look at the start of the piece first
            if len(ev) > len(small) and part10.file_meta(head + small) == part10.NEED_MORE:
                small = bytes(ev[: part10.MAX_META - len(head)])  # rare: a long File Meta
            head += small
    if not mtype:
        mtype = sel.media_type
    if ts is None and sel.transfer_syntax not in (None, ANY_TS):
        ts = sel.transfer_syntax
    length = headers.headers.get("content-length")
    return PartOut(f"{mtype}; transfer-syntax={ts}" if ts else mtype, headers.headers.get("content-location"),
                   int(length) if length and length.isdigit() else None, held, skip)


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
        self.tee: Callable[[str, list[bytes | memoryview]], None] | None = None
        self.tee_limit = 64 * 1024 * 1024

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
                    first_header: bytes | None = None) -> AsyncIterator[bytes | memoryview]:
        """Every part of one archive response, re-framed; StreamAborted if the body breaks."""
        archive = events.archive
        part = first
        sent = 0
        try:
            while part is not None:
                if not part.skip:
                    yield first_header if first_header is not None and sent == 0 else self.header(part, archive)
                sent += 1
                ended = False
                kept: list[bytes | memoryview] | None = [] if self.tee is not None and not part.skip else None
                size = 0
                for ev in part.held:
                    if isinstance(ev, PartEnd | PartHeaders):
                        ended = True
                        break
                    if not part.skip:
                        if kept is not None:
                            kept.append(ev)  # type: ignore[arg-type]
                            size += len(ev)  # type: ignore[arg-type]
                        yield ev
                while not ended:
                    ev = await events.next()
                    if ev is None:
                        raise MultipartError("body ended inside a part")
                    if isinstance(ev, PartEnd):
                        break
                    if not part.skip:
                        if kept is not None:
                            size += len(ev)  # type: ignore[arg-type]
                            kept = kept if size <= self.tee_limit else None
                            if kept is not None:
                                kept.append(ev)  # type: ignore[arg-type]
                        yield ev  # type: ignore[misc]
                if kept is not None and self.tee is not None:
                    self.tee(part.content_type, kept)
                if max_parts is not None and sent >= max_parts:
                    return
                nxt = await events.next()
                if nxt is None:
                    return
                if not isinstance(nxt, PartHeaders):
                    raise MultipartError("data outside a part")
                part = await label(events, nxt, self.sel, self.seen)
        except (MultipartError, UpstreamError) as exc:
            raise StreamAborted(f"archive '{archive.name}': {exc}") from None

    def close(self) -> bytes:
        """The closing delimiter."""
        return self.writer.close()


Keep = Callable[[str, list[bytes | memoryview]], None]
KEEP_LIMIT = 64 * 1024 * 1024  # larger payloads are passed on, not collected for a cache


class Kept:
    """Collects a payload passing through, for a cache: given to `keep` only if it completed."""

    def __init__(self, keep: Keep | None, content_type: str) -> None:
        self.keep = keep
        self.content_type = content_type
        self.pieces: list[bytes | memoryview] | None = [] if keep is not None else None
        self.size = 0

    def add(self, piece: bytes | memoryview) -> None:
        """One more piece of the payload."""
        if self.pieces is not None:
            self.size += len(piece)
            if self.size > KEEP_LIMIT:
                self.pieces = None
            else:
                self.pieces.append(piece)

    def done(self) -> None:
        """The payload is complete: hand it over (once)."""
        if self.keep is not None and self.pieces is not None:
            self.keep(self.content_type, self.pieces)
        self.pieces = None


async def payload(events: PartEvents, first: PartOut, keep: Keep | None = None) -> AsyncIterator[bytes | memoryview]:
    """The payload of one part, as a single-part body; `keep` gets the whole payload once the part
    ended cleanly (never a truncated one)."""
    kept = Kept(keep, first.content_type)
    try:
        for ev in first.held:
            if isinstance(ev, PartEnd | PartHeaders):
                if isinstance(ev, PartEnd):
                    kept.done()
                return
            kept.add(ev)  # type: ignore[arg-type]
            yield ev
        while True:
            ev = await events.next()
            if ev is None or isinstance(ev, PartEnd | PartHeaders):
                if isinstance(ev, PartEnd):
                    kept.done()
                return
            kept.add(ev)
            yield ev
    except (MultipartError, UpstreamError) as exc:
        raise StreamAborted(f"archive '{events.archive.name}': {exc}") from None
