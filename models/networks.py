"""Networks: the segmenter and the anatomically constrained classifier (ASC) of Wu et al.

ASC (DESIGN.md): an image branch (CNN over the ultrasound crop) and a shape branch (CNN
over the cerebellum and cisterna magna masks as two channels); a shape-attention gate
(one transformer-encoder layer over the shape branch's spatial tokens, linear, sigmoid)
multiplies the image features; an MLP over [image, gated image, shape] gives two logits.
Optional context joins the MLP input: GA and the crop's physical scale for `asc-ga`, the
scale alone for `asc-scale` (the head's size in millimetres, which the skull-normalised crop
no longer shows and the paper's fixed-size images did; no GA); for `asc-z` GA, scale and the
TCD z-score measured on the masks the shape branch sees (the rule's own input, so the network
can lean on the measurement where the image looks unlike anything it was trained on).
With `image_norm="equalise"` the image branch sees the crop histogram-equalised: each imaged
pixel replaced by its rank among the crop's imaged pixels. The image branch is then invariant
to any increasing grey-level map (gain, dynamic range, each vendor's post-processing curve);
what a scanner changes beyond that (grain, resolution) it must still learn from augmentation.
Networks are built from MONAI blocks (torchvision does not import beside this torch).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import UNet
from torch import nn

SEG_NORMS = ("batch", "instance")               # also pipelines/config.py, which checks params.yaml


def make_segmenter(channels: tuple[int, ...], norm: str = "batch") -> nn.Module:
    """2D U-Net: grey crop -> 3 classes (background, cerebellum, cisterna magna).

    `norm="instance"` normalises each feature map over its own image (then a learnt scale and
    shift) instead of over the training batch: a gain or contrast that a scanner applies to the
    whole image is largely normalised away inside the network, and inference uses no statistics
    gathered on the training scanners' images (docs/results.md, unseen scanners)."""
    if norm not in SEG_NORMS:
        raise ValueError(f"segmenter norm {norm!r}: choose one of {SEG_NORMS}")
    return UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=channels,
                strides=(2,) * (len(channels) - 1), num_res_units=1,
                norm=("instance", {"affine": True}) if norm == "instance" else "batch")


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


BACKBONES = ("small", "densenet121", "resnet18", "resnet34", "resnet50")


def make_encoder(name: str, in_channels: int, features: int, widths: tuple[int, ...] = (16, 32, 64, 64)) -> nn.Module:
    """A branch of ASC: a CNN returning a (B, features, h, w) map.

    `small` is the CPU default; the others are MONAI's networks (randomly initialised: no
    weights are downloaded), their feature maps projected to `features` channels. The
    paper used Inception-v3 (image) and VGG16-bn (shape), which MONAI does not provide;
    DenseNet-121 and ResNets are the closest it has.
    """
    if name == "small":
        return Encoder(in_channels, widths, features)
    from monai.networks import nets

    if name == "densenet121":
        body: nn.Module = nets.DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1).features
        width = 1024
    elif name.startswith("resnet") and name in BACKBONES:
        r = getattr(nets, name)(spatial_dims=2, n_input_channels=in_channels, num_classes=1)
        body = nn.Sequential(r.conv1, r.bn1, r.act, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4)
        width = r.fc.in_features
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    return nn.Sequential(body, nn.ReLU(), Convolution(2, width, features, kernel_size=1, norm="batch", act="relu"))


IMAGE_NORMS = ("none", "equalise")            # also pipelines/config.py, which checks params.yaml


def equalise(image: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image (B, C, H, W): an imaged pixel (> 0) becomes the share of
    the image's imaged pixels darker than it, in [0, 1); blank pixels (0, outside the sector or
    the frame) stay 0. Unchanged by any increasing map of the grey levels that keeps 0 at 0."""
    flat = image.reshape(image.shape[0], -1).float()
    ordered = torch.sort(flat, dim=1).values
    blank = (flat <= 0).sum(dim=1, keepdim=True)
    darker = torch.searchsorted(ordered, flat) - blank          # imaged pixels strictly darker
    rank = darker.clamp(min=0).float() / (flat.shape[1] - blank).clamp(min=1).float()
    return torch.where(flat > 0, rank, torch.zeros_like(rank)).reshape(image.shape).to(image.dtype)


class ASCNet(nn.Module):
    """Anatomically constrained classifier; `use_shape=False` gives the image-only ablation."""

    def __init__(self, features: int = 32, widths: tuple[int, ...] = (16, 32, 64, 64),
                 context_cols: tuple[int, ...] = (), use_shape: bool = True, backbone: str = "small",
                 shape_backbone: str = "small", image_norm: str = "none") -> None:
        super().__init__()
        if image_norm not in IMAGE_NORMS:
            raise ValueError(f"image_norm {image_norm!r}: choose one of {IMAGE_NORMS}")
        self.equalise = image_norm == "equalise"
        # context_cols: which columns of the context (GA, scale) the model sees
        self.use_shape, self.context_cols = use_shape, tuple(context_cols)
        self.context_dim = context_dim = len(self.context_cols)
        self.image = make_encoder(backbone, 1, features, widths)
        parts = features
        if use_shape:
            self.shape = make_encoder(shape_backbone, 2, features, widths)
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
        img = self.image(equalise(image) if self.equalise else image).mean(dim=(2, 3))
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
            feats.append(self.context(context[:, list(self.context_cols)]))
        return self.head(torch.cat(feats, dim=1))


class BiometryRule(nn.Module):
    """The interpretable baseline: no learnt weights; hypoplasia scored from the TCD z-score
    that the predicted cerebellum mask gives (pipelines.serving.inference computes it)."""

    def forward(self, *_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("BiometryRule is evaluated from measurements, not called on tensors")


def make_classifier(model: str, features: int, backbone: str = "small", shape_backbone: str = "small",
                    image_norm: str = "none", gate_reading: str = "sample", paper_width: float = 1.0) -> nn.Module:
    """The comparison models selectable by `cbh train --model`; `asc-paper` is the published
    network (models/paper.py), whose branches and widths are its own (`features`, `backbone`
    and `shape_backbone` do not apply to it)."""
    kw = {"backbone": backbone, "shape_backbone": shape_backbone, "image_norm": image_norm}
    if model == "biometry-rule":
        return BiometryRule()
    if model == "asc-paper":
        from models.paper import PaperASCNet

        if paper_width >= 1.0:
            return PaperASCNet(gate_reading)
        # a shrunk copy for fast tests: every width scaled, the 1000-d outputs and the head too
        out = max(16, int(round(1000 * paper_width)))
        return PaperASCNet(gate_reading, width=paper_width, out_features=out,
                           feedforward=max(8, int(round(256 * paper_width))),
                           hidden=(max(8, int(round(500 * paper_width))), max(4, int(round(250 * paper_width)))))
    if model == "asc":
        return ASCNet(features, **kw)
    if model == "asc-ga":
        return ASCNet(features, context_cols=(0, 1), **kw)
    if model == "asc-scale":
        return ASCNet(features, context_cols=(1,), **kw)
    if model == "asc-z":
        return ASCNet(features, context_cols=(0, 1, 2), **kw)
    if model == "image-only":
        return ASCNet(features, use_shape=False, **kw)
    raise ValueError(f"unknown model {model!r}; choose asc, asc-ga, asc-scale, asc-z, image-only, "
                     "biometry-rule or asc-paper")
