"""`asc-paper`: Wu et al.'s ASC-Net as published, with its two ImageNet backbones defined here.

Neither backbone can be imported on this stack (torchvision does not import beside the CPU
torch wheel, timm imports torchvision, MONAI has neither), so both are written from their
architecture papers, in the layer layout and parameter names of torchvision's reference
implementation. That makes them checkable layer by layer (tests/unit/test_paper_network.py:
27,161,264 parameters for Inception-v3 with its auxiliary head, 138,365,992 for VGG16-bn, both
with 3 input channels and 1000 classes, the published figures) and lets a local torchvision
ImageNet state dict load into them unchanged (`load_imagenet`).

- Inception-v3 (Szegedy et al., "Rethinking the Inception architecture", CVPR 2016): the
  image branch, one grey channel in, 1000-d out (its ImageNet classifier layer kept as the
  feature layer, as in the published code). The auxiliary classifier does not fit a 224 px
  input (its 5x5 convolution meets a 3x3 map), so the branch is built without it.
- VGG16 with batch normalisation (Simonyan and Zisserman, ICLR 2015, configuration D): the
  shape branch, two channels in (cistern, cerebellum), 1000-d out.
- The gate: one TransformerEncoderLayer (one head, feed-forward 256) over the pooled 1000-d
  shape vector, a linear layer and a sigmoid; it multiplies the image features. The published
  code passes the batch's pooled vectors as one sequence, so each sample attends to the others
  in its batch and a prediction depends on what it was batched with: `gate_reading="batch"`
  reproduces that, `"sample"` (the default) gives each sample its own one-token sequence.
- The head: [image, gated image, shape] (3000) -> 500 -> 250 -> 2, ReLU and dropout 0.4.

`width` scales every channel count (and `out_features` the 1000-d outputs), keeping the
structure, for a fast CPU test; the published network is width 1.0, 1000 features.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

GATE_READINGS = ("sample", "batch")
INCEPTION_V3_PARAMETERS = 27_161_264      # 3 channels, 1000 classes, with the auxiliary head
VGG16_BN_PARAMETERS = 138_365_992         # 3 channels, 1000 classes


def _w(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


class BasicConv2d(nn.Module):
    """Convolution without bias, batch normalisation (eps 0.001), ReLU: Inception's unit."""

    def __init__(self, cin: int, cout: int, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    """35x35 grid: 1x1, 5x5, double 3x3 and pooled branches (figure 5 of the paper)."""

    def __init__(self, cin: int, pool: int, w: float) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, _w(64, w), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, _w(48, w), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(_w(48, w), _w(64, w), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, _w(64, w), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(_w(64, w), _w(96, w), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(_w(96, w), _w(96, w), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool, kernel_size=1)
        self.out = _w(64, w) * 2 + _w(96, w) + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), b3, pool], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (figure 10)."""

    def __init__(self, cin: int, w: float) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, _w(384, w), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, _w(64, w), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(_w(64, w), _w(96, w), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(_w(96, w), _w(96, w), kernel_size=3, stride=2)
        self.out = _w(384, w) + _w(96, w) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 grid with factorised 7x7 convolutions (figure 6)."""

    def __init__(self, cin: int, c7: int, w: float) -> None:
        super().__init__()
        o = _w(192, w)
        self.branch1x1 = BasicConv2d(cin, o, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, o, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, o, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, o, kernel_size=1)
        self.out = 4 * o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b7, d, pool], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, cin: int, w: float) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, _w(192, w), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(_w(192, w), _w(320, w), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, _w(192, w), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(_w(192, w), _w(192, w), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(_w(192, w), _w(192, w), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(_w(192, w), _w(192, w), kernel_size=3, stride=2)
        self.out = _w(320, w) + _w(192, w) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 grid with expanded filter banks (figure 7)."""

    def __init__(self, cin: int, w: float) -> None:
        super().__init__()
        t = _w(384, w)
        self.branch1x1 = BasicConv2d(cin, _w(320, w), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, t, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(t, t, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(t, t, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, _w(448, w), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(_w(448, w), t, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(t, t, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(t, t, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, _w(192, w), kernel_size=1)
        self.out = _w(320, w) + 4 * t + _w(192, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b3, d, pool], 1)


class InceptionAux(nn.Module):
    """The auxiliary classifier on the 17x17 grid (needs an input of about 299 px)."""

    def __init__(self, cin: int, classes: int, w: float) -> None:
        super().__init__()
        self.conv0 = BasicConv2d(cin, _w(128, w), kernel_size=1)
        self.conv1 = BasicConv2d(_w(128, w), _w(768, w), kernel_size=5)
        self.fc = nn.Linear(_w(768, w), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.conv0(F.avg_pool2d(x, kernel_size=5, stride=3)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Inception3(nn.Module):
    """Inception-v3; `forward` gives the 1000-d (or `classes`) output of its last layer."""

    def __init__(self, in_channels: int = 3, classes: int = 1000, aux_logits: bool = False,
                 width: float = 1.0, dropout: float = 0.5) -> None:
        super().__init__()
        w = width
        self.Conv2d_1a_3x3 = BasicConv2d(in_channels, _w(32, w), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(_w(32, w), _w(32, w), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(_w(32, w), _w(64, w), kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(_w(64, w), _w(80, w), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(_w(80, w), _w(192, w), kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(_w(192, w), _w(32, w), w)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out, _w(64, w), w)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out, _w(64, w), w)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out, w)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out, _w(128, w), w)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out, _w(160, w), w)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out, _w(160, w), w)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out, _w(192, w), w)
        self.AuxLogits = InceptionAux(self.Mixed_6e.out, classes, w) if aux_logits else None
        self.Mixed_7a = InceptionD(self.Mixed_6e.out, w)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out, w)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out, w)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.Mixed_7c.out, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(nn.Module):
    """VGG16 (configuration D) with batch normalisation; `forward` gives its 1000-d output."""

    def __init__(self, in_channels: int = 3, classes: int = 1000, width: float = 1.0, hidden: int = 4096,
                 dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out = _w(int(v), width)
                layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        h = _w(hidden, width)
        self.classifier = nn.Sequential(nn.Linear(c * 49, h), nn.ReLU(True), nn.Dropout(dropout),
                                        nn.Linear(h, h), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(h, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class PaperASCNet(nn.Module):
    """ASC-Net as published: Inception-v3 image branch, VGG16-bn shape branch, the shape gate over
    the pooled shape vector, [image, gated image, shape] -> 500 -> 250 -> 2."""

    def __init__(self, gate_reading: str = "sample", width: float = 1.0, out_features: int = 1000,
                 feedforward: int = 256, hidden: tuple[int, int] = (500, 250), dropout: float = 0.4) -> None:
        super().__init__()
        if gate_reading not in GATE_READINGS:
            raise ValueError(f"gate_reading {gate_reading!r}: choose one of {GATE_READINGS}")
        self.gate_reading = gate_reading
        self.image = Inception3(1, out_features, aux_logits=False, width=width)
        self.shape = VGG16BN(2, out_features, width=width)
        self.attn = nn.TransformerEncoderLayer(out_features, nhead=1, dim_feedforward=feedforward, batch_first=True)
        self.gate = nn.Linear(out_features, out_features)
        self.head = nn.Sequential(nn.Linear(3 * out_features, hidden[0]), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden[1], 2))

    def forward(self, image: torch.Tensor, masks: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        if masks is None:
            raise ValueError("asc-paper needs the two masks")
        img, shape = self.image(image), self.shape(masks)
        return self.head(torch.cat([img, img * self.shape_gate(shape), shape], 1))

    def shape_gate(self, shape: torch.Tensor) -> torch.Tensor:
        """The gate (B, F) in (0, 1) from the pooled shape vectors (B, F)."""
        if self.gate_reading == "batch":
            attended = self.attn(shape[None])[0]          # the batch as one sequence, as published
        else:
            attended = self.attn(shape[:, None])[:, 0]    # each sample alone
        return torch.sigmoid(self.gate(attended))


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def load_imagenet(net: PaperASCNet, inception: Path | None, vgg: Path | None) -> list[str]:
    """Load torchvision-format ImageNet state dicts (local files: nothing is downloaded) into the
    branches. The first convolution is adapted to the branch's channels: the RGB kernels summed
    for the grey image, the mean RGB kernel for each of the two mask channels. Returns what was
    loaded, one line per branch."""
    done = []
    for path, branch, key, name in ((inception, net.image, "Conv2d_1a_3x3.conv.weight", "Inception-v3"),
                                    (vgg, net.shape, "features.0.weight", "VGG16-bn")):
        if path is None:
            continue
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
        first = state[key]
        cin = branch.state_dict()[key].shape[1]
        state[key] = first.sum(1, keepdim=True) if cin == 1 else first.mean(1, keepdim=True).repeat(1, cin, 1, 1)
        branch.load_state_dict(state, strict=True)
        done.append(f"{name} ImageNet weights from {path.name}")
    return done
