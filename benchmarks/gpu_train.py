"""A one-GPU training run of the real training code (`pipelines.training.train.train_models`, Lightning,
bf16 mixed precision and channels-last on CUDA), on a cohort prepared by the pipeline.

Two steps, because a GPU worker needs only the prepared arrays (no DICOM, no OCR, no key):

    # here, in a workspace where `cbh demo` (or ingest, validate, split) has run:
    .venv/bin/python benchmarks/gpu_train.py pack WORKSPACE OUT [--size 224]
    # on the GPU worker (or here on CPU, for the baseline):
    python benchmarks/gpu_train.py run OUT [--profile paper] [--set section.key=value ...]

`pack` writes the skull-aligned crops of the labelled rows of WORKSPACE's dataset (with the
crop settings of the current directory's params.yaml; pseudonymised rows, float16 images) to
OUT. `run` trains the segmenter and the classifier with the params.yaml of the current
directory, evaluates on the frozen test rows and prints the wall time of each phase, the
device, the precision, the peak GPU memory and the test metrics.
Not a test: timings on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipelines.config import load_params, replace
from pipelines.evaluation.evaluate import evaluate_models
from pipelines.imaging.crops import Prepared, prepare
from pipelines.training.train import train_models


def pack(workspace: Path, out: Path, size: int | None) -> None:
    params = load_params("params.yaml")
    size = size or params.preprocess.size
    t0 = time.perf_counter()
    data = prepare(pd.read_parquet(workspace / params.paths.dataset), workspace, size, params.preprocess.crop_margin)
    data.save(out, half=True)
    print(f"packed {len(data.images)} crops of {size}x{size} ({len(data.failed)} unfittable) "
          f"into {out} in {time.perf_counter() - t0:.1f} s")


def run(folder: Path, profile: str | None, sets: list[str], predictions: Path | None = None,
        save: Path | None = None) -> None:
    data = Prepared.load(folder)
    size = data.images.shape[-1]
    params = load_params("params.yaml", sets, profile)
    if params.preprocess.size != size:
        params = replace(params, [f"preprocess.size={size}"])
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    precision = params.train.precision if params.train.precision != "auto" else ("bf16-mixed" if cuda else "32-true")
    tp = params.train
    print(f"device {device}; torch {torch.__version__}; precision {precision}; "
          f"channels-last {cuda and tp.channels_last}; profile {profile or 'default'}")
    print(f"model {tp.model}, backbones {tp.backbone}/{tp.shape_backbone}, features {tp.features}, "
          f"segmenter channels {list(params.segment.channels)}, {size}x{size}, "
          f"batch {params.segment.batch_size}/{tp.batch_size}, epochs <= {params.segment.max_epochs}/{tp.max_epochs}")
    counts = data.frame["split"].value_counts().to_dict()
    print(f"rows: {counts}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    info: dict = {}
    t0 = time.perf_counter()
    predictor = train_models(data, params, info=info)
    t_train = time.perf_counter() - t0
    if save is not None:                 # the trained networks, for a later look (Predictor.load)
        predictor.save(save)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    t1 = time.perf_counter()
    evaluation = evaluate_models(predictor, data, params)
    m = evaluation.metrics
    t_eval = time.perf_counter() - t1
    if predictions is not None:          # per test image (pseudonymous ids): for benchmarks/commission.py
        rows = data.frame[["image_id", "patient_pseudo", "site"]]
        table = evaluation.tables["test_predictions"].merge(rows, on="image_id", how="left")
        table["threshold"] = predictor.cfg.threshold
        table.to_parquet(predictions, index=False)
    print(f"train (segmenter + classifier): {t_train:.1f} s; evaluate: {t_eval:.1f} s; "
          f"peak GPU memory allocated: {peak:.2f} GiB; world size {info.get('world_size')}")
    print(f"test AUC {m['test_auc']:.3f} ({m['test_auc_ci_low']:.3f}-{m['test_auc_ci_high']:.3f}), "
          f"sensitivity {m['test_sensitivity']:.3f}, specificity {m['test_specificity']:.3f}, "
          f"Dice cerebellum {m['test_dice_cerebellum']:.3f}, cisterna {m['test_dice_cisterna']:.3f}, "
          f"TCD MAE {m['test_tcd_mae_mm']:.2f} mm (bias {m['test_tcd_bias_mm']:+.2f}), "
          f"CM MAE {m['test_cm_mae_mm']:.2f} mm, ECE {m['test_ece']:.3f}, "
          f"cerebellum outside the skull in {m['test_cerebellum_outside_head']:.1%} of test images")
    sites = [g for g in evaluation.subgroups if g["group"] == "site"]
    for g in sites if len(sites) > 1 else []:
        print(f"  {g['value']} ({g['n']} images): AUC {g['auc']:.3f}, sensitivity {g['sensitivity']:.3f}, "
              f"specificity {g['specificity']:.3f}, Dice cerebellum {g['dice_cerebellum']:.3f}, "
              f"cisterna {g['dice_cisterna']:.3f}, TCD MAE {g['tcd_mae_mm']:.2f} mm "
              f"(bias {g['tcd_bias_mm']:+.2f})")
    if not np.isfinite(m["test_auc"]):
        raise SystemExit("the test rows have one class only: no AUC")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("workspace", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int)
    r = sub.add_parser("run")
    r.add_argument("prepared", type=Path)
    r.add_argument("--profile")
    r.add_argument("--set", dest="sets", action="append", default=[])
    r.add_argument("--predictions", type=Path, help="write the test predictions (Parquet) here")
    r.add_argument("--save", type=Path, help="keep the trained model in this folder (before the operating point)")
    a = ap.parse_args()
    if a.cmd == "pack":
        pack(a.workspace, a.out, a.size)
    else:
        run(a.prepared, a.profile, a.sets, a.predictions, a.save)


if __name__ == "__main__":
    main()
