"""The streaming multipart reader and writer (RFC 2046 §5.1: boundary, delimiters, preamble)."""

import random

import pytest

from proxy.formats.multipart import MultipartError, MultipartReader, MultipartWriter, PartEnd, PartHeaders


def _frame(parts, boundary="b0und"):
    w = MultipartWriter(boundary)
    body = b"".join(w.part("application/octet-stream", f"loc{i}", len(p)) + p for i, p in enumerate(parts))
    return body + w.close()


def _parse(body, boundary, sizes):
    reader = MultipartReader(boundary)
    out, cur, headers = [], None, []
    pos = 0
    for n in sizes:
        for ev in reader.feed(body[pos : pos + n]):
            if isinstance(ev, PartHeaders):
                cur = b""
                headers.append(ev.headers)
            elif isinstance(ev, PartEnd):
                out.append(cur)
            else:
                cur += bytes(ev)
        pos += n
    reader.close()
    return out, headers


TRICKY = [b"x" * 1000 + b"\r\n--b0un" + b"y" * 10, b"", b"\r\n", b"abc\r\n--b0un", b"\r", b"--b0und"]


@pytest.mark.parametrize("seed", range(40))
def test_any_chunking_gives_the_same_parts(seed):
    body = _frame(TRICKY)
    rng = random.Random(seed)
    sizes = []
    while sum(sizes) < len(body):
        sizes.append(rng.randint(1, 64))
    parts, headers = _parse(body, "b0und", sizes)
    assert parts == TRICKY
    assert [h["content-location"] for h in headers] == [f"loc{i}" for i in range(len(TRICKY))]


def test_preamble_crlf_and_padding_tolerated():
    """dicomweb-client starts STOW bodies with CRLF; transport padding may follow a delimiter."""
    body = b"\r\n--B  \r\nContent-Type: a/b\r\n\r\nhello\r\n--B--\r\n"
    assert _parse(body, "B", [len(body)])[0] == [b"hello"]


def test_truncated_body_is_detected():
    body = _frame([b"abc", b"def"])[:-12]
    with pytest.raises(MultipartError):
        _parse(body, "b0und", [7] * (len(body) // 7 + 1))


def test_wrong_boundary_is_detected():
    body = _frame([b"abc"], boundary="other") + b"x" * 20000
    with pytest.raises(MultipartError):
        _parse(body, "b0und", [len(body)])


def test_large_chunks_pass_through_without_copy():
    payload = bytes(range(256)) * 4096
    w = MultipartWriter("B")
    head = w.part("application/dicom", content_length=len(payload))
    reader = MultipartReader("B")
    list(reader.feed(head))
    events = list(reader.feed(payload))
    assert len(events) == 1 and events[0] is payload  # handed on as is: no copy


def test_writer_spelling_and_boundary():
    """Random boundary, exact 'Content-Type:' spelling (cornerstone matches it case-sensitively), no preamble."""
    w1, w2 = MultipartWriter(), MultipartWriter()
    assert w1.boundary != w2.boundary and len(w1.boundary) >= 32 and w1.boundary.isalnum()
    first = w1.part("application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1", "http://x/frames/1", 4)
    assert first.startswith(f"--{w1.boundary}\r\nContent-Type: application/octet-stream; transfer-syntax=".encode())
    assert w1.part("a/b").startswith(b"\r\n--")
    expected = f'multipart/related; type="application/dicom"; boundary={w1.boundary}'
    assert w1.content_type("application/dicom") == expected


@pytest.mark.parametrize("seed", range(10))
def test_memoryview_chunks_and_parts_without_length(seed):
    """Pieces from the upstream transport are memoryviews; parts may or may not declare a length."""
    w = MultipartWriter("b0und")
    body = b"".join(w.part("a/b", content_length=len(p) if i % 2 else None) + p for i, p in enumerate(TRICKY))
    body = memoryview(bytearray(body + w.close()))
    rng = random.Random(seed)
    reader, parts, cur, pos = MultipartReader("b0und"), [], None, 0
    while pos < len(body):
        n = rng.randint(1, 64)
        for ev in reader.feed(body[pos : pos + n]):
            if isinstance(ev, PartHeaders):
                cur = b""
            elif isinstance(ev, PartEnd):
                parts.append(cur)
            else:
                cur += bytes(ev)
        pos += n
    reader.close()
    assert parts == TRICKY


def test_part_longer_than_its_content_length_is_an_error():
    body = b"--B\r\nContent-Length: 3\r\n\r\nabcdef\r\n--B--\r\n"
    with pytest.raises(MultipartError):
        _parse(body, "B", [len(body)])


def test_counted_part_bytes_can_go_past_the_parser():
    """splice.py relays the rest of a counted part without feeding it: the parser is told (`skip`) and
    goes on at the delimiter that follows; it refuses a skip outside a counted part or past its end."""
    payloads = [bytes(range(256)) * 40, b"second part"]
    body = _frame(payloads)
    reader = MultipartReader("b0und")
    head_end = body.index(b"\r\n\r\n") + 4
    events = list(reader.feed(body[: head_end + 100]))  # headers and the first 100 payload bytes
    assert isinstance(events[0], PartHeaders) and b"".join(events[1:]) == payloads[0][:100]
    assert reader.counted_left() == len(payloads[0]) - 100
    with pytest.raises(MultipartError):
        reader.skip(len(payloads[0]))  # more than is left
    reader.skip(len(payloads[0]) - 100)  # relayed elsewhere
    assert reader.counted_left() == 0
    rest = list(reader.feed(body[head_end + len(payloads[0]) :]))
    assert isinstance(rest[0], PartEnd) and isinstance(rest[1], PartHeaders)
    assert b"".join(e for e in rest if isinstance(e, bytes | memoryview)) == payloads[1]
    assert reader.done and reader.counted_left() is None
    with pytest.raises(MultipartError):
        reader.skip(1)


def test_part_headers_longer_than_the_first_look_are_found_in_memoryview_chunks():
    """The parser first copies 1 KB of a memoryview chunk to find a delimiter or the end of the headers,
    and looks further when the chunk holds more: long headers in one chunk are not mistaken for a wait."""
    w = MultipartWriter("b0und")
    long_location = "http://archive.example/" + "x" * 3000
    body = w.part("application/octet-stream", long_location, 5) + b"hello" + w.close()
    reader = MultipartReader("b0und")
    events = list(reader.feed(memoryview(body)))
    assert isinstance(events[0], PartHeaders) and events[0].headers["content-location"] == long_location
    assert bytes(events[1]) == b"hello" and isinstance(events[2], PartEnd) and reader.done


def test_whole_keeps_a_part_received_into_its_own_buffer_and_copies_anything_else():
    """parts.whole: the buffer part_payload received a part into is the payload itself (no copy); a
    slice of a larger receive buffer is copied (kept, it would hold all of that buffer), pieces joined."""
    from proxy.formats.multipart import whole

    own = memoryview(bytearray(b"abcdef")).toreadonly()
    assert whole([own]) is own
    receive_buffer = bytearray(b"xxabcdefyy")
    piece = memoryview(receive_buffer)[2:8]
    kept = whole([piece])
    assert kept == b"abcdef" and isinstance(kept, bytes)
    receive_buffer[2:4] = b"ZZ"  # the transport reuses its buffer: what was kept does not change
    assert kept == b"abcdef"
    assert whole([b"ab", memoryview(b"cd"), b"ef"]) == b"abcdef"
    writable_whole = memoryview(bytearray(b"abc"))  # not marked read-only: not one of part_payload's
    assert isinstance(whole([writable_whole]), bytes)
