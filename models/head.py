"""The learned fetal-head localiser: a small U-Net predicting the head (the area inside the
skull's outer border) over the whole frame at low resolution, and its LightningModule.

Torch only: the geometry around it (padding to a square, the ellipse fit, millimetres) lives
in pipelines/imaging/head.py."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.nets import BasicUNet
from torch import nn

from models.augment import _noise_floor, rayleigh_speckle

HEAD_FEATURES = (8, 16, 32, 64, 128, 8)


def make_head_net(features: tuple[int, ...] = HEAD_FEATURES) -> nn.Module:
    """A 2-D BasicUNet, one grey input channel, one logit channel (head vs background)."""
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=tuple(features))


HEAD_AUGMENTS = ("basic", "floor", "fan")   # also pipelines/config.py, which checks params.yaml
# the raised black level of `floor` and `fan`: up to half the frame's range, the grey speckle
# around the head of a scanner that shows the tissue and fluid the training scanners clip to black
HEAD_FLOOR_LEVELS = (0.05, 0.5)


def _fan_floor(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """On half the batch, a raised noise floor inside a random probe fan only: apex near the top
    centre, half-angle 25-50 degrees, reaching 0.8-1.3 frame heights, brighter towards the apex
    (the near field). Outside the fan the frame stays black, as a scanner draws it, so the fan's
    straight edges and the head's curved one both appear, and only the second bounds a head."""
    b, _, h, w = x.shape
    dev = x.device
    r = torch.rand(b, 6, generator=generator)
    apex_x = (0.5 + (r[:, 0] - 0.5) * 0.2) * w
    apex_y = (r[:, 1] - 0.5) * 0.1 * h
    half = torch.deg2rad(25 + 25 * r[:, 2])
    reach = (0.8 + 0.5 * r[:, 3]) * h
    near = 0.8 * r[:, 4]                          # extra brightness at the apex, fading with depth
    on = r[:, 5] < 0.5
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5,
                            torch.arange(w, dtype=torch.float32) + 0.5, indexing="ij")
    dx, dy = xx[None] - apex_x.view(b, 1, 1), yy[None] - apex_y.view(b, 1, 1)
    dist = torch.hypot(dx, dy)
    fan = (torch.atan2(dx.abs(), dy) <= half.view(b, 1, 1)) & (dist <= reach.view(b, 1, 1)) & (dy > 0)
    lo, hi = HEAD_FLOOR_LEVELS
    level = lo + (hi - lo) * torch.rand(b, generator=generator)
    depth = (dist / reach.view(b, 1, 1)).clamp(0, 1)
    lift = level.view(b, 1, 1) * (1 + near.view(b, 1, 1) * (1 - depth))
    lift = torch.where(fan & on.view(b, 1, 1), lift.clamp(max=0.9), torch.zeros_like(lift))[:, None].to(dev)
    pair = torch.randn((2, *x.shape), generator=generator)
    return lift * rayleigh_speckle(pair[0], pair[1]).to(dev) + (1 - lift) * x


def head_augment(image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None,
                 max_rot_deg: float = 20.0, zoom: tuple[float, float] = (0.85, 1.2), shift: float = 0.08,
                 augment: str = "basic") -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flip, rotation, zoom and shift (identical for image and soft mask, both
    (B,1,H,W)), then gain, gamma and speckle-like multiplicative noise on the image; with
    `augment="floor"`, first a raised noise floor on half the batch (models.augment._noise_floor),
    so that grey speckle around the head is not taken for head; with `fan`, that floor inside a
    random probe fan only (`_fan_floor`).

    No vertical flip: the probe's fan apex is always at the top of these frames, and the
    network may use it. The mask is resampled bilinearly so it stays a soft (sub-pixel) target."""
    if augment not in HEAD_AUGMENTS:
        raise ValueError(f"head augment {augment!r}: choose one of {HEAD_AUGMENTS}")
    b, dev = image.shape[0], image.device
    rnd = torch.rand(b, 8, generator=generator).to(dev)
    ang = (rnd[:, 0] * 2 - 1) * math.radians(max_rot_deg)
    scale = 1.0 / (zoom[0] + rnd[:, 1] * (zoom[1] - zoom[0]))
    fx = torch.where(rnd[:, 2] < 0.5, -1.0, 1.0)
    tx, ty = (rnd[:, 3] * 2 - 1) * shift * 2, (rnd[:, 4] * 2 - 1) * shift * 2
    cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
    theta = torch.stack([torch.stack([cos * fx, -sin, tx], 1), torch.stack([sin * fx, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    img = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    msk = F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if augment == "floor":
        img = _noise_floor(img.clamp(min=0), generator, HEAD_FLOOR_LEVELS)
    elif augment == "fan":
        img = _fan_floor(img.clamp(min=0), generator)
    gain = (0.75 + 0.5 * rnd[:, 5]).view(b, 1, 1, 1)
    gamma = torch.exp((rnd[:, 6] * 2 - 1) * math.log(1.5)).view(b, 1, 1, 1)
    noise = 1.0 + 0.15 * rnd[:, 7].view(b, 1, 1, 1) * torch.randn(image.shape, generator=generator).to(dev)
    return (img.clamp(min=0) ** gamma * gain * noise).clamp(0, 1.5), msk


class HeadModule(L.LightningModule):
    """Head segmentation with soft Dice + binary cross-entropy against soft (area-resampled)
    masks, AdamW and a cosine learning-rate schedule."""

    def __init__(self, net: nn.Module, lr: float, max_epochs: int, augment: str | None = "basic") -> None:
        super().__init__()
        self.net, self.lr, self.max_epochs, self.augment = net, lr, max(max_epochs, 1), augment
        self.dice = DiceLoss(sigmoid=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_fit_start(self) -> None:
        self.net.train()   # a network handed over from inference code may be in eval mode

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        img, msk = batch
        if self.augment:
            img, msk = head_augment(img, msk, augment=self.augment)
        logits = self(img)
        loss = self.dice(logits, msk) + F.binary_cross_entropy_with_logits(logits, msk)
        self.log("head_train_loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        img, msk = batch
        pred, ref = self(img) > 0, msk > 0.5
        dice = 2 * (pred & ref).sum().float() / (pred.sum() + ref.sum()).clamp(min=1)
        self.log("head_val_dice", dice, prog_bar=True, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_epochs, eta_min=self.lr * 0.02)
        return {"optimizer": opt, "lr_scheduler": sched}
