"""Token pass-through and the shared cache: a cached study is served to a caller only once an archive that
receives the caller's token has confirmed that this token may see that study.

With the proxy's own archive credentials every authenticated reader sees the same archive, so cache hits
are shared. With `forward_authorization` the archive decides per token; the proxy then remembers, for a
short while (`[auth] access_ttl`, in this process only), which (token digest, study) pairs an archive
answered with content: a 200 for a retrieve about the study, or a search for the study that matched it.
Without such a memo a cache hit first asks the archive (`admit`); a refusal answers 401/403/404 and
nothing comes from the cache. Search answers are cached per token digest (`search_scope`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable

from . import metrics
from .context import Context
from .responses import Problem
from .upstream import CALLER_AUTHORIZATION, Archive, UpstreamError

# Upstream services whose 200 about a study shows the caller may see it (searches can answer 200 with
# nothing, or filter, so they never count; metadata counts when it is not empty, see metadata.py).
CONFIRMING = frozenset({"frames", "instance", "bulkdata", "rendered", "thumbnail"})
_STUDY_PATH = re.compile(r"^/studies/([0-9][0-9.]*)(?:/|$)")
CHALLENGE = 'Bearer realm="dicomweb-edge", error="invalid_token", error_description="the archive refused the token"'


class AccessMemo:
    """(token digest, study) → confirmed until; least recently confirmed pairs go first."""

    def __init__(self, ttl: float = 60.0, max_entries: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._until: OrderedDict[tuple[str, str], float] = OrderedDict()

    def confirm(self, caller: str, study: str) -> None:
        """The archive showed `caller` content of `study` just now."""
        if self.ttl <= 0:
            return
        self._until[(caller, study)] = self.clock() + self.ttl
        self._until.move_to_end((caller, study))
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def confirmed(self, caller: str, study: str) -> bool:
        """True while a confirmation of (caller, study) is fresh."""
        until = self._until.get((caller, study))
        if until is None:
            return False
        if until <= self.clock():
            del self._until[(caller, study)]
            return False
        return True


MEMO = AccessMemo()


def caller() -> str:
    """A digest of the current request's Authorization header ('' for none): never the token itself."""
    value = CALLER_AUTHORIZATION.get()
    return "" if value is None else hashlib.sha256(value.encode("latin-1")).hexdigest()


def gated(ctx: Context) -> bool:
    """True when some archive of this context decides per caller (token pass-through)."""
    return any(a.config.forward_authorization for a in ctx.archives)


def search_scope(ctx: Context) -> tuple[str, ...]:
    """What to add to a search-cache key: the caller's digest in pass-through mode, else nothing (shared)."""
    return ("caller", caller()) if gated(ctx) else ()


def confirm(archive: Archive, study: str | None, path: str = "") -> None:
    """Remember that `archive` just answered the current caller with content of `study` (or of the study
    that the upstream `path` names)."""
    if not archive.config.forward_authorization:
        return
    if not study and (m := _STUDY_PATH.match(path)):
        study = m.group(1)
    if study:
        MEMO.confirm(caller(), study)


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


async def admit(ctx: Context, study: str) -> None:
    """Before anything cached about `study` is served: in pass-through mode, make sure an archive that
    receives the caller's token lets it see the study (remembered for access_ttl). Problem otherwise."""
    if not gated(ctx):
        return
    who = caller()
    if MEMO.confirmed(who, study):
        return
    holders = await ctx.archives_for(study)
    if holders and all(not a.config.forward_authorization for a in holders):
        return  # only archives the proxy reads with its own credentials hold it: shared by every reader
    asked = [a for a in holders if a.config.forward_authorization] or [
        a for a in ctx.archives if a.config.forward_authorization]
    statuses = await asyncio.gather(*(_check(a, study) for a in asked))
    if 200 in statuses:
        MEMO.confirm(who, study)
        return
    if 401 in statuses or 403 in statuses:
        raise refused(401 if 401 in statuses else 403)
    if all(s == 404 for s in statuses):
        metrics.child(metrics.AUTH_FAILURES, "access").inc()
        raise Problem(404, "no such study")
    raise Problem(502, "could not confirm with the archive that this caller may see the study")
