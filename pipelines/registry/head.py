"""The fetal-head localiser in the registry: its MLflow run, its pyfunc (`fetal-head`), its
model card, and its promotion gate.

Same aliases (`challenger`, `champion`), decision tags and audit trail as the diagnosis model
(pipelines/registry/promote.py); the gate is on the head's own test metrics: Dice of the head
region, mean absolute HC error in mm, and the share of frames refused.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from pipelines.config import HeadSection
from pipelines.locks import exclusive_lock
from pipelines.registry import promote as gatekeeper
from pipelines.registry import tracking
from pipelines.registry.audit import Trail

EXPERIMENT = "fetal-head"
GATED = ("test_dice_mean", "test_hc_mae_mean", "test_refused_share")
INTENDED_USE = ("Research: the fetal head's ellipse and head circumference (HC) in a transventricular or "
                "transthalamic plane, and the refusal of frames without a measurable head.")
NOT_CLINICAL = "Not for clinical use; not a medical device."
LIMITATIONS = [
    "HC18 frames come from one centre and two scanner models; other scanners and planes may differ.",
    "A refused frame ('head not found') carries no HC: the localiser does not guess.",
    "HC is Ramanujan's perimeter of the fitted ellipse; the sonographer's calliper placement may differ.",
]


def setup(tracking_uri: str, artifacts: Path) -> None:
    """The workspace's tracking store (tracking.setup) and the `fetal-head` experiment."""
    tracking.setup(tracking_uri, artifacts)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        served = mlflow.get_tracking_uri().startswith(("http://", "https://"))
        mlflow.create_experiment(EXPERIMENT, artifact_location=None if served else artifacts.resolve().as_uri())
    mlflow.set_experiment(EXPERIMENT)


def signature() -> ModelSignature:
    inputs = Schema([ColSpec("string", "image"), ColSpec("double", "pixel_spacing_mm", required=False)])
    outputs = Schema([ColSpec("double", "hc_mm", required=False), ColSpec("boolean", "head_found"),
                      ColSpec("string", "reason")])
    return ModelSignature(inputs=inputs, outputs=outputs)


class HeadModel(mlflow.pyfunc.PythonModel):
    """The head localiser behind MLflow's pyfunc: base64 PNG/DICOM in, HC out (one row per
    input row, the first frame of a multi-frame DICOM)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from pipelines.imaging.head import HeadLocaliser

        self.localiser = HeadLocaliser.load(Path(context.artifacts["head"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        spacing = model_input["pixel_spacing_mm"] if "pixel_spacing_mm" in model_input else [None] * len(model_input)
        rows = [self._one(str(image), sp) for image, sp in zip(model_input["image"], spacing, strict=True)]
        return pd.DataFrame(rows, columns=["hc_mm", "head_found", "reason"])

    def _one(self, payload: str, spacing: Any) -> dict[str, Any]:
        from pipelines.imaging.scan import ScanError, read_scan

        try:
            raw = base64.b64decode(payload, validate=True)
        except (ValueError, TypeError):
            return {"hc_mm": math.nan, "head_found": False, "reason": "image is not valid base64"}
        try:
            scan = read_scan(raw, spacing=spacing)
        except (ScanError, ValueError, TypeError) as exc:
            return {"hc_mm": math.nan, "head_found": False, "reason": str(exc)}
        if scan.spacing is None:
            return {"hc_mm": math.nan, "head_found": False,
                    "reason": "pixel spacing unknown: give pixel_spacing_mm for PNG/JPEG"}
        fit = self.localiser.locate(scan.frames[0], scan.spacing)
        return {"hc_mm": fit.hc_mm if fit.found else math.nan, "head_found": bool(fit.found),
                "reason": "" if fit.found else fit.reason}


def card(metrics: dict[str, float], split: dict[str, int], tags: dict[str, str]) -> tuple[dict[str, Any], str]:
    """The model card: metadata (JSON) and Markdown."""
    test = {k: v for k, v in metrics.items() if k.startswith("test_")}
    meta = {"name": EXPERIMENT, "intended_use": INTENDED_USE, "disclaimer": NOT_CLINICAL,
            "limitations": LIMITATIONS, "lineage": tags, "training_data": {"frames_per_split": split},
            "metrics": test, "inputs": {"image": "base64 PNG or DICOM", "pixel_spacing_mm": "required for PNG/JPEG"}}

    def f(key: str, digits: int = 3) -> str:
        return f"{test[key]:.{digits}f}" if key in test else "n/a"

    lines = [f"# Model card: {EXPERIMENT}", "", f"**{NOT_CLINICAL}**", "", "## Intended use", INTENDED_USE, "",
             "## Test metrics (test subjects, looked at once)",
             f"- Dice of the head region {f('test_dice_mean')}",
             f"- HC absolute error: mean {f('test_hc_mae_mean', 2)} mm, median {f('test_hc_mae_median', 2)} mm, "
             f"90th centile {f('test_hc_mae_p90', 2)} mm; bias {f('test_hc_bias_mean', 2)} mm",
             f"- frames refused {f('test_refused_share')}", "", "## Training data (frames per split)"]
    lines += [f"- {k}: {v}" for k, v in split.items()]
    lines += ["", "## Lineage"] + [f"- {k}: {v}" for k, v in tags.items()]
    lines += ["", "## Limitations"] + [f"- {x}" for x in LIMITATIONS]
    return meta, "\n".join(lines) + "\n"


def log_head_run(*, params_flat: dict[str, Any], metrics: dict[str, float], tags: dict[str, str],
                 head_dir: Path, split: dict[str, int], model_name: str,
                 lineage_dir: Path | None = None, input_example: pd.DataFrame | None = None) -> tuple[str, str]:
    """Log one run of the head localiser and register its pyfunc as `challenger`; returns
    (run_id, model version)."""
    meta, markdown = card(metrics, split, tags)
    with mlflow.start_run(run_name="head") as run:
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, tuple, dict)) else v)
                           for k, v in params_flat.items()})
        mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})   # NaN-free
        mlflow.set_tags(tags)
        mlflow.log_artifacts(str(head_dir), "head")
        if lineage_dir is not None:
            mlflow.log_artifacts(str(lineage_dir), "lineage")
        mlflow.log_dict(meta, "model_card/metadata.json")
        mlflow.log_text(markdown, "model_card/model_card.md")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=HeadModel(), artifacts={"head": str(head_dir)}, signature=signature(),
            input_example=input_example, registered_model_name=model_name,
            code_paths=tracking.code_paths(), pip_requirements=tracking.requirements())
        version = str(info.registered_model_version)
        MlflowClient().set_logged_model_tags(info.model_id, tags)
    client = MlflowClient()
    client.update_model_version(model_name, version, description=markdown)
    client.set_registered_model_alias(model_name, "challenger", version)
    for k, v in {**tags, **{f"metric.{k}": f"{v:.4f}" for k, v in metrics.items()}}.items():
        client.set_model_version_tag(model_name, version, k, v)
    return run.info.run_id, version


def gate(challenger: dict[str, float], champion: dict[str, float] | None, p: HeadSection) -> tuple[bool, str]:
    """The head's promotion rule; returns (passed, reason). A NaN never passes."""
    dice, mae, refused = (challenger.get(k, math.nan) for k in GATED)
    if not dice >= p.min_dice:
        return False, f"test Dice {dice:.3f} is below the floor {p.min_dice:.3f}"
    if not mae <= p.max_hc_mae_mm:
        return False, f"test HC error {mae:.2f} mm is above the bound {p.max_hc_mae_mm:.2f} mm"
    if not refused <= p.max_refused:
        return False, f"test refusals {refused:.3f} are above the bound {p.max_refused:.3f}"
    if champion is None:
        return True, f"no champion yet; Dice {dice:.3f}, HC error {mae:.2f} mm, refused {refused:.3f} pass"
    ref = champion.get("test_hc_mae_mean", math.nan)
    if ref == ref and mae > ref + p.hc_margin_mm:
        return False, f"test HC error {mae:.2f} mm is more than {p.hc_margin_mm} mm above the champion's {ref:.2f} mm"
    return True, f"test HC error {mae:.2f} mm vs champion {ref:.2f} mm (margin {p.hc_margin_mm} mm); Dice {dice:.3f}"


def promote_head(p: HeadSection, trail: Trail) -> gatekeeper.Decision:
    """Gate the `challenger` of `p.model_name` against its `champion`; move `champion` only if
    it passes. Recorded as model-version tags and in the promotion audit trail, under its lock."""
    name, client = p.model_name, MlflowClient()
    with exclusive_lock(trail.lock):
        gatekeeper.settle(client, trail, name)
        chal = gatekeeper.aliased_version(client, name, "challenger")
        if chal is None:
            raise gatekeeper.PromotionError(f"registered model {name!r} has no 'challenger' version: run the "
                                            "head stage first")
        champ = gatekeeper.aliased_version(client, name, "champion")
        m_chal = gatekeeper.version_metrics(client, chal)
        m_champ = gatekeeper.version_metrics(client, champ) if champ else None
        if champ is not None and champ.version == chal.version:
            passed, reason = False, "challenger is already the champion"
        else:
            passed, reason = gate(m_chal, m_champ, p)
        thresholds = {"min_dice": p.min_dice, "max_hc_mae_mm": p.max_hc_mae_mm, "max_refused": p.max_refused,
                      "hc_margin_mm": p.hc_margin_mm}
        return gatekeeper.decide(client, name, chal, champ, passed, reason, m_chal, m_champ, thresholds, trail)
