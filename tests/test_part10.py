"""Reading a Part 10 instance's pixel layout without pydicom (proxy/part10.py), as the frame cache
splits instances that pass through (issue 4 point 4): the fast walk must cut exactly the frames a full
pydicom parse cuts, and hand everything it does not read back to pydicom."""

import copy

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from proxy.demo.synth import Patient, Study, ct_series, multiframe_jpeg, multiframe_native, to_part10
from proxy.formats import part10

STUDY = Study(Patient("PART^TEN", "P10"))


def with_nested_sequences(ds: Dataset) -> Dataset:
    """A sequence of undefined length (written so by pydicom) holding an item with its own sequence."""
    ds = copy.deepcopy(ds)
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D0050", "SRT", "Tissue"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, copy.deepcopy(item)])
    ds.ReferencedImageSequence.is_undefined_length = True
    ds[0x0008, 0x1140].is_undefined_length = True
    return ds


def implicit(ds: Dataset) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


CASES = {
    "ct-slice": lambda: next(ct_series(STUDY, 1, rows=64, cols=64)),
    "native-multiframe": lambda: multiframe_native(STUDY, n_frames=5, rows=32, cols=48),
    "jpeg-multiframe": lambda: multiframe_jpeg(STUDY, n_frames=4, tile=32),
    "rle": lambda: next(ct_series(STUDY, 1, rows=32, cols=32, rle=True)),
    "implicit-vr": lambda: implicit(multiframe_native(STUDY, n_frames=3, rows=16, cols=16)),
    "nested-sequences": lambda: with_nested_sequences(multiframe_native(STUDY, n_frames=2, rows=16, cols=16)),
    "nested-sequences-implicit": lambda: implicit(with_nested_sequences(next(ct_series(STUDY, 1, rows=16,
                                                                                     cols=16)))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_fast_walk_cuts_the_frames_pydicom_cuts(case):
    ds = CASES[case]()
    blob = to_part10(ds)
    part10.pixel_layout(blob)  # read by the walker, not handed back to pydicom
    frames, study, series = part10.frames_and_place(blob)
    expected = part10._frames_by_pydicom(blob)
    assert len(frames) == len(expected) == int(getattr(ds, "NumberOfFrames", 1) or 1)
    as_bytes = lambda fs: [(s, n, m, t, bytes(b)) for s, n, m, t, b in fs]  # noqa: E731
    assert as_bytes(frames) == as_bytes(expected)
    assert (study, series) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)  # where the frames belong


def test_what_the_walk_does_not_read_goes_to_pydicom():
    ds = multiframe_native(STUDY, n_frames=2, rows=16, cols=16)
    big = copy.deepcopy(ds)
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    with pytest.raises(part10.Unusual):
        part10.pixel_layout(to_part10(big))
    frames, study, series = part10.frames_and_place(to_part10(big))
    assert frames == part10._frames_by_pydicom(to_part10(big))  # both: nothing cut
    assert (study, series) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    blob = to_part10(ds)
    for cut in (200, len(blob) // 2, len(blob) - 10):  # truncated anywhere: no frame at all, short or whole
        try:
            frames = part10.frames_and_place(blob[:cut])[0]
        except Exception:  # pydicom's own error: learn_instance treats the part as unparseable
            continue
        assert frames == [], cut


def test_an_instance_without_pixel_data_has_no_frames():
    ds = multiframe_native(STUDY, n_frames=2, rows=16, cols=16)
    del ds.PixelData
    assert part10.pixel_layout(to_part10(ds)) is None
    assert part10.frames_and_place(to_part10(ds)) == ([], None, None)
