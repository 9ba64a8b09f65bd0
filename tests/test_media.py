"""Accept parsing and negotiation (RFC 7231 §5.3, PS3.18 §8.7)."""

import pytest

from proxy.formats.media import (
    EXPLICIT_VR_LE,
    BadAccept,
    NotAcceptable,
    Resource,
    negotiate,
    parse_accept,
    parse_content_type,
)


def test_quoted_and_unquoted_type_are_the_same():
    """type="application/dicom" and type=application/dicom are equivalent (PS3.18 §8.7)."""
    a = negotiate('multipart/related; type="application/dicom"; transfer-syntax=*', Resource.INSTANCES)
    b = negotiate("multipart/related; type=application/dicom; transfer-syntax=*", Resource.INSTANCES)
    assert a == b and a.multipart and a.transfer_syntax == "*"


def test_cornerstone_unquoted_frames_accept():
    """cornerstone's unquoted string."""
    sel = negotiate("multipart/related; type=application/octet-stream; transfer-syntax=*", Resource.FRAMES)
    assert (sel.multipart, sel.media_type, sel.transfer_syntax) == (True, "application/octet-stream", "*")


def test_ohif_combined_metadata_accept():
    """OHIF's combined Accept on metadata picks JSON."""
    sel = negotiate("application/dicom+json, multipart/related; type=application/octet-stream; transfer-syntax=*",
                    Resource.JSON)
    assert sel.media_type == "application/dicom+json"


def test_q_values_order_and_q_zero_excludes():
    ranges = parse_accept('image/png;q=0.5, image/jpeg, image/gif;q=0')
    assert [r.type for r in ranges] == ["image/jpeg", "image/png"]
    assert negotiate("image/png;q=0.9, image/jpeg;q=0.1", Resource.RENDERED).media_type == "image/png"


def test_quoted_comma_does_not_split_ranges():
    ranges = parse_accept('multipart/related; type="image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.70", */*;q=0.1')
    assert len(ranges) == 2
    assert ranges[0].transfer_syntax == "1.2.840.10008.1.2.4.70"  # Orthanc-style ts inside type


def test_wildcards_give_the_resource_default():
    """No Accept or */* means uncompressed frames, Explicit VR Little Endian (PS3.18 §8.7.3)."""
    for accept in (None, "", "*/*", "multipart/related", 'multipart/related; type="*/*"'):
        sel = negotiate(accept, Resource.FRAMES)
        assert (sel.media_type, sel.transfer_syntax) == ("application/octet-stream", EXPLICIT_VR_LE)


def test_image_type_wildcard_and_default_ts():
    sel = negotiate('multipart/related; type="image/jpeg"', Resource.FRAMES)
    assert sel.transfer_syntax == "1.2.840.10008.1.2.4.50"


def test_single_part_only_for_single_items():
    """Single-part media types only where one item is returned (PS3.18 §10.4.4)."""
    assert not negotiate("application/dicom", Resource.INSTANCE, single_item=True).multipart
    with pytest.raises(NotAcceptable):
        negotiate("application/dicom", Resource.INSTANCES)
    with pytest.raises(NotAcceptable):
        negotiate("application/octet-stream", Resource.FRAMES, single_item=False)


def test_nothing_acceptable_is_406():
    """Nothing acceptable is the proxy's own 406, never a 400."""
    with pytest.raises(NotAcceptable):
        negotiate("text/html", Resource.FRAMES)
    with pytest.raises(NotAcceptable):
        negotiate("image/png", Resource.INSTANCES)
    with pytest.raises(NotAcceptable):
        negotiate("application/dicom+xml", Resource.JSON)


@pytest.mark.parametrize("bad", ["garbage", "image/jpeg;q=2", "image/jpeg;q=x",
                                 "multipart/related; type=application/dicom; transfer-syntax=1.2.x"])
def test_malformed_accept(bad):
    with pytest.raises(BadAccept):
        negotiate(bad, Resource.INSTANCES)


def test_boundary_in_accept_is_ignored():
    sel = negotiate('multipart/related; type="application/dicom";transfer-syntax=1.2.840.10008.1.2.4.50;boundary=**',
                    Resource.INSTANCES)
    assert sel.transfer_syntax == "1.2.840.10008.1.2.4.50"


def test_parse_content_type():
    mtype, params = parse_content_type('multipart/related; type="image/jpeg; transfer-syntax=1.2"; boundary=abc')
    assert mtype == "multipart/related"
    assert params == {"type": "image/jpeg; transfer-syntax=1.2", "boundary": "abc"}
