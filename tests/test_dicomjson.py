"""URL rewriting inside DICOM JSON: only the URLs change, at any depth; number text is kept."""

import pytest

from proxy.formats.dicomjson import BadToken, UrlRewriter, decode_token, encode_token

ARCHIVE = "http://127.0.0.1:8042/dicom-web"
PROXY = "https://edge.example:8443/dicomweb"


def test_only_urls_change_number_text_survives():
    """`1.50` and `1E2` keep their text; nested BulkDataURIs are rewritten."""
    body = (b'[{"00281053":{"vr":"DS","Value":[1.50, 1E2]},'
            b'"00400275":{"vr":"SQ","Value":[{"7FE00010":{"vr":"OW","BulkDataURI":'
            b'"http://127.0.0.1:8042/dicom-web/studies/1.2/series/3.4/instances/5.6/bulk/7fe00010"}}]},'
            b'"00081190":{"vr":"UR","Value":["http:\\/\\/127.0.0.1:8042\\/dicom-web\\/studies\\/1.2"]},'
            b'"00100010":{"vr":"PN","Value":[{"Alphabetic":"http://127.0.0.1:8042/dicom-webx"}]}}]')
    out = UrlRewriter("a", ARCHIVE).rewrite_json(body, PROXY)
    assert b"[1.50, 1E2]" in out
    assert f'"{PROXY}/studies/1.2/series/3.4/instances/5.6/bulk/7fe00010"'.encode() in out
    assert f'"{PROXY}/studies/1.2"'.encode() in out
    assert b'"http://127.0.0.1:8042/dicom-webx"' in out  # not one of the archive's URLs
    # Everything but the URLs is byte for byte the same.
    rest = out.replace(f"{PROXY}/studies/1.2/series/3.4/instances/5.6/bulk/7fe00010".encode(), b"U1")
    rest = rest.replace(f"{PROXY}/studies/1.2".encode(), b"U2")
    orig = body.replace(b"http://127.0.0.1:8042/dicom-web/studies/1.2/series/3.4/instances/5.6/bulk/7fe00010", b"U1")
    orig = orig.replace(b"http:\\/\\/127.0.0.1:8042\\/dicom-web\\/studies\\/1.2", b"U2")
    assert rest == orig


def test_server_relative_and_aliases():
    r = UrlRewriter("a", ARCHIVE, aliases=["http://localhost/dicom-web"])
    body = b'["/dicom-web/studies/1", "http://localhost/dicom-web/studies/2"]'
    assert r.rewrite_json(body, PROXY) == f'["{PROXY}/studies/1", "{PROXY}/studies/2"]'.encode()


def test_non_study_paths_become_opaque_tokens():
    r = UrlRewriter("pacs", ARCHIVE)
    url = r.rewrite_url(ARCHIVE + "/bulkdata/abc?x=1", PROXY)
    assert url.startswith(PROXY + "/bulk/pacs/")
    assert decode_token(url.rsplit("/", 1)[1], r.key, "pacs") == "/bulkdata/abc?x=1"
    with pytest.raises(BadToken):
        decode_token(url.rsplit("/", 1)[1], r.key, "other archive")  # bound to the archive it names
    with pytest.raises(BadToken):
        decode_token(url.rsplit("/", 1)[1], b"another key", "pacs")


@pytest.mark.parametrize("remainder", ["/../../etc/passwd", "relative", "/a\\b", "/a/./b"])
def test_tokens_cannot_escape_the_archive(remainder):
    with pytest.raises(BadToken):
        decode_token(encode_token(remainder, b"k", "a"), b"k", "a")
    with pytest.raises(BadToken):
        decode_token("!!!not-base64", b"k", "a")
