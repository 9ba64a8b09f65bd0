"""The request model of a WADO-RS request: the UIDs and frames its URL names (`Target`), what the client
accepts (`select`), and the one media range to ask the archive for (`upstream_accept`)."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from proxy.errors import Problem
from proxy.formats.media import BadAccept, NotAcceptable, Resource, Selection, negotiate
from proxy.upstream.archive import Archive

VARY = ("Vary", "Accept")


@dataclass(frozen=True)
class Target:
    """The UIDs (and frame numbers) a WADO-RS URL names."""

    study: str
    series: str | None = None
    instance: str | None = None
    frames: tuple[int, ...] | None = None

    def path(self) -> str:
        """The DICOMweb path of the resource, relative to a service base URL."""
        p = f"/studies/{self.study}"
        if self.series:
            p += f"/series/{self.series}"
        if self.instance:
            p += f"/instances/{self.instance}"
        if self.frames:
            p += "/frames/" + ",".join(map(str, self.frames))
        return p


def client_accept(request: Request) -> str | None:
    """The `accept` query parameter wins over the Accept header (PS3.18 §8.7.8.1)."""
    if b"accept" in request.scope["query_string"]:  # parse the query only when it may hold `accept`
        value = request.query_params.get("accept")
        if value:
            return value
    return request.headers.get("accept")


def select(request: Request, resource: Resource, single_item: bool) -> Selection:
    """Negotiate, turning failures into 400/406 Problems."""
    try:
        return negotiate(client_accept(request), resource, single_item)
    except BadAccept as exc:
        raise Problem(400, f"malformed Accept: {exc}") from None
    except NotAcceptable as exc:
        raise Problem(406, str(exc)) from None


def upstream_accept(sel: Selection, resource: Resource, archive: Archive) -> tuple[str, bool]:
    """The one media range to send the archive, and whether to unwrap a single part from it."""
    if not sel.multipart and sel.media_type in ("application/dicom+json", "image/jpeg", "image/png", "image/gif"):
        return sel.media_type, False
    prof = archive.profile
    single_native = (resource is Resource.INSTANCE and prof.single_part_instance) or (
        resource is Resource.FRAMES and prof.single_part_frame)
    if not sel.multipart and single_native:
        return f"{sel.media_type}; transfer-syntax={sel.transfer_syntax}", False
    q = '"' if prof.quote_type else ""
    ts = f"; transfer-syntax={sel.transfer_syntax}" if sel.transfer_syntax else ""
    return f"multipart/related; type={q}{sel.media_type}{q}{ts}", not sel.multipart
