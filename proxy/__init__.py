"""dicomweb-edge: an edge proxy, federator and DICOM-aware cache for DICOMweb."""

__version__ = "0.1.0"
