"""QIDO-RS search: one archive's answer passed on, or every archive's merged (federation/merge.py).

The query is parsed and written per archive in dicomweb/query.py; where an archive had to be asked a
broader query than the client's, its records are matched at the edge (query.py), and the
search is answered as a federated one is: all matches fetched, then ordered and paged here.
"""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import Response

from proxy.auth import access
from proxy.config import Settings
from proxy.dicomweb.context import Context
from proxy.dicomweb.fetch import json_answer, open_upstream, upstream_problem
from proxy.dicomweb.query import (
    Query,
    edge_matches,
    keep,
    parse_query,
    reach_warnings,
    searchable,
    translate,
    warnings_for,
)
from proxy.dicomweb.target import client_accept, dicomweb_base
from proxy.errors import Problem
from proxy.federation import merge
from proxy.federation.searchcache import Codec, Mark
from proxy.formats.media import BadAccept, NotAcceptable, Resource, negotiate
from proxy.observability import metrics
from proxy.upstream.archive import Archive, UpstreamError
from proxy.upstream.profiles import PROFILES


def is_empty(body: bytes) -> bool:
    """204 (standard, dcm4chee), `200 []` (Orthanc) and an empty body (old dcm4chee) all mean "no matches"."""
    stripped = body.strip()
    return not stripped or (stripped[:1] == b"[" and stripped[1:].strip() == b"]")  # also "[ ]", "[\n]"


def _accept_json(request: Request) -> None:
    try:
        negotiate(client_accept(request), Resource.JSON)
    except BadAccept as exc:
        raise Problem(400, f"malformed Accept: {exc}") from None
    except NotAcceptable:
        raise Problem(406, "search results are available as application/dicom+json only") from None


def _answer(body: bytes | None, warnings: list[str], settings: Settings) -> Response:
    """The search's answer: its records, or no match as `empty_search_status` says (200 `[]` or 204)."""
    if body or settings.empty_search_status == 200:
        response = Response(body or b"[]", 200, media_type="application/dicom+json")
    else:
        response = Response(None, 204)
    for w in dict.fromkeys(warnings):
        response.headers.append("Warning", w)
    return response


async def search(request: Request, ctx: Context, path: str) -> Response:
    """A QIDO-RS search: 200 with results, `empty_search_status` with none; federated when there are several
    archives."""
    _accept_json(request)
    try:
        q = parse_query(request.scope["query_string"].decode())  # as sent: parse_query percent-decodes
    except UnicodeDecodeError:
        raise Problem(400, "the query string is not UTF-8") from None
    archive = ctx.archives[0]
    if len(ctx.archives) == 1 and not searchable(path, archive.profile):
        raise Problem(501, f"archive '{archive.name}' searches only /studies, /studies/{{study}}/series and "
                           "/studies/{study}/series/{series}/instances")
    if len(ctx.archives) > 1 or edge_matches(q, archive.profile):
        return await federated_search(request, ctx, path, q)
    query = translate(q, archive.profile)
    base = dicomweb_base(request, ctx.settings, ctx.root)
    # With the cache on, a single archive's answers are reused briefly too (cleared by any store).
    key = (base, path, query, *access.search_scope(ctx)) if ctx.cache is not None else None
    no_cache = "no-cache" in (request.headers.get("cache-control", "") + request.headers.get("pragma", "")).lower()
    cached, mark = await ctx.searches.get(key, SINGLE, fresh=no_cache) if key is not None else (None, None)
    if key is not None and not no_cache:
        assert mark is not None  # a key was looked up: `get` gave its mark
        metrics.child(metrics.CACHE_RESULTS, mark.tier, "search", "miss" if cached is None else "hit").inc()
    if cached is not None:
        response = _answer(cached[0], cached[1], ctx.settings)
        response.headers["X-Cache"] = "HIT"
        return response
    if key is None:
        return _answer(*await _search_one(request, ctx, archive, path, q, query, base, key, mark), ctx.settings)
    got = await ctx.flights.share(f"search/{key!r}", lambda: _search_one(request, ctx, archive, path, q, query,
                                                                         base, key, mark), _patience(ctx),
                                  siblings=False)
    response = _answer(got.value[0], got.value[1], ctx.settings)
    if not got.led:
        response.headers["X-Cache"] = "HIT"
    return response


async def _search_one(request: Request, ctx: Context, archive: Archive, path: str, q: Query, query: str, base: str,
                      key: tuple | None, mark: Mark | None) -> tuple[bytes | None, list[str]]:
    """The one archive's answer, its URLs pointed at the proxy (kept briefly, with the cache on)."""
    resp, stack = await open_upstream(ctx, None, path, "application/dicom+json", request, "qido",
                                      query=query, archives=[archive])
    async with stack:
        if resp.status not in (200, 204, 206):
            raise upstream_problem(resp, None)
        body = await json_answer(ctx, resp)
        warnings = [*resp.headers.getall("Warning", []), *warnings_for(q, archive), *reach_warnings(q, archive)]
    if is_empty(body):
        answer: bytes | None = None
    elif not body.lstrip().startswith(b"["):
        raise Problem(502, f"archive '{archive.name}' sent a search result that is not a JSON array")
    else:
        answer = archive.rewriter.rewrite_json(body, base)
    if key is not None and mark is not None:
        await ctx.searches.put(key, (answer, warnings), mark, SINGLE)
    return answer, warnings


LEVELS = {"studies": "study", "series": "series", "instances": "instance"}


async def _fetch_all(request: Request, ctx: Context, archive: Archive, path: str, q: Query,
                     base: str) -> tuple[list[merge.Record], list[str], bool]:
    """Every match from one archive, paged within its cap: (records, its Warnings, truncated)."""
    maximum = ctx.settings.max_search_results
    cap = archive.profile.max_limit
    records: list[merge.Record] = []
    warnings: list[str] = warnings_for(q, archive)
    if not searchable(path, archive.profile):
        return [], [f"299 dicomweb-edge: archive '{archive.name}' does not answer this search (it needs the "
                    "study, and for instances the series); results may be incomplete"], False
    matches = edge_matches(q, archive.profile)
    reach = archive.profile.max_results
    offset = 0
    async with asyncio.timeout(archive.config.search_deadline):
        while True:
            size = min(cap or maximum + 1, maximum + 1 - len(records))
            if reach is not None and offset + size > reach:  # records past `reach` cannot be asked for
                size = reach - offset
                if size <= 0:
                    warnings.append(f"299 dicomweb-edge: archive '{archive.name}' returns at most the first "
                                    f"{reach} matches of a search; results may be incomplete")
                    return records, warnings, False
            query = translate(q, archive.profile, limit=size, offset=offset)
            resp, stack = await open_upstream(ctx, None, path, "application/dicom+json", request, "qido",
                                              query=query, archives=[archive])
            async with stack:
                if resp.status not in (200, 204, 206):
                    raise UpstreamError(502, f"answered HTTP {resp.status}")
                body = await resp.read(ctx.settings.max_json_bytes)
                # The archive's own cap cut the page short (206, or dcm4chee's "There are N additional
                # results" Warning, which it sends only then): page on from here instead of passing its count on.
                capped = resp.status == 206
                for w in resp.headers.getall("Warning", []):
                    capped |= "additional results" in w
                    warnings += [] if "additional results" in w else [w]
            page = [] if is_empty(body) else merge.loads(archive.rewriter.rewrite_json(body, base))
            records += keep(page, matches)
            if len(records) > maximum:
                return records[:maximum], warnings, True
            if len(page) < size and not (capped and page):
                if capped:
                    warnings.append(f"299 dicomweb-edge: archive '{archive.name}' reported more matches than it "
                                    "returned; results may be incomplete")
                return records, warnings, False
            offset += len(page)


def _failure(exc: BaseException) -> tuple[str, int]:
    """A short, URL-free reason and the status it would justify on its own."""
    if isinstance(exc, TimeoutError):
        return "did not answer in time", 504
    if isinstance(exc, UpstreamError | Problem):
        return ("timed out" if exc.status == 504 else "is unavailable"), exc.status
    if isinstance(exc, ValueError):
        return "sent a malformed search result", 502
    return "failed", 502


async def federated_search(request: Request, ctx: Context, path: str, q: Query) -> Response:
    """Fan out to every healthy archive, merge, de-duplicate, order and page (federation/merge.py); also
    one archive's search whose records are matched at the edge."""
    level = LEVELS[path.rsplit("/", 1)[-1]]
    base = dicomweb_base(request, ctx.settings, ctx.root)
    key = (base, path, translate(q, PROFILES["generic"], limit=0, offset=0), *access.search_scope(ctx))
    no_cache = "no-cache" in (request.headers.get("cache-control", "") + request.headers.get("pragma", "")).lower()
    cached, mark = await ctx.searches.get(key, FEDERATED, fresh=no_cache)
    hit = cached is not None
    if not no_cache:
        metrics.child(metrics.CACHE_RESULTS, mark.tier, "search", "miss" if cached is None else "hit").inc()
    if cached is None:
        # Concurrent identical searches (a worklist refreshed on many workstations) fan out once.
        got = await ctx.flights.share(f"search/{key!r}", lambda: _fan_out(request, ctx, path, q, level, base, key,
                                                                             mark), _patience(ctx), siblings=False)
        cached, hit = got.value, not got.led
    ordered, warnings = cached
    chunk, remaining = merge.page(ordered, q.offset, q.limit)
    if remaining:
        warnings = [*warnings, f"299 dicomweb-edge: There are {remaining} additional results that can be requested"]
    response = _answer(merge.dumps(chunk) if chunk else None, warnings, ctx.settings)
    if hit:
        response.headers["X-Cache"] = "HIT"
    return response


def _patience(ctx: Context) -> float:
    """How long a search waits for the same search in flight: as long as the archives may take."""
    return max((a.config.search_deadline for a in ctx.archives), default=30.0)


async def _fan_out(request: Request, ctx: Context, path: str, q: Query, level: str, base: str, key: tuple,
                   mark: Mark) -> tuple[list[merge.Record], list[str]]:
    """Every healthy archive searched, the answers merged, de-duplicated and ordered (kept when whole)."""
    asked = [a for a in ctx.archives if a.breaker.allow()]
    skipped = [a for a in ctx.archives if a not in asked]
    warnings = [f"299 dicomweb-edge: archive '{a.name}' was skipped (circuit open); "
                "results may be incomplete" for a in skipped]
    for a in skipped:
        metrics.child(metrics.SEARCH_PARTIAL, a.name, "circuit_open").inc()
    metrics.SEARCH_FANOUT.observe(len(asked))
    results = await asyncio.gather(*(_fetch_all(request, ctx, a, path, q, base) for a in asked),
                                   return_exceptions=True)
    found: list[tuple[str, list[merge.Record]]] = []
    statuses = []
    for archive, result in zip(asked, results, strict=True):
        if isinstance(result, BaseException):
            if isinstance(result, asyncio.CancelledError):
                raise result
            reason, status = _failure(result)
            statuses.append(status)
            if isinstance(result, TimeoutError):
                archive.report_health(False)
            metrics.child(metrics.SEARCH_PARTIAL, archive.name, "timeout" if status == 504 else "error").inc()
            warnings.append(f"299 dicomweb-edge: archive '{archive.name}' {reason}; results may be incomplete")
            continue
        records, archive_warnings, truncated = result
        found.append((archive.name, records))
        warnings += archive_warnings
        if truncated:
            warnings.append(f"299 dicomweb-edge: archive '{archive.name}' has more than "
                            f"{ctx.settings.max_search_results} matches; narrow the search")
    if not found:
        status = 503 if not asked else 504 if all(s == 504 for s in statuses) else 502
        raise Problem(status, "no archive could be searched: " + "; ".join(w.split(": ", 1)[1] for w in warnings))
    merged, where = merge.merge(found, level)
    await ctx.locator.share(where)
    cached = (merge.order(merged, level), warnings)
    if len(found) == len(ctx.archives):  # never reuse a partial answer
        await ctx.searches.put(key, cached, mark, FEDERATED)
    return cached


def _pack(value: tuple[bytes | None, list[str]]) -> bytes:
    return json.dumps(value[1]).encode() + b"\n" + (value[0] or b"")


def _unpack(blob: bytes) -> tuple[bytes | None, list[str]]:
    head, _, body = blob.partition(b"\n")
    return body or None, [str(w) for w in json.loads(head)]


# Cached answers as bytes for the shared tier: the Warnings as a JSON line, then the answer as sent
# (one archive) or the merged, ordered records (federated; numbers keep their text).
def _unpack_records(blob: bytes) -> tuple[list[merge.Record], list[str]]:
    body, warnings = _unpack(blob)
    return merge.loads(body or b"[]"), warnings


SINGLE = Codec("single", _pack, _unpack)
FEDERATED = Codec("federated", lambda v: _pack((merge.dumps(v[0]), v[1])), _unpack_records)
