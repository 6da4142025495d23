"""Data: cohort ingest into the de-identified store, the patient-level split, synthetic cohorts."""
