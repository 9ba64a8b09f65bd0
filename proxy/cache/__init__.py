"""The DICOM-aware cache: keys, the memory tier, the shared disk tier, its writer and purges."""
