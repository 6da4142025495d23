"""Training throughput of the ASC classifier on this machine: Lightning vs a plain PyTorch
loop doing the same steps, and the share of step time spent waiting on data.

Run by hand (not a test; timings on shared machines are noisy):
    .venv/bin/python benchmarks/train_throughput.py [--size 224] [--steps 30] [--batch 16]
        [--backbone small --shape-backbone small --features 32] [--precision auto]
Both loops run in the same process on the same synthetic batches, so the ratio is fair. On
CUDA both use what `cbh train` uses there: bf16 mixed precision (autocast in the plain loop)
and channels-last, and the peak GPU memory of each is printed.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from models.augment import random_affine, random_intensity
from models.lightning import ClsModule, one_hot_masks
from models.networks import make_classifier
from pipelines.training.train import _Arrays


class _Timer(L.Callback):
    def __init__(self) -> None:
        self.wait = 0.0
        self.steps: list[float] = []
        self._end = None

    def on_train_batch_start(self, *args) -> None:
        now = time.perf_counter()
        if self._end is not None:
            self.wait += now - self._end
        self._start = now

    def on_train_batch_end(self, *args) -> None:
        self._end = time.perf_counter()
        self.steps.append(self._end - self._start)


def _data(n: int, size: int) -> _Arrays:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (n, size, size), dtype=np.uint8)
    return _Arrays(image=rng.random((n, 1, size, size), dtype=np.float32), labels=labels, pred_labels=labels,
                   context=rng.standard_normal((n, 2)).astype(np.float32),
                   target=rng.integers(0, 2, n).astype(np.int64))


CUDA = torch.cuda.is_available()


def _net(a: argparse.Namespace) -> torch.nn.Module:
    net = make_classifier(a.model, a.features, a.backbone, a.shape_backbone)
    return net.to(memory_format=torch.channels_last) if CUDA else net


def _peak_gib() -> float:
    if not CUDA:
        return float("nan")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def lightning_run(ds: _Arrays, a: argparse.Namespace, steps: int) -> tuple[float, float, float]:
    L.seed_everything(0, verbose=False)
    module = ClsModule(_net(a), 1e-3, 1e-4, 0.5)
    timer = _Timer()
    trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, precision=a.precision, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        limit_val_batches=0, callbacks=[timer])
    loader = DataLoader(ds, batch_size=a.batch, shuffle=True, pin_memory=CUDA)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    total = time.perf_counter() - t0
    return steps * a.batch / total, timer.wait / max(sum(timer.steps) + timer.wait, 1e-9), _peak_gib()


def plain_run(ds: _Arrays, a: argparse.Namespace, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    dev = torch.device("cuda" if CUDA else "cpu")
    net = _net(a).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    loader = DataLoader(ds, batch_size=a.batch, shuffle=True, pin_memory=CUDA)
    bf16 = a.precision.startswith("bf16")
    net.train()
    done, t0 = 0, time.perf_counter()
    while done < steps:
        for b in loader:
            b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
            use_pred = (torch.rand(b["labels"].shape[0], device=dev) < 0.5).view(-1, 1, 1)
            labels = torch.where(use_pred, b["pred_labels"], b["labels"])
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                img, masks = random_affine(b["image"], one_hot_masks(labels))
                loss = F.cross_entropy(net(random_intensity(img), masks, b["context"]), b["target"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    if CUDA:
        torch.cuda.synchronize()
    return steps * a.batch / (time.perf_counter() - t0), _peak_gib()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default="asc")
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--backbone", default="small")
    ap.add_argument("--shape-backbone", default="small")
    ap.add_argument("--precision", default="auto", help="auto: bf16-mixed on CUDA, 32-true on CPU")
    a = ap.parse_args()
    if a.precision == "auto":
        a.precision = "bf16-mixed" if CUDA else "32-true"
    ds = _data(a.steps * a.batch, a.size)
    plain_run(ds, a, 3)                                      # warm-up (allocator, kernels)
    plain, plain_mem = plain_run(ds, a, a.steps)
    light, wait, light_mem = lightning_run(ds, a, a.steps)
    device = torch.cuda.get_device_name(0) if CUDA else "cpu"
    print(f"model {a.model} ({a.backbone}/{a.shape_backbone}, features {a.features}), {a.size}x{a.size}, "
          f"batch {a.batch}, {a.steps} steps, device {device}, precision {a.precision}, "
          f"threads {torch.get_num_threads()}")
    print(f"plain PyTorch loop : {plain:8.1f} images/s   peak GPU memory {plain_mem:.2f} GiB")
    print(f"Lightning          : {light:8.1f} images/s   peak GPU memory {light_mem:.2f} GiB")
    print(f"Lightning / plain  : {light / plain:8.3f}  (overhead {100 * (1 - light / plain):.1f}%)")
    print(f"data wait share    : {100 * wait:8.1f}% of Lightning step time")


if __name__ == "__main__":
    main()
