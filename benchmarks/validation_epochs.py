"""How a training setting scores on the validation split, never on the test split: for choosing
epochs, patience or learning rate without spending the frozen test set.

Run in a workspace where `make demo` (or ingest .. train) has run:

    .venv/bin/python benchmarks/validation_epochs.py --current          # the model in data/model
    .venv/bin/python benchmarks/validation_epochs.py --set segment.max_epochs=20 --set train.max_epochs=30

`--current` scores the last trained model (`paths.model_dir`) as it is (its segmenter's Dice
from its `training.json`). Otherwise the segmenter
and the classifier are trained with params.yaml plus the `--set` overrides on the workspace's
prepared crops (the same code as the `train` stage, nothing saved or registered) and scored.
Prints one JSON line: validation AUC, log loss and expected calibration error of the
classifier on predicted masks, the segmenter's last validation cerebellum Dice, the epochs run
and the training wall time. Not a test: timings on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import log_loss

from flows.stages import _prepared, _quiet_lightning
from pipelines.config import load_params
from pipelines.evaluation import metrics as ev
from pipelines.serving.inference import Predictor
from pipelines.training.train import split_scores, train_models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value")
    p.add_argument("--current", action="store_true", help="score the workspace's last trained model")
    a = p.parse_args()
    root = Path(".")
    params = load_params(root / "params.yaml", a.sets)
    _quiet_lightning()
    data = _prepared(params, root)
    out: dict = {"set": a.sets, "val_images": int(len(data.subset("val")))}
    if a.current:
        predictor = Predictor.load(root / params.paths.model_dir)
        trained = root / params.paths.model_dir / "training.json"
        history = json.loads(trained.read_text()).get("history", {}) if trained.is_file() else {}
    else:
        info: dict = {}
        start = time.perf_counter()
        predictor = train_models(data, params, None, info)
        history = info["history"]
        out.update(train_wall_s=round(time.perf_counter() - start, 1),
                   segmenter_epochs=len(history.get("segmenter", [])),
                   classifier_epochs=len(history.get("classifier", [])))
    if history.get("segmenter"):
        out["val_dice_cerebellum_last"] = round(history["segmenter"][-1]["seg_val_dice_cerebellum"], 4)
    y, prob = split_scores(predictor, data)
    out.update(val_auc=round(ev.auc(y, prob), 4),
               val_log_loss=round(float(log_loss(y, np.clip(prob, 1e-6, 1 - 1e-6))), 4),
               val_ece=round(float(ev.expected_calibration_error(y, prob)), 4))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
