"""What can go wrong while answering, as exceptions every layer may raise; turned into responses by the
http layer (`Problem`: a short DICOMweb-style error, never patient data)."""

from __future__ import annotations

import json

from starlette.responses import Response


class Problem(Exception):
    """Raised anywhere in a handler to answer `status` with a short reason (never patient data)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


class StreamAborted(Exception):
    """The body could not be completed after the response started; the connection is cut."""


class ClientGone(Exception):
    """The client went away (or was cut for not reading) in the middle of the body: stop producing."""


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    """`{"status": 404, "reason": "..."}` as application/json."""
    body = json.dumps({"status": status, "reason": reason}).encode()
    return Response(body, status, headers=headers, media_type="application/json")
