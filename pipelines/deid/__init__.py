"""De-identification: the PS3.15 header profile, pixel cleaning, OCR verification, folders in parallel."""
