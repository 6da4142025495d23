"""Shared fixtures: tiny synthetic cohorts in tmp_path, the real params, a throwaway key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.config import Params, load_params
from pipelines.deid.core import Pseudonymizer

ROOT = Path(__file__).resolve().parents[1]
TEST_KEY = "test-key-not-a-secret-0123456789abcdef"


@pytest.fixture(scope="session")
def params() -> Params:
    return load_params(ROOT / "params.yaml")


@pytest.fixture()
def pseudo() -> Pseudonymizer:
    return Pseudonymizer(TEST_KEY.encode(), 365)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """12 patients, all three vendor styles, DICOM and PNG (read-only for tests: copy it)."""
    from pipelines.data.synth import synth_cohort

    out = tmp_path_factory.mktemp("cohort") / "export"
    synth_cohort(out, 12, 5, ("aurora", "boreal", "cirrus"), png_fraction=0.2)
    return out


@pytest.fixture()
def cohort_copy(small_cohort: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "export"
    shutil.copytree(small_cohort, dest)
    return dest


@pytest.fixture()
def mlflow_registry(tmp_path, monkeypatch):
    """A throwaway MLflow tracking server and registry (sqlite) in tmp_path; its URI."""
    import mlflow

    from pipelines.registry import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.setup(uri, tmp_path / "mlartifacts")
    yield uri
    mlflow.set_tracking_uri("")


def write_cine(src, dst, n: int, study: str | None = None) -> None:
    """`src`'s frame repeated `n` times as an uncompressed multi-frame DICOM (a cine)."""
    import numpy as np
    import pydicom

    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    if ds.get("SamplesPerPixel", 1) == 3:
        ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.PixelData = np.ascontiguousarray(np.stack([arr] * n)).tobytes()
    ds.NumberOfFrames = n
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    if study:
        ds.StudyInstanceUID = study
    ds.save_as(dst, enforce_file_format=True)
