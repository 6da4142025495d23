"""Training: prepare crops, train the segmenter, then the classifier, evaluate on the
frozen test set. Pure computation over arrays and params; MLflow logging lives in
pipelines/tracking.py and the orchestration in flows/."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from models.lightning import ClsModule, SegModule
from models.networks import BiometryRule, make_classifier, make_segmenter
from pipelines import biometry
from pipelines import evaluate as ev
from pipelines.config import Params, TrainParams
from pipelines.inference import ModelConfig, Predictor, context_features
from pipelines.preprocess import PreprocessError, load_frame, prepare_frame, warp

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Skull-aligned crops of the labelled rows, with everything training needs."""

    frame: pd.DataFrame                  # the dataset rows kept, in array order
    images: np.ndarray                   # (N, 1, S, S) float32
    labels: np.ndarray                   # (N, S, S) uint8 annotated masks (0 where none)
    mm_per_px: np.ndarray                # (N,)
    axis_ratio: np.ndarray               # (N,) the skull's axis ratio: where the head lies in the crop
    failed: dict[str, str] = field(default_factory=dict)   # image_id -> reason

    def subset(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.frame["split"].to_numpy() == split)

    def save(self, folder: Path, half: bool = False) -> None:
        """Write the arrays, the rows and the failures to `folder` (float16 images if `half`:
        half the size, for carrying a prepared cohort to a GPU worker)."""
        import json

        folder.mkdir(parents=True, exist_ok=True)
        images = self.images.astype(np.float16) if half else self.images
        (np.savez_compressed if half else np.savez)(folder / "arrays.npz", images=images, labels=self.labels,
                                                    mm_per_px=self.mm_per_px, axis_ratio=self.axis_ratio)
        self.frame.to_parquet(folder / "frame.parquet", index=False)
        (folder / "failed.json").write_text(json.dumps(self.failed))

    @classmethod
    def load(cls, folder: Path) -> Prepared:
        import json

        arrays = np.load(folder / "arrays.npz")
        # crops packed before the axis ratio was kept: NaN, the anatomical prior without the head
        ratio = arrays["axis_ratio"] if "axis_ratio" in arrays.files else np.full(len(arrays["mm_per_px"]), np.nan)
        return cls(pd.read_parquet(folder / "frame.parquet"), arrays["images"].astype(np.float32, copy=False),
                   arrays["labels"], arrays["mm_per_px"], ratio, json.loads((folder / "failed.json").read_text()))


def prepare(dataset: pd.DataFrame, workspace: Path, size: int, margin: float,
            progress: Callable[[int, int], None] | None = None) -> Prepared:
    rows = dataset[dataset["split"].isin(["train", "val", "test"])].reset_index(drop=True)
    images, labels, scale, ratio, keep, failed = [], [], [], [], [], {}
    for i, r in enumerate(rows.itertuples(index=False)):
        try:
            grey, valid = load_frame(workspace / r.deid_path, int(r.frame))
            img, crop = prepare_frame(grey, valid, (r.spacing_row_mm, r.spacing_col_mm), size, margin)
        except PreprocessError as exc:
            failed[r.image_id] = str(exc)
            continue
        mask = np.zeros((size, size), np.uint8)
        if isinstance(r.mask_path, str) and r.mask_path:
            src = cv2.imread(str(workspace / r.mask_path), cv2.IMREAD_UNCHANGED)
            mask = warp(src, crop, nearest=True)
        images.append(img[None])
        labels.append(mask)
        scale.append(crop.mm_per_px)
        ratio.append(crop.axis_ratio)
        keep.append(i)
        if progress:
            progress(i + 1, len(rows))
    return Prepared(rows.iloc[keep].reset_index(drop=True), np.stack(images).astype(np.float32),
                    np.stack(labels), np.asarray(scale), np.asarray(ratio), failed)


def prepare_cached(dataset_path: Path, workspace: Path, size: int, margin: float, cache_dir: Path,
                   progress: Callable[[int, int], None] | None = None) -> Prepared:
    """`prepare`, cached by the dataset's bytes, the crop settings and the preprocessing code.

    Training and evaluation are two DVC stages (and two Prefect tasks); the skull fitting
    they share runs once. The cache lives outside the data store (a disposable speed-up:
    deleting it changes no result).
    """
    import hashlib

    from pipelines import preprocess

    h = hashlib.sha256(dataset_path.read_bytes())
    h.update(Path(preprocess.__file__).read_bytes())
    h.update(f"{size}|{margin}".encode())
    entry = cache_dir / f"prepared-{h.hexdigest()[:24]}"
    if (entry / "arrays.npz").is_file():
        return Prepared.load(entry)
    data = prepare(pd.read_parquet(dataset_path), workspace, size, margin, progress)
    tmp = entry.with_name(entry.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    data.save(tmp)
    for old in cache_dir.glob("prepared-*"):           # one entry: the cache never grows
        if old != tmp:
            shutil.rmtree(old, ignore_errors=True)
    tmp.rename(entry)
    return data


class _Arrays(Dataset):
    def __init__(self, **arrays: np.ndarray) -> None:
        self.arrays = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        self.n = len(next(iter(self.arrays.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.arrays.items()}


def _cuda(tp: TrainParams) -> bool:
    return torch.cuda.is_available() and tp.accelerator in ("auto", "gpu", "cuda")


def _trainer(max_epochs: int, tp: TrainParams, has_val: bool, callbacks: list | None = None) -> L.Trainer:
    """One Trainer configuration for both networks: accelerator, devices, nodes and strategy
    (DDP) from params.yaml; bf16 mixed precision on CUDA unless told otherwise."""
    precision = tp.precision if tp.precision != "auto" else ("bf16-mixed" if _cuda(tp) else "32-true")
    return L.Trainer(max_epochs=max_epochs, accelerator=tp.accelerator, devices=tp.devices, num_nodes=tp.num_nodes,
                     strategy=tp.strategy, precision=precision, logger=False,
                     # only our own ModelCheckpoint: Lightning's default one would write into the cwd
                     enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks or []),
                     enable_model_summary=False, deterministic="warn",
                     num_sanity_val_steps=0, limit_val_batches=1.0 if has_val else 0,
                     enable_progress_bar=False, callbacks=callbacks or [])


class _EpochLog(L.Callback):
    """Records the first epoch a fit runs (> 0 after a resume)."""

    def __init__(self) -> None:
        self.first_epoch: int | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, _: L.LightningModule) -> None:
        if self.first_epoch is None:
            self.first_epoch = int(trainer.current_epoch)


def _best_checkpoint(best: ModelCheckpoint, folder: Path) -> Path | None:
    """The best epoch's checkpoint (the monitor is a loss: lower is better).

    A kill between Lightning deleting the previous best file and writing the new last.ckpt
    resumes a callback that names a file that is gone. Then the best of the epoch files still
    in the folder, by the score each one recorded, is taken, if it beats the last epoch;
    otherwise the last weights stay."""
    if best.best_model_path and Path(best.best_model_path).is_file():
        return Path(best.best_model_path)
    scored = []
    for path in folder.glob("epoch=*.ckpt"):
        try:
            states = torch.load(path, map_location="cpu", weights_only=False).get("callbacks", {})
            score = next(v["current_score"] for k, v in states.items()
                         if k.startswith("ModelCheckpoint") and v.get("monitor") == best.monitor)
            scored.append((float(score), path))
        except (OSError, RuntimeError, KeyError, StopIteration, TypeError, ValueError):
            continue
    chosen = min(scored) if scored else None
    if chosen is not None and best.current_score is not None and chosen[0] > float(best.current_score):
        chosen = None
    if best.best_model_path:
        log.warning("best checkpoint %s is missing after an interruption; using %s",
                    Path(best.best_model_path).name, chosen[1].name if chosen else "the last weights")
    return chosen[1] if chosen else None


def _fit(trainer: L.Trainer, module: L.LightningModule, loaders: tuple, ckpt_dir: Path | None,
         resume: bool) -> str | None:
    """fit, resuming from `ckpt_dir/last.ckpt` when a previous run of the same work was cut off."""
    last = ckpt_dir / "last.ckpt" if ckpt_dir is not None else None
    start = str(last) if resume and last is not None and last.is_file() else None
    if start:
        log.warning("resuming from %s", last)
    trainer.fit(module, *loaders, ckpt_path=start)
    return start


def train_models(data: Prepared, params: Params, checkpoints: Path | None = None,
                 info: dict[str, Any] | None = None) -> Predictor:
    """Segmenter on annotated masks, then the classifier on annotated + predicted masks.

    `checkpoints`: a folder for this exact work (same data, same params). Each network
    checkpoints its last epoch there, and a rerun after an interruption resumes from it
    (`train.resume`). `info` receives the rank, world size and resumed epochs. Under DDP
    every rank returns the same trained networks; only rank 0 should write anything.
    """
    tp, sp = params.train, params.segment
    info = info if info is not None else {}
    L.seed_everything(tp.seed, workers=True)
    cuda = _cuda(tp)
    tr, va = data.subset("train"), data.subset("val")
    with_mask = tr[data.labels[tr].reshape(len(tr), -1).max(1) > 0]
    seg = make_segmenter(sp.channels, sp.norm)
    if cuda and tp.channels_last:
        seg = seg.to(memory_format=torch.channels_last)
    loader = dict(num_workers=tp.num_workers, pin_memory=cuda, persistent_workers=tp.num_workers > 0)
    seg_loader = DataLoader(_Arrays(image=data.images[with_mask], labels=data.labels[with_mask]),
                            batch_size=sp.batch_size, shuffle=True, generator=torch.Generator().manual_seed(tp.seed),
                            **loader)
    val_loader = DataLoader(_Arrays(image=data.images[va], labels=data.labels[va]), batch_size=64, **loader)
    rank, world = 0, 1
    if sp.max_epochs > 0 and len(with_mask):
        ckpt = checkpoints / "segmenter" if checkpoints is not None else None
        seg_log = _EpochLog()
        callbacks = [seg_log] + ([ModelCheckpoint(dirpath=ckpt, save_last=True, save_top_k=0)] if ckpt else [])
        trainer = _trainer(sp.max_epochs, tp, len(va) > 0, callbacks)
        module = SegModule(seg, sp.lr, sp.max_epochs, sp.augment)
        resumed = _fit(trainer, module, (seg_loader, val_loader), ckpt, tp.resume)
        rank, world = trainer.global_rank, trainer.world_size
        info["segmenter_resumed_at_epoch"] = seg_log.first_epoch if resumed else None
    cfg = ModelConfig(tp.model, tp.features, sp.channels, params.preprocess.size,
                      params.preprocess.crop_margin, 0.5, tp.backbone, tp.shape_backbone, tp.image_norm, sp.norm)
    clf = make_classifier(tp.model, tp.features, tp.backbone, tp.shape_backbone, tp.image_norm)
    predictor = Predictor(seg, clf, cfg)
    pred_labels = predictor.segment(data.images, data.axis_ratio)
    target = (data.frame["label"] == "hypoplasia").to_numpy().astype(np.int64)
    context = context_features(data.frame["ga_weeks"].to_numpy(), data.mm_per_px)
    arrays = dict(image=data.images, labels=data.labels, pred_labels=pred_labels,
                  context=context, target=target)
    train_ds = _Arrays(**{k: v[tr] for k, v in arrays.items()})
    val_ds = _Arrays(**{k: v[va] for k, v in arrays.items()})
    if tp.max_epochs > 0 and len(tr) and not isinstance(clf, BiometryRule):
        if cuda and tp.channels_last:
            clf = clf.to(memory_format=torch.channels_last)
        module = ClsModule(clf, tp.lr, tp.weight_decay, tp.predicted_mask_fraction, tp.augment)
        cls_log = _EpochLog()
        ckpt = checkpoints / "classifier" if checkpoints is not None else Path(tempfile.mkdtemp(prefix="cbh-ckpt-"))
        callbacks: list = [cls_log]
        best = None
        if len(va):
            # keep the epoch with the lowest validation cross-entropy (a proper scoring rule:
            # choosing by AUC alone picked early, badly calibrated epochs); stop when it stalls
            best = ModelCheckpoint(dirpath=ckpt, monitor="cls_val_loss", mode="min", save_top_k=1, save_last=True)
            callbacks += [best, EarlyStopping(monitor="cls_val_loss", mode="min", patience=tp.early_stopping_patience)]
        else:
            callbacks.append(ModelCheckpoint(dirpath=ckpt, save_last=True, save_top_k=0))
        trainer = _trainer(tp.max_epochs, tp, len(va) > 0, callbacks)
        resumed = _fit(trainer, module,
                       (DataLoader(train_ds, batch_size=tp.batch_size, shuffle=True,
                                   generator=torch.Generator().manual_seed(tp.seed), **loader),
                        DataLoader(val_ds, batch_size=64, **loader)), ckpt, tp.resume)
        rank, world = trainer.global_rank, trainer.world_size
        info["classifier_resumed_at_epoch"] = cls_log.first_epoch if resumed else None
        best_path = _best_checkpoint(best, ckpt) if best is not None else None
        if best_path is not None:
            state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
        if checkpoints is None:
            shutil.rmtree(ckpt, ignore_errors=True)
    info.update(rank=rank, world_size=world)
    seg, clf = (m.to("cpu", memory_format=torch.contiguous_format) for m in (seg, clf))
    predictor = Predictor(seg, clf, cfg)
    return choose_operating_point(predictor, data, params.evaluate.sensitivity_target)


def choose_operating_point(predictor: Predictor, data: Prepared, sensitivity_target: float) -> Predictor:
    """The threshold that meets the sensitivity target on the validation split (part of the
    fitted model: the test split is never looked at)."""
    va = data.subset("val")
    y = (data.frame["label"].to_numpy()[va] == "hypoplasia").astype(int)
    prob = predictor.probability(data.images[va], predictor.segment(data.images[va], data.axis_ratio[va]),
                                 context_features(data.frame["ga_weeks"].to_numpy()[va], data.mm_per_px[va]))
    thr = ev.operating_threshold(y, prob, sensitivity_target)
    return Predictor(predictor.seg, predictor.cls, ModelConfig(**{**predictor.cfg.__dict__, "threshold": thr}))


@dataclass
class Evaluation:
    metrics: dict[str, float]
    subgroups: list[dict[str, Any]]
    figures: dict[str, Any]
    tables: dict[str, pd.DataFrame]     # roc, reliability, test_predictions: DVC plots and the report


def evaluate_models(predictor: Predictor, data: Prepared, params: Params) -> Evaluation:
    """Metrics at the model's own operating point (chosen on validation during training) on the
    frozen test set, overall and per subgroup (GA band, site), and the figures and curve
    tables reviewers look at."""
    from sklearn.metrics import roc_curve

    from pipelines import plots

    pred_labels, outside, soft = predictor.segment_measure(data.images, data.axis_ratio, data.mm_per_px)
    context = context_features(data.frame["ga_weeks"].to_numpy(), data.mm_per_px)
    prob = predictor.probability(data.images, pred_labels, context)
    y = (data.frame["label"] == "hypoplasia").to_numpy().astype(int)
    va, te = data.subset("val"), data.subset("test")
    thr = predictor.cfg.threshold
    metrics: dict[str, Any] = {}
    for name, idx in (("val", va), ("test", te)):
        for k, v in ev.binary_metrics(y[idx], prob[idx], thr).items():
            metrics[f"{name}_{k}"] = v
    lo, hi = ev.auc_ci(y[te], prob[te], params.evaluate.bootstrap, params.train.seed)
    metrics["test_auc_ci_low"], metrics["test_auc_ci_high"] = lo, hi
    has_mask = data.labels[te].reshape(len(te), -1).max(1) > 0 if len(te) else np.zeros(0, bool)
    t_idx = te[has_mask]
    # per test image (NaN: no annotated mask), for the overall figures and for each subgroup
    dice: dict[str, np.ndarray] = {}
    for cls, key in ((1, "dice_cerebellum"), (2, "dice_cisterna")):
        dice[key] = np.full(len(te), np.nan)
        dice[key][has_mask] = ev.dice_per_image(pred_labels[t_idx], data.labels[t_idx], cls)
        metrics[f"test_{key}"] = float(np.nanmean(dice[key][has_mask])) if has_mask.any() else float("nan")
    meas = soft[te].reshape(-1, 2)          # from the probabilities, at a quarter of a pixel (as cbh predict)
    metrics["test_tcd_mae_mm"] = ev.mean_abs_error(meas[:, 0], data.frame["tcd_mm"].to_numpy()[te])
    metrics["test_cm_mae_mm"] = ev.mean_abs_error(meas[:, 1], data.frame["cm_mm"].to_numpy()[te])
    # signed: a scanner whose masks come out too wide or too narrow shows as a bias, not noise
    metrics["test_tcd_bias_mm"] = ev.mean_error(meas[:, 0], data.frame["tcd_mm"].to_numpy()[te])
    rule = biometry.tcd_zscore(meas[:, 0], data.frame["ga_weeks"].to_numpy()[te])
    metrics["test_biometry_rule_auc"] = ev.auc(y[te], -np.nan_to_num(rule, nan=0.0))
    metrics["test_ece"] = ev.expected_calibration_error(y[te], prob[te])
    # share of images whose predicted cerebellum left the skull (cleared by the anatomical prior)
    metrics["test_cerebellum_outside_head"] = float(outside[te].mean()) if len(te) else float("nan")
    metrics["excluded_unfittable"] = float(len(data.failed))
    test = data.frame.iloc[te]
    groups = {"ga_band": ev.ga_band(test["ga_weeks"].to_numpy()), "site": test["site"].fillna("unknown").to_numpy()}
    tcd_error = meas[:, 0] - data.frame["tcd_mm"].to_numpy(dtype=float)[te]
    subgroups = ev.subgroup_metrics(y[te], prob[te], thr, groups,
                                    {**dice, "tcd_mae_mm": tcd_error, "tcd_bias_mm": tcd_error})
    title = params.train.model
    figures = {"roc": plots.roc(y[te], prob[te], f"{title}: test ROC"),
               "reliability": plots.reliability_diagram(y[te], prob[te], f"{title}: calibration"),
               "confusion": plots.confusion(y[te], prob[te], thr, f"{title}: test"),
               "overlays": plots.overlays(data.images[te], pred_labels[te])}
    tables: dict[str, pd.DataFrame] = {}
    if len(set(y[te].tolist())) == 2:
        fpr, tpr, cut = roc_curve(y[te], prob[te])
        tables["roc"] = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(cut, 1.0)})
    else:
        tables["roc"] = pd.DataFrame({"fpr": [0.0, 1.0], "tpr": [0.0, 1.0], "threshold": [1.0, 0.0]})
    mean_p, freq, count = ev.reliability(y[te], prob[te])
    ok = count > 0
    tables["reliability"] = pd.DataFrame({"bin": np.flatnonzero(ok), "predicted": mean_p[ok], "observed": freq[ok],
                                          "count": count[ok]})
    label = np.array(["normal", "hypoplasia"])
    tables["test_predictions"] = pd.DataFrame({
        "image_id": test["image_id"].to_numpy(), "actual": label[y[te]],
        "predicted": label[(prob[te] >= thr).astype(int)], "probability": np.round(prob[te], 6)})
    return Evaluation({k: float(v) for k, v in metrics.items()}, subgroups, figures, tables)
