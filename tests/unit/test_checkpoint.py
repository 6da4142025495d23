"""The best checkpoint survives a kill between Lightning's rotation of the best file and its
write of last.ckpt (a flaky failure of the resume test before this fix)."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from pipelines.training.train import _best_checkpoint


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def training_step(self, batch, _):
        x, y = batch
        return ((self.lin(x) - y) ** 2).mean()

    def validation_step(self, batch, _):
        x, y = batch   # the loss gets worse from epoch 3 on: the best epoch is an early one
        self.log("cls_val_loss", ((self.lin(x) - y) ** 2).mean() + (0.0 if self.current_epoch < 3 else 10.0))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)


def _fit(folder: Path, epochs: int, resume: Path | None = None) -> ModelCheckpoint:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 2), torch.randn(32, 1)), batch_size=8)
    best = ModelCheckpoint(dirpath=folder, monitor="cls_val_loss", mode="min", save_top_k=1, save_last=True)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[best], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Tiny(), data, data, ckpt_path=str(resume) if resume else None)
    return best


def test_missing_best_file_falls_back_to_the_best_file_left(tmp_path):
    logging.getLogger("lightning").setLevel(logging.ERROR)
    first = _fit(tmp_path, 3)
    named = Path(first.best_model_path)
    assert _best_checkpoint(first, tmp_path) == named               # the normal case
    orphan = tmp_path / "epoch=9-step=99.ckpt"                     # the new best written, the old one removed,
    shutil.move(named, orphan)                                     # last.ckpt not yet rewritten: the kill
    resumed = _fit(tmp_path, 6, tmp_path / "last.ckpt")
    assert resumed.best_model_path == str(named) and not named.exists()
    assert _best_checkpoint(resumed, tmp_path) == orphan           # better than the last epoch's loss
    orphan.unlink()
    assert _best_checkpoint(resumed, tmp_path) is None              # nothing left: the last weights stay
