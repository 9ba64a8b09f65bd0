"""Synthetic DICOM studies for the demo, the tests and the benchmarks.

Everything is generated with pydicom, numpy and Pillow: no patient data, no downloads.
Each generator yields datasets one at a time, so a 300 MB series never sits in memory.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MF_GRAY_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
VL_WSM = "1.2.840.10008.5.1.4.1.1.77.1.6"


def new_uid() -> UID:
    """A fresh random UID."""
    return generate_uid(prefix=None)


@dataclass
class Patient:
    """Who a synthetic study belongs to."""

    name: str = "DOE^JOHN"
    patient_id: str = "PID001"
    birth_date: str = "19700101"
    sex: str = "O"
    charset: str = "ISO_IR 192"


@dataclass
class Study:
    """The study-level identity shared by every instance of a synthetic study."""

    patient: Patient = field(default_factory=Patient)
    study_uid: str = field(default_factory=new_uid)
    study_date: str = "20240115"
    study_time: str = "101500"
    accession: str = "ACC001"
    description: str = "SYNTH CT CHEST"


def _base(study: Study, sop_class: str, series_uid: str, modality: str, series_number: int,
          instance_number: int, series_desc: str, transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    sop_uid = new_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = study.patient.charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = study.study_date
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    ds.Manufacturer = "SYNTH"
    ds.ReferringPhysicianName = "REF^DOC"
    ds.StudyDescription = study.description
    ds.SeriesDescription = series_desc
    ds.PatientName = study.patient.name
    ds.PatientID = study.patient.patient_id
    ds.PatientBirthDate = study.patient.birth_date
    ds.PatientSex = study.patient.sex
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    return ds


def phantom(rows: int, cols: int, z: int, rng: np.random.Generator) -> np.ndarray:
    """A CT-like slice: body ellipse, two lungs, a spine whose size varies with z, and noise."""
    # slice(): mypy takes only integers in the `a:b:c` syntax, and a complex step is ogrid's point count
    y, x = np.ogrid[slice(-1, 1, rows * 1j), slice(-1, 1, cols * 1j)]
    img = np.full((rows, cols), -1000, dtype=np.float32)
    img[(x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1] = 40
    img[((x + 0.35) / 0.18) ** 2 + (y / 0.3) ** 2 <= 1] = -800
    img[((x - 0.35) / 0.18) ** 2 + (y / 0.3) ** 2 <= 1] = -800
    r = 0.08 + 0.04 * np.sin(z / 7.0)
    img[(x**2 + (y - 0.4) ** 2) <= r**2] = 700
    img += rng.normal(0, 12, size=(rows, cols)).astype(np.float32)
    return np.clip(img + 1024, 0, 4095).astype(np.uint16)


def _grayscale16(ds: Dataset, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0


def ct_series(study: Study, n_slices: int = 20, rows: int = 512, cols: int = 512,
              series_uid: str | None = None, series_number: int = 1, seed: int = 0,
              rle: bool = False) -> Iterator[Dataset]:
    """A CT series of `n_slices` single-frame 16-bit slices (512x512 slices are 524,288 pixel bytes)."""
    series_uid = series_uid or new_uid()
    rng = np.random.default_rng(seed)
    ts = RLELossless if rle else ExplicitVRLittleEndian
    for i in range(n_slices):
        ds = _base(study, CT_IMAGE_STORAGE, series_uid, "CT", series_number, i + 1,
                   "AXIAL 1.25mm" if not rle else "AXIAL RLE", ts)
        ds.FrameOfReferenceUID = series_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = "1.25"
        ds.KVP = "120"
        ds.ImagePositionPatient = [-250.0, -250.0, -i * 1.25]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{-i * 1.25:.2f}"
        ds.PixelSpacing = [0.9765625, 0.9765625]
        _grayscale16(ds, rows, cols)
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1.50" if i == 0 else "1"  # a DS whose text must survive a proxy unchanged
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        pixels = phantom(rows, cols, i, rng)
        if rle:
            ds.PixelData = b""  # set below, pydicom encodes in place
            ds.compress(RLELossless, pixels, encoding_plugin="pydicom")
        else:
            ds.PixelData = pixels.tobytes()
        yield ds


def multiframe_native(study: Study, n_frames: int = 10, rows: int = 256, cols: int = 256,
                      seed: int = 1) -> Dataset:
    """One uncompressed multi-frame grayscale instance (Multi-frame Grayscale Word SC)."""
    rng = np.random.default_rng(seed)
    ds = _base(study, MF_GRAY_WORD_SC, new_uid(), "OT", 1, 1, "MF 16bit native")
    _grayscale16(ds, rows, cols)
    ds.NumberOfFrames = n_frames
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = "33.3"
    ds.PixelData = np.stack([phantom(rows, cols, i, rng) for i in range(n_frames)]).tobytes()
    return ds


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


# What a whole-slide viewer (OHIF's, dicom-microscopy-viewer) needs to place the tiles on the slide.
SLIDE_KEYWORDS = ("ImageOrientationSlide", "ImagedVolumeWidth", "ImagedVolumeHeight", "ImagedVolumeDepth",
                  "TotalPixelMatrixFocalPlanes", "TotalPixelMatrixOriginSequence", "SharedFunctionalGroupsSequence",
                  "NumberOfOpticalPaths", "OpticalPathSequence", "ContainerIdentifier", "ContainerTypeCodeSequence",
                  "SpecimenDescriptionSequence", "FrameOfReferenceUID", "VolumetricProperties",
                  "SpecimenLabelInImage", "FocusMethod", "ExtendedDepthOfField")


def _slide(ds: Dataset, columns: int, rows: int, spacing_mm: float = 0.0005) -> None:
    """Whole-slide image attributes (PS3.3 A.32.8) for a single-level, single-focal-plane slide."""
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.ImagedVolumeWidth = columns * spacing_mm
    ds.ImagedVolumeHeight = rows * spacing_mm
    ds.ImagedVolumeDepth = 0.001
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.TotalPixelMatrixOriginSequence = [_item(XOffsetInSlideCoordinateSystem=20.0,
                                               YOffsetInSlideCoordinateSystem=40.0)]
    ds.SharedFunctionalGroupsSequence = [_item(PixelMeasuresSequence=[
        _item(PixelSpacing=[spacing_mm, spacing_mm], SliceThickness=0.001)])]
    ds.NumberOfOpticalPaths = 1
    ds.OpticalPathSequence = [_item(
        OpticalPathIdentifier="1",
        IlluminationTypeCodeSequence=[_code("111744", "DCM", "Brightfield illumination")],
        IlluminationColorCodeSequence=[_code("414298005", "SCT", "Full Spectrum")])]
    ds.ContainerIdentifier = "SLIDE-1"
    ds.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
    ds.SpecimenDescriptionSequence = [_item(SpecimenIdentifier="SPECIMEN-1", SpecimenUID=new_uid(),
                                            SpecimenPreparationSequence=[])]
    ds.FrameOfReferenceUID = new_uid()
    ds.VolumetricProperties = "VOLUME"
    ds.SpecimenLabelInImage = "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"


def multiframe_jpeg(study: Study, n_frames: int = 12, tile: int = 128, seed: int = 2,
                    quality: int = 85) -> Dataset:
    """A slide-like RGB multi-frame instance, each frame encapsulated JPEG Baseline (compressed)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ds = _base(study, VL_WSM, new_uid(), "SM", 1, 1, "WSI level 0", JPEGBaseline8Bit)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = n_frames
    ds.Rows = ds.Columns = tile
    across = int(np.ceil(np.sqrt(n_frames)))  # TILED_FULL: the frames fill the matrix row by row
    ds.TotalPixelMatrixColumns = across * tile
    ds.TotalPixelMatrixRows = int(np.ceil(n_frames / across)) * tile
    ds.DimensionOrganizationType = "TILED_FULL"
    _slide(ds, ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    yy, xx = np.mgrid[0:tile, 0:tile]
    frames = []
    for i in range(n_frames):
        base = np.stack([(xx + i * 7) % 256, (yy * 2 + i * 3) % 256, ((xx + yy) // 2) % 256], -1)
        arr = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality)
        frames.append(buf.getvalue())
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def to_part10(ds: Dataset) -> bytes:
    """Serialise a dataset as a DICOM Part 10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class DemoSet:
    """The demo layout: what goes to archive A, what goes to archive B, and the notable UIDs."""

    archive_a: list[Dataset]
    archive_b: list[Dataset]
    uids: dict[str, str]


def demo_set(ct_slices: int = 20) -> DemoSet:
    """Studies for two sample archives.

    A: a CT series; a compressed (JPEG) multi-frame slide. B: a native multi-frame instance; a study
    with a non-Latin patient name. Both: a study split across the two archives (series 1 on A, series 2
    on B, one instance of series 1 on both).
    """
    ct = Study(Patient("DOE^JOHN", "PID001"), study_date="20240115", accession="ACC001")
    slide = Study(Patient("POE^EDGAR", "PID003"), study_date="20220505", accession="ACC003",
                  description="SYNTH SLIDE")
    mf = Study(Patient("ROE^RICHARD", "PID002"), study_date="20231010", accession="ACC002",
               description="SYNTH MULTIFRAME")
    intl = Study(Patient("Müller^Jörg=ミュラー^ヨルク", "PID004"), study_date="20230301",
                 accession="ACC005", description="Thorax Übersicht")
    split = Study(Patient("SMITH^JANE", "PID005"), study_date="20230601", accession="ACC004",
                  description="SHARED STUDY")
    a = list(ct_series(ct, ct_slices))
    a.append(multiframe_jpeg(slide))
    b = [multiframe_native(mf)]
    b.extend(ct_series(intl, 3, rows=128, cols=128, seed=4))
    split_1 = list(ct_series(split, 4, rows=128, cols=128, series_number=1, seed=5))
    split_2 = list(ct_series(split, 3, rows=128, cols=128, series_number=2, seed=6))
    a.extend(split_1)
    b.extend(split_2)
    b.append(split_1[0])
    uids = {
        "ct_study": ct.study_uid,
        "ct_series": a[0].SeriesInstanceUID,
        "slide_study": slide.study_uid,
        "multiframe_study": mf.study_uid,
        "international_study": intl.study_uid,
        "split_study": split.study_uid,
    }
    return DemoSet(a, b, uids)
