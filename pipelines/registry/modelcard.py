"""The model card that travels with every registered version (Markdown, and a MONAI-bundle
like metadata.json): intended use, the not-for-clinical-use statement, data, metrics with
intervals, subgroup metrics, limitations."""

from __future__ import annotations

from typing import Any

INTENDED_USE = ("Research on automated screening for fetal cerebellar hypoplasia in the transcerebellar "
                "plane: a probability beside TCD and cisterna magna measurements with INTERGROWTH-21st centiles.")
NOT_CLINICAL = "Not for clinical use. Trained and evaluated on synthetic data; not a medical device."
LIMITATIONS = [
    "Synthetic training data: real scanners, artefacts and anatomy vary more.",
    "Labels on the synthetic cohort follow the TCD < 5th centile rule, so the biometry rule is an upper bound.",
    "The operating point is chosen on a small validation set; its sensitivity on new data can differ.",
    "Skull fitting assumes the whole head is in the field of view.",
]


def metadata(model: str, metrics: dict[str, float], split: dict[str, dict[str, int]],
             subgroups: list[dict[str, Any]], lineage: dict[str, str]) -> dict[str, Any]:
    return {
        "name": "cerebellar-hypoplasia", "model": model, "intended_use": INTENDED_USE,
        "disclaimer": NOT_CLINICAL, "limitations": LIMITATIONS, "lineage": lineage,
        "training_data": {"images_per_split_and_label": split},
        "metrics": {k: v for k, v in metrics.items() if k.startswith("test_")},
        "subgroups": subgroups,
        "inputs": {"image": "base64 PNG or DICOM", "ga_weeks": "gestational age, weeks",
                   "pixel_spacing_mm": "required for PNG/JPEG"},
    }


def markdown(meta: dict[str, Any]) -> str:
    m = meta["metrics"]

    def f(key: str) -> str:
        return f"{m[key]:.3f}" if key in m else "n/a"

    lines = [f"# Model card: {meta['name']} ({meta['model']})", "", f"**{meta['disclaimer']}**", "",
             "## Intended use", meta["intended_use"], "", "## Test metrics (frozen test set)",
             f"- ROC AUC {f('test_auc')} (95% interval {f('test_auc_ci_low')}-{f('test_auc_ci_high')}, "
             f"bootstrap over patients)",
             f"- sensitivity {f('test_sensitivity')} ({f('test_sensitivity_ci_low')}-{f('test_sensitivity_ci_high')}), "
             f"specificity {f('test_specificity')} ({f('test_specificity_ci_low')}-{f('test_specificity_ci_high')}) "
             f"at threshold {f('test_threshold')} chosen on validation",
             f"- Brier {f('test_brier')}, expected calibration error {f('test_ece')}",
             f"- Dice cerebellum {f('test_dice_cerebellum')}, cisterna magna {f('test_dice_cisterna')}",
             f"- TCD error {f('test_tcd_mae_mm')} mm, CM error {f('test_cm_mae_mm')} mm", "",
             "## Subgroups", "| group | value | n | positives | AUC | sensitivity | specificity | Dice cerebellum "
             "| Dice cisterna | TCD error (mm) |", "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r: dict[str, Any], key: str, digits: int = 3) -> str:
        v = r.get(key)
        return "-" if v is None or v != v else f"{v:.{digits}f}"

    for r in meta["subgroups"]:
        lines.append(f"| {r['group']} | {r['value']} | {r['n']} | {r['n_positive']} | {cell(r, 'auc')} | "
                     f"{cell(r, 'sensitivity')} | {cell(r, 'specificity')} | {cell(r, 'dice_cerebellum')} | "
                     f"{cell(r, 'dice_cisterna')} | {cell(r, 'tcd_mae_mm', 2)} |")
    lines += ["", "## Training data (images per split and label)"]
    lines += [f"- {k}: {v}" for k, v in meta["training_data"]["images_per_split_and_label"].items()]
    lines += ["", "## Lineage"] + [f"- {k}: {v}" for k, v in meta["lineage"].items()]
    lines += ["", "## Limitations"] + [f"- {x}" for x in meta["limitations"]]
    return "\n".join(lines) + "\n"
