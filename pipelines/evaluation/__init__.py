"""Evaluation: discrimination, calibration, the operating point, per-subgroup metrics."""
