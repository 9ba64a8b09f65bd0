"""Pure formats: Accept negotiation, multipart, re-framing, Part 10, DICOM JSON. Nothing of the proxy."""
