"""Training: prepare crops, train the segmenter, then the classifier, evaluate on the
frozen test set. Pure computation over arrays and params; MLflow logging lives in
pipelines/registry/tracking.py and the orchestration in flows/."""

from __future__ import annotations

import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from models.lightning import ClsModule, SegModule
from models.networks import BiometryRule, make_classifier, make_segmenter
from pipelines.config import Params, TrainParams
from pipelines.evaluation import metrics as ev
from pipelines.imaging.crops import Prepared
from pipelines.serving.inference import TCD_Z_MODELS, ModelConfig, Predictor, context_features, with_tcd_z

log = logging.getLogger(__name__)
# one line per epoch where no progress bar is drawn; the CLI sets the root logger to WARNING,
# so this logger has its own level unless someone configured it
progress = logging.getLogger(f"{__name__}.progress")
if progress.level == logging.NOTSET:
    progress.setLevel(logging.INFO)


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
                     enable_progress_bar=sys.stderr.isatty(), callbacks=callbacks or [])


class _EpochLog(L.Callback):
    """Records the first epoch a fit runs (> 0 after a resume) and, at the end of each epoch,
    the epoch's metrics (`trainer.callback_metrics`: train loss, validation loss and scores)
    and learning rate: the learning curves.

    The history is part of the checkpoint, so a resumed fit keeps the epochs before the cut.
    Rank 0 logs one line per epoch when no progress bar is drawn, and the epoch's metrics with
    `step=epoch` to the active MLflow run when training runs inside one (the `train` stage does
    not: its history reaches MLflow through `training.json` at the `evaluate` stage)."""

    def __init__(self, name: str, prefix: str) -> None:
        self.name, self.prefix = name, prefix
        self.first_epoch: int | None = None
        self.history: list[dict[str, float]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_epoch_start(self, trainer: L.Trainer, _: L.LightningModule) -> None:
        if self.first_epoch is None:
            self.first_epoch = int(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, _: L.LightningModule) -> None:
        epoch = int(trainer.current_epoch)
        entry: dict[str, float] = {k: float(v) for k, v in trainer.callback_metrics.items()
                                   if isinstance(v, torch.Tensor) and v.numel() == 1}
        if trainer.optimizers:
            entry[f"{self.prefix}_lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.history = [h for h in self.history if h["epoch"] != epoch] + [{"epoch": epoch, **entry}]
        if not trainer.is_global_zero:
            return
        if not trainer.progress_bar_callback:
            progress.info("%s epoch %d/%d: %s", self.name, epoch + 1, trainer.max_epochs,
                          ", ".join(f"{k} {v:.4g}" for k, v in sorted(entry.items())))
        # only a process that imported mlflow can have an active run: no need to import it here
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None and mlflow.active_run() is not None:
            mlflow.log_metrics({k: v for k, v in entry.items() if v == v}, step=epoch)


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
                 info: dict[str, Any] | None = None, segmenter: torch.nn.Module | None = None) -> Predictor:
    """Segmenter on annotated masks, then the classifier on annotated + predicted masks.
    `segmenter`: a segmenter already trained on this data and these settings (an ablation's
    models share one, so they differ in their classifiers alone); it is used as it is.

    `checkpoints`: a folder for this exact work (same data, same params). Each network
    checkpoints its last epoch there, and a rerun after an interruption resumes from it
    (`train.resume`). `info` receives the rank, world size and resumed epochs. Under DDP
    every rank returns the same trained networks; only rank 0 should write anything.
    """
    tp, sp = params.train, params.segment
    info = info if info is not None else {}
    started = time.monotonic()
    L.seed_everything(tp.seed, workers=True)
    cuda = _cuda(tp)
    tr, va = data.subset("train"), data.subset("val")
    with_mask = tr[data.labels[tr].reshape(len(tr), -1).max(1) > 0]
    seg = make_segmenter(sp.channels, sp.norm)
    if segmenter is not None:
        seg.load_state_dict(segmenter.state_dict())
    if cuda and tp.channels_last:
        seg = seg.to(memory_format=torch.channels_last)
    loader = dict(num_workers=tp.num_workers, pin_memory=cuda, persistent_workers=tp.num_workers > 0)
    seg_loader = DataLoader(_Arrays(image=data.images[with_mask], labels=data.labels[with_mask]),
                            batch_size=sp.batch_size, shuffle=True, generator=torch.Generator().manual_seed(tp.seed),
                            **loader)
    val_loader = DataLoader(_Arrays(image=data.images[va], labels=data.labels[va]), batch_size=64, **loader)
    rank, world = 0, 1
    history: dict[str, list[dict[str, float]]] = {}
    if sp.max_epochs > 0 and len(with_mask) and segmenter is None:
        ckpt = checkpoints / "segmenter" if checkpoints is not None else None
        seg_log = _EpochLog("segmenter", "seg")
        callbacks = [seg_log] + ([ModelCheckpoint(dirpath=ckpt, save_last=True, save_top_k=0)] if ckpt else [])
        trainer = _trainer(sp.max_epochs, tp, len(va) > 0, callbacks)
        module = SegModule(seg, sp.lr, sp.max_epochs, sp.augment)
        resumed = _fit(trainer, module, (seg_loader, val_loader), ckpt, tp.resume)
        rank, world = trainer.global_rank, trainer.world_size
        info["segmenter_resumed_at_epoch"] = seg_log.first_epoch if resumed else None
        history["segmenter"] = seg_log.history
    cfg = ModelConfig(tp.model, tp.features, sp.channels, params.preprocess.size,
                      params.preprocess.crop_margin, 0.5, tp.backbone, tp.shape_backbone, tp.image_norm, sp.norm,
                      gate_reading=tp.paper_gate, paper_width=tp.paper_width)
    clf = make_classifier(tp.model, tp.features, tp.backbone, tp.shape_backbone, tp.image_norm, tp.paper_gate,
                          tp.paper_width)
    if tp.model == "asc-paper" and (tp.imagenet_inception or tp.imagenet_vgg):
        from models.paper import load_imagenet

        info["imagenet"] = load_imagenet(clf, Path(tp.imagenet_inception) if tp.imagenet_inception else None,
                                         Path(tp.imagenet_vgg) if tp.imagenet_vgg else None)
    predictor = Predictor(seg, clf, cfg)
    pred_labels = predictor.segment(data.images, data.axis_ratio)
    target = (data.frame["label"] == "hypoplasia").to_numpy().astype(np.int64)
    context = context_features(data.frame["ga_weeks"].to_numpy(), data.mm_per_px)
    pred_context = context
    if tp.model in TCD_Z_MODELS:
        # each sample's z-score is measured on the masks it is shown with (ClsModule picks both)
        context, pred_context = with_tcd_z(data.labels, context), with_tcd_z(pred_labels, context)
    arrays = dict(image=data.images, labels=data.labels, pred_labels=pred_labels,
                  context=context, pred_context=pred_context, target=target)
    train_ds = _Arrays(**{k: v[tr] for k, v in arrays.items()})
    val_ds = _Arrays(**{k: v[va] for k, v in arrays.items()})
    if tp.max_epochs > 0 and len(tr) and not isinstance(clf, BiometryRule):
        if cuda and tp.channels_last:
            clf = clf.to(memory_format=torch.channels_last)
        module = ClsModule(clf, tp.lr, tp.weight_decay, tp.predicted_mask_fraction, tp.augment)
        cls_log = _EpochLog("classifier", "cls")
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
                       # a last batch of one sample leaves batch norm nothing to normalise over (the
                       # deep backbones end on 1x1 maps at small crops): it is dropped
                       (DataLoader(train_ds, batch_size=tp.batch_size, shuffle=True,
                                   drop_last=len(train_ds) % tp.batch_size == 1,
                                   generator=torch.Generator().manual_seed(tp.seed), **loader),
                        DataLoader(val_ds, batch_size=64, **loader)), ckpt, tp.resume)
        rank, world = trainer.global_rank, trainer.world_size
        info["classifier_resumed_at_epoch"] = cls_log.first_epoch if resumed else None
        history["classifier"] = cls_log.history
        best_path = _best_checkpoint(best, ckpt) if best is not None else None
        if best_path is not None:
            state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
        if checkpoints is None:
            shutil.rmtree(ckpt, ignore_errors=True)
    # the train stage runs outside any MLflow run (system metrics would have nothing to attach
    # to): its wall time and the process's peak memory travel in training.json instead
    info.update(rank=rank, world_size=world, history=history, train_wall_s=round(time.monotonic() - started, 3),
                train_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if cuda:
        info["train_peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    seg, clf = (m.to("cpu", memory_format=torch.contiguous_format) for m in (seg, clf))
    predictor = Predictor(seg, clf, cfg)
    return choose_operating_point(predictor, data, params.evaluate.sensitivity_target, params.evaluate.operating_point)


def split_scores(predictor: Predictor, data: Prepared, split: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """A split's labels (1: hypoplasia) and the model's probabilities on the masks its own
    segmenter predicts, as at inference (validation by default)."""
    idx = data.subset(split)
    y = (data.frame["label"].to_numpy()[idx] == "hypoplasia").astype(int)
    prob = predictor.probability(data.images[idx], predictor.segment(data.images[idx], data.axis_ratio[idx]),
                                 context_features(data.frame["ga_weeks"].to_numpy()[idx], data.mm_per_px[idx]))
    return y, prob


def choose_operating_point(predictor: Predictor, data: Prepared, sensitivity_target: float,
                           rule: str = "sensitivity") -> Predictor:
    """The threshold that meets the sensitivity target on the validation split, by `rule` (a key
    of `metrics.OPERATING_POINTS`; part of the fitted model: the test split is never looked at)."""
    y, prob = split_scores(predictor, data)
    thr = ev.OPERATING_POINTS[rule](y, prob, sensitivity_target)
    return Predictor(predictor.seg, predictor.cls, ModelConfig(**{**predictor.cfg.__dict__, "threshold": thr}))
