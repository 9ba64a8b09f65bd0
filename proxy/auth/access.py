"""Token pass-through and the shared cache: who may be served what the cache learned (`admit`, the one place).

Every cached entry carries its placement (placement.py): the study and series the archive placed it in,
and its audience, whose answer it was. What an archive read with the proxy's own credentials answered
is the same for every reader, so every reader is served it (the proxy's own scopes decide). What a token
pass-through archive (`forward_authorization`) answered one caller is served to another caller only once
*that* archive confirmed that this caller may see the entry's study, whatever other archives hold: a
200 for a retrieve about the study with the caller's token, non-empty metadata, or a search
`StudyInstanceUID=<study>` that lists it. A confirmation is remembered for a short while
(`[auth] access_ttl`, in this worker only: its context's `AccessMemo`) per (archive, token digest,
study). Without one a hit first asks the archive; a refusal answers 401/403/404, an archive that cannot
be asked 502, and nothing comes from the cache. Search answers are cached per token digest (`search_scope`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from proxy.cache.placement import SHARED
from proxy.errors import Problem
from proxy.observability import metrics
from proxy.upstream.archive import CALLER_AUTHORIZATION, Archive, UpstreamError


class Archives(Protocol):
    """What admission needs of the handlers' context: the archives, one of them by name, and the worker's
    confirmations (one memo, shared by the `/upstreams/{name}` contexts)."""

    archives: list[Archive]
    access_memo: AccessMemo

    def archive(self, name: str) -> Archive | None: ...

# Upstream services whose 200 about a study shows the caller may see it (searches can answer 200 with
# nothing, or filter, so they never count; metadata counts when it is not empty, see metadata.py).
CONFIRMING = frozenset({"frames", "instance", "bulkdata", "rendered", "thumbnail"})
_STUDY_PATH = re.compile(r"^/studies/([0-9][0-9.]*)(?:/|$)")
CHALLENGE = 'Bearer realm="dicomweb-edge", error="invalid_token", error_description="the archive refused the token"'


class AccessMemo:
    """(archive, token digest, study) → confirmed until; least recently confirmed go first."""

    def __init__(self, ttl: float = 60.0, max_entries: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._until: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def confirm(self, archive: str, caller: str, study: str) -> None:
        """`archive` showed `caller` content of `study` just now."""
        if self.ttl <= 0:
            return
        key = (archive, caller, study)
        self._until[key] = self.clock() + self.ttl
        self._until.move_to_end(key)
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def confirmed(self, archive: str, caller: str, study: str) -> bool:
        """True while `archive`'s confirmation of (caller, study) is fresh."""
        key = (archive, caller, study)
        until = self._until.get(key)
        if until is None:
            return False
        if until <= self.clock():
            del self._until[key]
            return False
        return True


def caller() -> str:
    """A digest of the current request's Authorization header ('' for none): never the token itself."""
    value = CALLER_AUTHORIZATION.get()
    return "" if value is None else hashlib.sha256(value.encode("latin-1")).hexdigest()


def gated(ctx: Archives) -> bool:
    """True when some archive of this context decides per caller (token pass-through)."""
    return any(a.config.forward_authorization for a in ctx.archives)


def audiences(ctx: Archives) -> tuple[str, ...]:
    """Whose cached answers a lookup in this context may find, in lookup order: the proxy's own (served
    without asking anyone) first, then each pass-through archive's (served after `admit`)."""
    return (SHARED, *(a.audience for a in ctx.archives if a.audience))


def search_scope(ctx: Archives) -> tuple[str, ...]:
    """What to add to a search-cache key: the caller's digest in pass-through mode, else nothing (shared)."""
    return ("caller", caller()) if gated(ctx) else ()


def confirm(ctx: Archives, archive: Archive, study: str | None, path: str = "") -> None:
    """Remember in `ctx`'s memo that `archive` just answered the current caller with content of `study` (or
    of the study that the upstream `path` names)."""
    memo = ctx.access_memo
    if not archive.audience:
        return
    if not study and (m := _STUDY_PATH.match(path)):
        study = m.group(1)
    if study:
        memo.confirm(archive.audience, caller(), study)


def refused(status: int) -> Problem:
    """What the client hears when a pass-through archive refuses its token (401) or the study (403)."""
    metrics.child(metrics.AUTH_FAILURES, "access").inc()
    if status == 401:
        return Problem(401, "the archive did not accept the credentials", {"WWW-Authenticate": CHALLENGE})
    return Problem(403, "the archive does not let this caller see the study")


async def _check(archive: Archive, study: str) -> int:
    """Ask `archive`, with the caller's token, whether the study is visible: 200 yes, 404 no match, else its status."""
    try:
        async with asyncio.timeout(archive.config.search_deadline):
            async with archive.open("GET", "/studies", f"StudyInstanceUID={study}&limit=1",
                                    {"Accept": "application/dicom+json"}, service="access") as resp:
                body = await resp.read(1 << 20)
                if resp.status in (401, 403) or resp.status >= 300:
                    return resp.status
    except TimeoutError:
        return 504
    except UpstreamError as exc:
        return exc.status
    try:
        records = json.loads(body) if body.strip() else []
    except ValueError:
        return 502
    for record in records if isinstance(records, list) else []:
        value = record.get("0020000D", {}).get("Value") if isinstance(record, dict) else None
        if isinstance(value, list) and study in value:
            return 200  # an archive that ignored the filter and listed other studies confirms nothing
    return 404


async def admit(ctx: Archives, study: str, heard_by: Iterable[str]) -> None:
    """Before anything the cache learned about `study` for the audiences `heard_by` is served: for each
    pass-through archive among them, make sure that it lets the caller see the study (remembered for
    access_ttl, in `ctx`'s memo). What the proxy learned with its own credentials needs nothing more. Problem
    otherwise."""
    who = caller()
    memo = ctx.access_memo
    for audience in sorted(set(heard_by) - {SHARED}):
        if memo.confirmed(audience, who, study):
            continue
        archive = ctx.archive(audience)
        status = 404 if archive is None else await _check(archive, study)
        if status == 200:
            memo.confirm(audience, who, study)
            continue
        if status in (401, 403):
            raise refused(status)
        if status == 404:
            metrics.child(metrics.AUTH_FAILURES, "access").inc()
            raise Problem(404, "no such study")
        raise Problem(502, "could not confirm with the archive that this caller may see the study")
