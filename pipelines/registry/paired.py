"""Two logged runs compared on the same frozen test images: the AUC difference with an interval
and p-value from a bootstrap over patients. The reviewer report (`cbh compare`) shows it and
the promotion gate decides on its lower bound.

Each run logs its test predictions (`evaluation/test_predictions.csv`: image, actual,
probability); the workspace's frozen test table names each image's patient. Where that table is
another version than the one both runs were evaluated on, or absent, images are the unit and
the result says so.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from pipelines.evaluation.metrics import paired_auc_difference


def run_table(run_id: str, name: str) -> pd.DataFrame | None:
    """A table a run logged under `evaluation/` (None when the run has none)."""
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/{name}.csv")
    except Exception:  # boundary: an older run without this artifact
        return None
    return pd.read_csv(io.StringIO(text)) if text else None


@dataclass(frozen=True)
class Paired:
    """AUC(other) - AUC(ref) on the images both scored."""

    images: int
    unit: str                 # "patients" or "images"
    units: int
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    n_boot: float

    def interval(self) -> str:
        return f"{self.difference:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}]"


def patients_of(frozen: Path | None, test_md5: str | None) -> dict[str, str]:
    """image_id -> patient pseudonym from the frozen test table, if it is the version `test_md5`."""
    from pipelines.registry.lineage import md5_file

    if frozen is None or not frozen.is_file() or not test_md5 or md5_file(frozen) != test_md5:
        return {}
    table = pd.read_parquet(frozen, columns=["image_id", "patient_pseudo"])
    return dict(zip(table["image_id"].astype(str), table["patient_pseudo"].astype(str), strict=True))


def paired(ref: pd.DataFrame, other: pd.DataFrame, patients: dict[str, str], n_boot: int, seed: int) -> Paired:
    """The paired difference of two test-prediction tables (`run_table(..., "test_predictions")`)."""
    both = ref.merge(other, on="image_id", suffixes=("_ref", "_other"))
    both = both[both["actual_ref"] == both["actual_other"]]
    ids = both["image_id"].astype(str)
    by_patient = bool(patients) and bool(ids.isin(patients).all())
    unit = ids.map(patients) if by_patient else ids
    r = paired_auc_difference((both["actual_ref"] == "hypoplasia").to_numpy().astype(int),
                              both["probability_ref"].to_numpy(), both["probability_other"].to_numpy(),
                              unit.to_numpy(), n_boot, seed)
    return Paired(len(both), "patients" if by_patient else "images", int(unit.nunique()), r["difference"],
                  r["ci_low"], r["ci_high"], r["p_value"], r["n_boot"])


def paired_runs(ref_run: str, other_run: str, frozen: Path | None, test_md5: str | None, n_boot: int,
                seed: int) -> Paired | None:
    """`paired` of two runs' logged predictions; None when either has none."""
    ref, other = run_table(ref_run, "test_predictions"), run_table(other_run, "test_predictions")
    if ref is None or other is None:
        return None
    return paired(ref, other, patients_of(frozen, test_md5), n_boot, seed)
