"""Networks: the segmenter and the anatomically constrained classifier (ASC) of Wu et al.

ASC (DESIGN.md): an image branch (CNN over the ultrasound crop) and a shape branch (CNN
over the cerebellum and cisterna magna masks as two channels); a shape-attention gate
(one transformer-encoder layer over the shape branch's spatial tokens, linear, sigmoid)
multiplies the image features; an MLP over [image, gated image, shape] gives two logits.
Optional context (GA, physical scale of the crop) joins the MLP input for `asc-ga`.
Networks are built from MONAI blocks (torchvision does not import beside this torch).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import UNet
from torch import nn


def make_segmenter(channels: tuple[int, ...]) -> nn.Module:
    """2D U-Net: grey crop -> 3 classes (background, cerebellum, cisterna magna)."""
    return UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=channels,
                strides=(2,) * (len(channels) - 1), num_res_units=1, norm="batch")


class Encoder(nn.Module):
    """A small strided CNN returning a (B, features, h, w) map."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], features: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers.append(Convolution(2, c, w, strides=2, kernel_size=3, norm="batch", act="relu"))
            layers.append(Convolution(2, w, w, strides=1, kernel_size=3, norm="batch", act="relu"))
            c = w
        layers.append(Convolution(2, c, features, strides=1, kernel_size=1, norm="batch", act="relu"))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ASCNet(nn.Module):
    """Anatomically constrained classifier; `use_shape=False` gives the image-only ablation."""

    def __init__(self, features: int = 32, widths: tuple[int, ...] = (16, 32, 64, 64),
                 context_dim: int = 0, use_shape: bool = True) -> None:
        super().__init__()
        self.use_shape, self.context_dim = use_shape, context_dim
        self.image = Encoder(1, widths, features)
        parts = features
        if use_shape:
            self.shape = Encoder(2, widths, features)
            self.attn = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(features, nhead=4, dim_feedforward=2 * features,
                                           dropout=0.1, batch_first=True), num_layers=1)
            self.gate = nn.Linear(features, features)
            parts = 3 * features
        if context_dim:
            self.context = nn.Sequential(nn.Linear(context_dim, 16), nn.ReLU())
            parts += 16
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(parts, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, image: torch.Tensor, masks: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        img = self.image(image).mean(dim=(2, 3))
        feats = [img]
        if self.use_shape:
            if masks is None:
                raise ValueError("ASCNet with a shape branch needs masks")
            fmap = self.shape(masks)
            tokens = fmap.flatten(2).transpose(1, 2)            # (B, h*w, F)
            shape = self.attn(tokens).mean(dim=1)
            gate = torch.sigmoid(self.gate(shape))
            feats = [img, img * gate, shape]
        if self.context_dim:
            if context is None:
                raise ValueError("this model needs context (GA, scale)")
            feats.append(self.context(context))
        return self.head(torch.cat(feats, dim=1))


class BiometryRule(nn.Module):
    """The interpretable baseline: no learnt weights; hypoplasia scored from the TCD z-score
    that the predicted cerebellum mask gives (pipelines.inference computes it)."""

    def forward(self, *_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("BiometryRule is evaluated from measurements, not called on tensors")


def make_classifier(model: str, features: int) -> nn.Module:
    """The comparison models selectable by `cbh train --model`."""
    if model == "biometry-rule":
        return BiometryRule()
    if model == "asc":
        return ASCNet(features)
    if model == "asc-ga":
        return ASCNet(features, context_dim=2)
    if model == "image-only":
        return ASCNet(features, use_shape=False)
    raise ValueError(f"unknown model {model!r}; choose asc, asc-ga, image-only or biometry-rule")
