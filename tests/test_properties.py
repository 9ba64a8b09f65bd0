"""Property tests (hypothesis, issue 7 point 9): the Accept parser, the multipart reader and writer, and
the DICOM JSON URL rewriter, over generated input. Deterministic (`derandomize`), a few seconds in all.

References: RFC 7231 §5.3 and PS3.18 §8.7 (Accept), RFC 2046 §5.1 (multipart framing), PS3.18 Annex F.2
(DICOM JSON: every URL points at the proxy; numbers such as 1.50 must pass through as written).
"""

from __future__ import annotations

import json
import re

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.formats.dicomjson import UrlRewriter
from proxy.formats.media import BadAccept, NotAcceptable, Resource, negotiate, parse_accept
from proxy.formats.multipart import MultipartReader, MultipartWriter, PartEnd, PartHeaders

FAST = settings(max_examples=120, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------- Accept

TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-.+", min_size=1, max_size=12)
MEDIA = st.builds(lambda a, b: f"{a}/{b}", TOKEN, TOKEN) | st.sampled_from([
    "multipart/related", "application/dicom", "application/octet-stream", "image/jpeg", "*/*",
    "application/dicom+json", "image/*"])


@FAST
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80))
def test_accept_parser_never_raises_anything_but_bad_accept(header):
    """Any printable header is parsed or refused with BadAccept (400), never another exception."""
    try:
        ranges = parse_accept(header)
    except BadAccept:
        return
    assert ranges and all(0 < r.q <= 1 and "/" in r.type for r in ranges)
    for resource in Resource:
        try:
            negotiate(header, resource, single_item=True)
        except (BadAccept, NotAcceptable):
            pass


TS = st.sampled_from(["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "*"])
INNER = st.sampled_from(["application/dicom", "application/octet-stream", "image/jpeg", "image/jp2", "image/jls",
                         "application/*", "*/*", "text/plain"])
OUTER = st.sampled_from(["application/dicom", "application/octet-stream", "image/jpeg", "image/png",
                         "application/dicom+json", "application/json", "image/*", "*/*", "text/html"])


@st.composite
def accept_range(draw: st.DrawFn) -> tuple[str, str, str | None, str | None, float]:
    """One range as a DICOMweb client writes it: (text, type, inner type, transfer syntax, q)."""
    multipart = draw(st.booleans())
    kind = "multipart/related" if multipart else draw(OUTER)
    inner = draw(INNER) if multipart and draw(st.booleans()) else None
    ts = draw(TS) if draw(st.booleans()) else None
    q = draw(st.sampled_from([None, 1.0, 0.9, 0.5, 0.001, 0.0]))
    text = kind + (f'; type="{inner}"' if inner else "") + (f"; transfer-syntax={ts}" if ts else "")
    text += "" if q is None else f"; q={q:g}"
    return text, kind, inner, ts, 1.0 if q is None else q


def _admits(r: tuple[str, str, str | None, str | None, float], sel: object) -> bool:
    """Whether range `r` (q > 0) allows the answer `sel`: its media type (the part's, for multipart) and,
    where it names one, its transfer syntax."""
    _, kind, inner, ts, q = r
    if q <= 0:
        return False
    def matches(pattern: str, concrete: str) -> bool:
        return pattern in ("*/*", concrete) or (pattern.endswith("/*") and concrete.startswith(pattern[:-1]))
    if sel.multipart:  # type: ignore[attr-defined]
        if kind not in ("multipart/related", "*/*"):
            return False
        if inner is not None and not matches(inner, sel.media_type):  # type: ignore[attr-defined]
            return False
    elif not (matches(kind, sel.media_type) or (kind == "application/json" and  # type: ignore[attr-defined]
                                                  sel.media_type == "application/dicom+json")):  # type: ignore
        return False
    return ts is None or sel.transfer_syntax in (None, ts)  # type: ignore[attr-defined]


@FAST
@given(st.lists(accept_range(), min_size=1, max_size=4), st.sampled_from(list(Resource)), st.booleans())
def test_negotiation_answers_only_what_a_range_accepts(ranges, resource, single_item):
    """Built from the media types, parameters and q-values clients send (not random text, which the parser
    refuses almost always): the answer is refused (406, or 400 for what cannot be combined), or it is
    one that a range with q > 0 accepts, transfer syntax included, and no range the client prefers
    strictly more would have given an answer of its own."""
    header = ", ".join(r[0] for r in ranges)
    try:
        sel = negotiate(header, resource, single_item)
    except (NotAcceptable, BadAccept):
        # refused although the client takes anything: never (a transfer syntax named beside it aside)
        assert not any(r[4] > 0 and r[1] == "*/*" and r[3] is None for r in ranges), (header, resource)
        return
    chosen = [r for r in ranges if _admits(r, sel)]
    assert chosen, (header, resource, sel)
    best_q = max(r[4] for r in chosen)
    for r in ranges:
        if r[4] > best_q:
            try:
                alone = negotiate(r[0], resource, single_item)
            except (NotAcceptable, BadAccept):
                continue
            assert not _admits(r, alone), (header, resource, sel, r[0])


@FAST
@given(MEDIA, TOKEN, st.sampled_from(["type", "transfer-syntax", "charset"]))
def test_quoted_and_unquoted_parameters_are_the_same(media, value, name):
    """`name=value` and `name="value"` mean the same (RFC 7231 §3.1.1.1)."""
    plain = parse_accept(f"{media}; {name}={value}")
    quoted = parse_accept(f'{media}; {name}="{value}"')
    assert [(r.type, r.params, r.q) for r in plain] == [(r.type, r.params, r.q) for r in quoted]


@FAST
@given(st.lists(st.tuples(MEDIA, st.integers(0, 1000)), min_size=1, max_size=8))
def test_ranges_come_by_q_value_then_as_written(items):
    """Most preferred first; equal q keep their order; q=0 ("not acceptable") is dropped."""
    header = ", ".join(f"{m}; q={q / 1000:g}" for m, q in items)
    ranges = parse_accept(header)
    expected = sorted([(q, i, m) for i, (m, q) in enumerate(items) if q > 0], key=lambda t: (-t[0], t[1]))
    assert [(r.type, r.q) for r in ranges] == [(m, q / 1000) for q, _, m in expected]


# ------------------------------------------------------------------------------------------- multipart

BOUNDARY = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'()+_,-./:=?", min_size=1,
                   max_size=70).filter(lambda b: not b.endswith(" "))
# Payloads rich in what confuses a parser: CR, LF, dashes, and fragments of a delimiter.
PAYLOAD = st.lists(st.sampled_from([b"\r", b"\n", b"-", b"--", b"\r\n--", b"x", b"\x00", b"DICM", b"\r\n\r\n"]) |
                   st.binary(max_size=40), max_size=30).map(b"".join)
PART = st.tuples(st.sampled_from(["application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1",
                                  "application/dicom", "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"]),
                 PAYLOAD, st.booleans())


def _read(boundary: str, chunks: list[bytes]) -> list[tuple[dict[str, str], bytes]]:
    reader, parts = MultipartReader(boundary), []
    for chunk in chunks:
        for ev in reader.feed(chunk):
            if isinstance(ev, PartHeaders):
                parts.append((ev.headers, bytearray()))
            elif isinstance(ev, PartEnd):
                continue
            else:
                parts[-1][1].extend(bytes(ev))
    reader.close()
    return [(h, bytes(b)) for h, b in parts]


def _write(boundary: str, parts: list[tuple[str, bytes, bool]]) -> bytes:
    writer = MultipartWriter(boundary)
    out = b"".join(writer.part(ctype, None, len(payload) if counted else None) + payload
                   for ctype, payload, counted in parts)
    return out + writer.close()


@FAST
@given(BOUNDARY, st.lists(PART, min_size=1, max_size=5), st.data())
def test_any_chunking_gives_the_same_parts(boundary, parts, data):
    """The writer's output, fed to the reader in any split, gives back exactly the parts written."""
    delim = ("\r\n--" + boundary).encode()
    assume(all(counted or delim not in payload + b"\r" for _, payload, counted in parts))
    body = _write(boundary, parts)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=12), label="cuts"))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
    assert b"".join(chunks) == body
    got = _read(boundary, chunks)
    assert got == _read(boundary, [body])  # the same, whatever the chunking
    assert [(h["content-type"], p) for h, p in got] == [(c, p) for c, p, _ in parts]


@FAST
@given(BOUNDARY, st.lists(PART, min_size=1, max_size=4))
def test_byte_by_byte_feeding(boundary, parts):
    """The worst chunking there is: one byte at a time."""
    delim = ("\r\n--" + boundary).encode()
    assume(all(counted or delim not in payload + b"\r" for _, payload, counted in parts))
    body = _write(boundary, parts)
    got = _read(boundary, [body[i : i + 1] for i in range(len(body))])
    assert [p for _, p in got] == [p for _, p, _ in parts]


# ------------------------------------------------------------------------------------ DICOM JSON URLs

ARCHIVE = "http://127.0.0.1:8042/dicom-web"
PROXY = "https://edge.example.org/dicomweb"
UID = st.lists(st.integers(0, 99999), min_size=3, max_size=8).map(lambda xs: "1." + ".".join(map(str, xs)))
NUMBER = st.sampled_from(["1.50", "0.0", "-0.0", "1e5", "2.5E-3", "100", "-7", "3.14159265358979",
                          "1.0000000000000001"])
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)
URL_KIND = st.sampled_from(["study", "series", "instance", "bulk", "relative-bulk"])


def _url(kind: str, study: str, series: str, sop: str, escaped: bool) -> str:
    path = {"study": f"/studies/{study}", "series": f"/studies/{study}/series/{series}",
            "instance": f"/studies/{study}/series/{series}/instances/{sop}",
            "bulk": f"/studies/{study}/series/{series}/instances/{sop}/bulk/7fe00010",
            "relative-bulk": f"/studies/{study}/series/{series}/instances/{sop}/bulk/00420011"}[kind]
    url = ("/dicom-web" if kind == "relative-bulk" else ARCHIVE) + path
    return url.replace("/", "\\/") if escaped else url


@st.composite
def dicom_json(draw: st.DrawFn, depth: int = 0) -> tuple[list[str], list[str]]:
    """One dataset as JSON text pieces around URL slots: (pieces, urls), len(pieces) == len(urls) + 1."""
    pieces, urls, text = [], [], "{"
    study, series, sop = draw(UID), draw(UID), draw(UID)

    def member(tag: str, body: str) -> None:
        nonlocal text
        text += ("" if text.endswith("{") else ", ") + f'"{tag}": {body}'

    member("0020000D", f'{{"vr": "UI", "Value": ["{study}"]}}')
    member("00100010", '{"vr": "PN", "Value": [{"Alphabetic": ' + json.dumps(draw(TEXT), ensure_ascii=draw(
        st.booleans())) + "}]}")
    member("00081030", '{"vr": "LO", "Value": [' + json.dumps(draw(TEXT), ensure_ascii=False) + "]}")
    member("00400008", '{"vr": "LO", "Value": ["http://elsewhere.example/dicom-web/studies/1.2"]}')  # not ours
    member("00280030", '{"vr": "DS", "Value": [' + ", ".join(draw(st.lists(NUMBER, min_size=1, max_size=3))) + "]}")
    member("00181050", '{"vr": "FD", "Value": [' + draw(NUMBER) + "]}")
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(URL_KIND)
        tag, vr_key = ("00081190", '"vr": "UR", "Value": [') if kind in ("study", "series", "instance") else \
            ("7FE00010" if kind == "bulk" else "00420011", '"vr": "OB", "BulkDataURI": ')
        member(tag, "{" + vr_key)
        pieces.append(text + '"')
        urls.append(_url(kind, study, series, sop, draw(st.booleans())))
        text = '"' + ("]}" if kind in ("study", "series", "instance") else "}")
    if depth < 2 and draw(st.booleans()):
        items = draw(st.lists(dicom_json(depth + 1), min_size=1, max_size=2))
        member("00081115", '{"vr": "SQ", "Value": [')
        for i, (item_pieces, item_urls) in enumerate(items):
            text += (", " if i else "") + item_pieces[0]
            for p, u in zip(item_pieces[1:], item_urls, strict=True):
                pieces.append(text)
                urls.append(u)
                text = p
        text += "]}"
    pieces.append(text + "}")
    return pieces, urls


@settings(max_examples=80, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(dicom_json(), min_size=1, max_size=3))
def test_rewriting_changes_the_urls_and_nothing_else(datasets):
    """Every archive URL (absolute, server-relative, with `\\/` escapes, nested in sequences) points at the
    proxy afterwards; every other byte (numbers as written, unicode, other hosts' URLs) is unchanged."""
    pieces, urls = ["["], []
    for i, (ds_pieces, ds_urls) in enumerate(datasets):
        pieces[-1] += (", " if i else "") + ds_pieces[0]
        pieces += ds_pieces[1:]
        urls += ds_urls
    pieces[-1] += "]"
    body = "".join(p + u for p, u in zip(pieces, [*urls, ""], strict=True)).encode()
    json.loads(body)  # the generator makes valid JSON
    out = UrlRewriter("pacs", ARCHIVE).rewrite_json(body, PROXY)
    pattern = b"(.*?)".join(re.escape(p.encode()) for p in pieces)
    m = re.fullmatch(pattern, out, re.DOTALL)
    assert m, "something other than a URL changed"
    for new in m.groups():
        assert new.startswith(PROXY.encode() + b"/"), new
        assert b"127.0.0.1:8042" not in new and b"dicom-web" not in new
    assert len(m.groups()) == len(urls)
    json.loads(out)
