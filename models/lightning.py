"""LightningModules. They receive their network from outside (models.networks)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from models.augment import random_affine, random_intensity


def one_hot_masks(labels: torch.Tensor) -> torch.Tensor:
    """(B,H,W) labels {0,1,2} -> (B,2,H,W) float channels (cistern, cerebellum) as in ASC-Net."""
    return torch.stack([(labels == 2), (labels == 1)], dim=1).float()


class SegModule(L.LightningModule):
    """Cerebellum and cisterna magna segmentation with Dice + cross-entropy."""

    def __init__(self, net: nn.Module, lr: float, max_epochs: int, augment: str = "basic") -> None:
        super().__init__()
        self.net, self.lr, self.max_epochs, self.augment = net, lr, max(max_epochs, 1), augment
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_fit_start(self) -> None:
        self.net.train()   # a network handed over from inference code may be in eval mode

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        img, lab = random_affine(batch["image"], batch["labels"][:, None])
        img = random_intensity(img, augment=self.augment)
        loss = self.loss(self(img), lab.long())
        self.log("seg_train_loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        logits = self(batch["image"])
        pred = logits.argmax(1)
        lab = batch["labels"]
        # the training loss on unaugmented validation crops: the learning curve's other half
        self.log("seg_val_loss", self.loss(logits, lab[:, None].long()), sync_dist=True)
        inter = ((pred == 1) & (lab == 1)).sum().float()
        dice = 2 * inter / ((pred == 1).sum() + (lab == 1).sum()).clamp(min=1)
        self.log("seg_val_dice_cerebellum", dice, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}


class ClsModule(L.LightningModule):
    """The ASC classifier: cross-entropy, Adam, ReduceLROnPlateau on the validation loss."""

    def __init__(self, net: nn.Module, lr: float, weight_decay: float, pred_mask_fraction: float,
                 augment: str = "basic") -> None:
        super().__init__()
        self.net, self.lr, self.wd, self.p_pred, self.augment = net, lr, weight_decay, pred_mask_fraction, augment

    def forward(self, image: torch.Tensor, masks: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.net(image, masks, context)

    def on_fit_start(self) -> None:
        self.net.train()

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        # masks the segmenter predicted for a share of samples, so inference needs no outlining
        use_pred = (torch.rand(batch["labels"].shape[0], device=self.device) < self.p_pred).view(-1, 1, 1)
        labels = torch.where(use_pred, batch["pred_labels"], batch["labels"])
        # a context measured on the masks (asc-z's TCD z-score) follows the masks chosen
        context = batch["context"]
        if "pred_context" in batch:
            context = torch.where(use_pred.view(-1, 1), batch["pred_context"], context)
        img, masks = random_affine(batch["image"], one_hot_masks(labels))
        img = random_intensity(img, augment=self.augment)
        loss = F.cross_entropy(self(img, masks, context), batch["target"])
        self.log("cls_train_loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        logits = self(batch["image"], one_hot_masks(batch["pred_labels"]),
                      batch.get("pred_context", batch["context"]))
        self.log("cls_val_loss", F.cross_entropy(logits, batch["target"]), prog_bar=True, sync_dist=True)
        self._val.append((torch.softmax(logits, 1)[:, 1].detach(), batch["target"]))

    def on_validation_epoch_end(self) -> None:
        """Validation AUC on predicted masks, as at inference (logged beside the loss)."""
        p = torch.cat([v[0] for v in self._val])
        y = torch.cat([v[1] for v in self._val])
        if self.trainer.world_size > 1:           # every rank scores the whole validation split
            p, y = self.all_gather(p).flatten(), self.all_gather(y).flatten()
        auc = binary_auroc(p, y) if y.unique().numel() == 2 else torch.tensor(0.5)
        self.log("cls_val_auc", auc, prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.wd)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=4)
        # strict=False: without a validation split the plateau schedule simply does not step
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "cls_val_loss", "strict": False}}
