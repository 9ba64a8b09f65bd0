"""DICOM JSON helpers: point every URL at the proxy without touching anything else (J-04, J-07).

Archive JSON is never parsed and re-serialised on the pass-through path: the rewriter finds string
literals that start with one of the archive's URL prefixes and replaces just those, so number text
(`1.50`), key order and white space survive byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

# A DICOMweb path the proxy serves itself under the same shape (the locator routes it by study).
_STUDY_PATH = re.compile(r"^/studies/[0-9]+(?:\.[0-9]+)*(?:/[A-Za-z0-9._,=-]+)*$")


class BadToken(ValueError):
    """An opaque bulk data token that this proxy did not mint."""


def encode_token(remainder: str) -> str:
    """Wrap an archive-relative URL remainder the proxy cannot express as a study path."""
    return base64.urlsafe_b64encode(remainder.encode()).decode().rstrip("=")


def decode_token(token: str) -> str:
    """The inverse of `encode_token`, refusing anything that could leave the archive's base URL."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadToken("malformed bulk data token") from None
    if not raw.startswith("/") or "\\" in raw or any(ord(c) < 0x21 for c in raw):
        raise BadToken("malformed bulk data token")
    if any(seg in ("..", ".") for seg in urlsplit(raw).path.split("/")):
        raise BadToken("malformed bulk data token")
    return raw


class UrlRewriter:
    """Rewrites one archive's URLs (absolute under its base URL, or server-relative) to the proxy's."""

    def __init__(self, archive: str, base_url: str, aliases: list[str] | None = None) -> None:
        self.archive = archive
        bases = [base_url.rstrip("/")] + [a.rstrip("/") for a in aliases or []]
        path = urlsplit(base_url).path.rstrip("/")
        prefixes = set(bases)
        if path:
            prefixes.add(path)  # server-relative URIs such as "/dicom-web/studies/..."
        # JSON may escape "/" as "\/": accept both spellings of each prefix.
        alts = sorted({re.escape(p) for p in prefixes} | {re.escape(p.replace("/", "\\/")) for p in prefixes},
                      key=len, reverse=True)
        self._json_re = re.compile(('"(?:' + "|".join(alts) + ')((?:/|\\\\/)[^"\\\\]*(?:\\\\/[^"\\\\]*)*)?"')
                                   .encode())
        self._prefixes = sorted(prefixes, key=len, reverse=True)

    def proxy_path(self, remainder: str) -> str:
        """The path under the proxy's DICOMweb root for an archive-relative remainder."""
        if not remainder:
            return ""
        if _STUDY_PATH.match(remainder):
            return remainder
        return f"/bulk/{self.archive}/{encode_token(remainder)}"

    def archive_path(self, url: str) -> str | None:
        """The path relative to the archive's base URL, if `url` is one of the archive's; else None."""
        for p in self._prefixes:
            if url == p or url.startswith(p + "/"):
                return url[len(p):]
        return None

    def rewrite_url(self, url: str, proxy_base: str) -> str:
        """One URL (a header value): the proxy's URL if it is the archive's, else unchanged."""
        rest = self.archive_path(url)
        return url if rest is None else proxy_base + self.proxy_path(rest)

    def rewrite_json(self, body: bytes, proxy_base: str) -> bytes:
        """Every JSON string literal that is one of the archive's URLs, pointed at `proxy_base`."""
        base = proxy_base.encode()

        def sub(m: re.Match[bytes]) -> bytes:
            rest = (m.group(1) or b"").replace(b"\\/", b"/").decode("utf-8", "replace")
            return b'"' + base + self.proxy_path(rest).encode() + b'"'

        return self._json_re.sub(sub, body)
