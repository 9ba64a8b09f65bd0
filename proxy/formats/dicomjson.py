"""DICOM JSON helpers: point every URL at the proxy without touching anything else.

Archive JSON is never parsed and re-serialised on the pass-through path: the rewriter finds string
literals that start with one of the archive's URL prefixes and replaces just those, so number text
(`1.50`), key order and white space survive byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
from urllib.parse import unquote, urlsplit

log = logging.getLogger("dicomweb_edge")

# A DICOMweb path the proxy serves itself under the same shape (the locator routes it by study).
_STUDY_PATH = re.compile(r"^/studies/[0-9]+(?:\.[0-9]+)*(?:/[A-Za-z0-9._,=-]+)*$")
# What encode_token produces: unpadded URL-safe base64 of the remainder, a dot, and of its MAC.
_TOKEN = re.compile(r"^([A-Za-z0-9_-]{1,2048})\.([A-Za-z0-9_-]{22})$")
MAC_BYTES = 16  # of HMAC-SHA-256: enough that a token cannot be guessed, short enough for a URL
# A BulkDataURI member. It starts with its literal name, so that the regex engine jumps from one to the
# next (an optional leading comma made it try every byte of the body: 45 ms for a 200-instance series).
_BULK_MEMBER = re.compile(rb'"BulkDataURI"\s*:\s*"((?:[^"\\]|\\.)*)"')
_SPACE = b" \t\r\n"


_UNSAFE_CHAR = re.compile(r"[\x00-\x20\x7f\\]")  # control characters, space, DEL, backslash


def escapes(path: str) -> bool:
    """True when `path` would climb out of where it is put: a `.`/`..` segment (also percent-encoded),
    an encoded slash, a backslash, or a control character."""
    decoded = unquote(path) if "%" in path else path
    if _UNSAFE_CHAR.search(decoded):
        return True
    return decoded.count("/") != path.count("/") or any(s in (".", "..") for s in decoded.split("?")[0].split("/"))


class BadToken(ValueError):
    """An opaque bulk data token that this proxy did not mint."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _mac(key: bytes, archive: str, remainder: bytes) -> bytes:
    return hmac.new(key, archive.encode() + b"\0" + remainder, hashlib.sha256).digest()[:MAC_BYTES]


def encode_token(remainder: str, key: bytes, archive: str) -> str:
    """Wrap an archive-relative URL remainder the proxy cannot express as a study path, with a MAC under the
    deployment's `key` that binds it to `archive`: only this proxy (its workers, its replicas sharing the
    key) mints tokens it accepts back."""
    raw = remainder.encode()
    return f"{_b64(raw)}.{_b64(_mac(key, archive, raw))}"


def decode_token(token: str, key: bytes, archive: str) -> str:
    """The inverse of `encode_token`: BadToken for a token not minted for `archive` under `key` (forged or
    altered), or anything that could leave the archive's base URL."""
    m = _TOKEN.match(token)
    if m is None:
        raise BadToken("malformed bulk data token")
    try:
        raw, mac = (base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in m.groups())
        remainder = raw.decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadToken("malformed bulk data token") from None
    if not hmac.compare_digest(mac, _mac(key, archive, raw)):
        raise BadToken("bulk data token not minted by this proxy")
    if not remainder.startswith("/") or escapes(remainder):
        raise BadToken("malformed bulk data token")
    return remainder


class UrlRewriter:
    """Rewrites one archive's URLs (absolute under its base URL, or server-relative) to the proxy's."""

    def __init__(self, archive: str, base_url: str, aliases: list[str] | None = None, key: bytes = b"") -> None:
        self.archive = archive
        self.key = key or os.urandom(32)  # what bulk data tokens are signed with (the deployment's)
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
        return f"/bulk/{self.archive}/{encode_token(remainder, self.key, self.archive)}"

    def archive_path(self, url: str) -> str | None:
        """The path relative to the archive's base URL, if `url` is one of the archive's; else None."""
        for p in self._prefixes:
            if url == p or url.startswith(p + "/"):
                rest = url[len(p):]
                return None if escapes(rest) else rest  # ".." would lead elsewhere on the archive's host
        return None

    def rewrite_url(self, url: str, proxy_base: str) -> str:
        """One URL (a header value): the proxy's URL if it is the archive's, else unchanged."""
        rest = self.archive_path(url)
        return url if rest is None else proxy_base + self.proxy_path(rest)

    def rewrite_json(self, body: bytes, proxy_base: str) -> bytes:
        """Every JSON string literal that is one of the archive's URLs, pointed at `proxy_base`.

        A BulkDataURI that is not one of the archive's URLs (another host, port, scheme or path) is
        removed: the proxy never fetches it and never hands it to a client (SSRF, issue 7).
        """
        base = proxy_base.encode()

        def sub(m: re.Match[bytes]) -> bytes:
            rest = (m.group(1) or b"").replace(b"\\/", b"/").decode("utf-8", "replace")
            if escapes(rest):
                return m.group(0)  # not minted: the BulkDataURI pass below removes it
            return b'"' + base + self.proxy_path(rest).encode() + b'"'

        body = self._json_re.sub(sub, body)
        if b'"BulkDataURI"' not in body:
            return body
        ours = (base + b"/", base.replace(b"/", b"\\/") + b"\\/")
        refused = [m.span() for m in _BULK_MEMBER.finditer(body) if not m.group(1).startswith(ours)]
        dropped = len(refused)
        if refused:
            kept, at = [], 0
            for start, end in refused:  # cut each out with one of the commas around it
                before = start
                while before > at and body[before - 1] in _SPACE:
                    before -= 1
                if before > at and body[before - 1] == 0x2C:  # ","
                    start = before - 1
                else:
                    after = end
                    while after < len(body) and body[after] in _SPACE:
                        after += 1
                    if body[after : after + 1] == b",":
                        end = after + 1
                kept.append(body[at:start])
                at = end
            body = b"".join([*kept, body[at:]])
        if dropped:
            log.warning("archive '%s': removed %d BulkDataURI(s) that point outside its base URL (if the archive "
                        "writes another name for itself, add that base to its url_aliases)", self.archive, dropped)
        return body
