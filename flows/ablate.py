"""`cbh ablate`: every comparison model trained on the same data version and evaluated on the
same frozen test set, as one MLflow parent run with a child run per model, and the reviewer
report comparing them (AUC, sensitivity and specificity with intervals over patients, and each
model's AUC difference to the first, paired over the same patients).

The models share one segmenter, trained once (the first model's training, with the
workspace's segmenter settings), so they differ in their classifiers alone and the
biometry rule scores the very masks the networks see. Nothing is registered: the ablation
informs a choice, it does not move `challenger` or `champion`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flows.stages import StageError, _prepared, _quiet_lightning, frame_head, require_both_classes
from pipelines.config import MODELS, Params, replace


@dataclass(frozen=True)
class Ablation:
    parent_run: str
    runs: dict[str, str]             # model -> child run id
    metrics: dict[str, dict[str, float]]
    report: tuple[Path, Path]        # html, md


def _models(requested: list[str] | None, default: str) -> list[str]:
    """The models in order: the workspace's default first (the others are paired against it)."""
    models = requested or [default, *(m for m in MODELS if m not in (default, "asc-paper"))]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise StageError(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")
    return list(dict.fromkeys(models))


def ablate(params: Params, root: Path, models: list[str] | None, out: Path, progress=None) -> Ablation:
    import matplotlib.pyplot as plt
    import mlflow

    from pipelines.evaluation.evaluate import evaluate_models
    from pipelines.registry import lineage, tracking
    from pipelines.reports.compare import compare_runs
    from pipelines.training.train import train_models

    _quiet_lightning()
    chosen = _models(models, params.train.model)
    data = _prepared(params, root, progress)
    require_both_classes(data, params)
    tracking.setup(params.paths.mlflow_uri, root / params.paths.mlflow_artifacts)
    tags = {**lineage.collect(root, params), "evaluation.bootstrap_unit": "patient",
            "preprocess.frame_source": "learned" if frame_head(params, root) else "classical"}
    runs: dict[str, str] = {}
    metrics: dict[str, dict[str, float]] = {}
    segmenter = None
    with mlflow.start_run(run_name="ablation") as parent:
        mlflow.set_tags({**tags, "ablation.models": ",".join(chosen)})
        for model in chosen:
            p = replace(params, [f"train.model={model}"])
            predictor = train_models(data, p, segmenter=segmenter)
            segmenter = segmenter if segmenter is not None else predictor.seg
            evaluation = evaluate_models(predictor, data, p)
            m = {**evaluation.metrics, **predictor.parameter_metrics()}
            with mlflow.start_run(run_name=model, nested=True) as child:
                mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                                   for k, v in p.flat().items()})
                mlflow.log_metrics({k: v for k, v in m.items() if v == v})
                mlflow.set_tags({**tags, "model.kind": model, "ablation.parent": parent.info.run_id})
                for name, table in evaluation.tables.items():
                    mlflow.log_text(table.to_csv(index=False), f"evaluation/{name}.csv")
                runs[model], metrics[model] = child.info.run_id, m
            plt.close("all")
        report = compare_runs([runs[m] for m in chosen], out, frozen=root / params.paths.frozen_test,
                              bootstrap=params.evaluate.bootstrap, seed=params.train.seed)
        mlflow.log_artifact(str(report[1]), "report")
        mlflow.log_artifact(str(report[0]), "report")
    return Ablation(parent.info.run_id, runs, metrics, report)


def summary_lines(ab: Ablation) -> list[str]:
    """One line per model: AUC with its patient interval, sensitivity, specificity, parameters."""
    out = []
    for model, m in ab.metrics.items():
        out.append(f"  {model:14s} AUC {m.get('test_auc', float('nan')):.3f} "
                   f"[{m.get('test_auc_ci_low', float('nan')):.3f}-{m.get('test_auc_ci_high', float('nan')):.3f}]  "
                   f"sensitivity {m.get('test_sensitivity', float('nan')):.3f}  "
                   f"specificity {m.get('test_specificity', float('nan')):.3f}  "
                   f"parameters {int(m.get('model.parameters', 0)):,}")
    return out
