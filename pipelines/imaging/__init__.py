"""Imaging: the one reader of scans (DICOM, PNG/JPEG with sidecar) and the anatomical frame."""
