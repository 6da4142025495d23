"""Random transforms for training only (deterministic preprocessing lives in
pipelines/imaging/preprocess.py and is shared with inference). Applied to whole batches on the
training device, so they cost nothing extra on a GPU worker."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(image: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator | None = None,
                  max_rot_deg: float = 15.0, zoom: tuple[float, float] = (0.8, 1.2),
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flips, rotation and zoom, identical for an image batch (B,C,H,W) and its masks (B,K,H,W)."""
    b, dev = image.shape[0], image.device
    rnd = torch.rand(b, 4, generator=generator).to(dev)
    ang = (rnd[:, 0] * 2 - 1) * math.radians(max_rot_deg)
    scale = 1.0 / (zoom[0] + rnd[:, 1] * (zoom[1] - zoom[0]))
    fx = torch.where(rnd[:, 2] < 0.5, -1.0, 1.0)
    fy = torch.where(rnd[:, 3] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
    theta = torch.stack([torch.stack([cos * fx, -sin * fy, torch.zeros_like(cos)], 1),
                         torch.stack([sin * fx, cos * fy, torch.zeros_like(cos)], 1)], 1)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is None:
        return out, None
    m = F.grid_sample(masks.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out, m.to(masks.dtype)


AUGMENTS = ("basic", "scanner", "floor")        # also pipelines/config.py, which checks params.yaml


def random_intensity(image: torch.Tensor, generator: torch.Generator | None = None,
                     augment: str = "basic") -> torch.Tensor:
    """What differs between scanners: gain (0.7-1.3), gamma (0.6-1.6, i.e. log compression
    and dynamic range), speckle grain (a Gaussian blur of 0-1.5 px on half the batch) and
    speckle-like multiplicative noise.

    `scanner` goes further, for scanners never seen in training: the grey-level curve is also
    bent by a random monotonic map (each vendor's post-processing map and dynamic range; it
    keeps black at black), the grain blur reaches 2.25 px, and on half the batch the speckle noise
    is coarse (drawn at a quarter or half the resolution), as from a wider beam.

    `floor` is `scanner` plus a raised noise floor on half the batch (`_noise_floor`): what a
    scanner with a wider dynamic range or more gain shows where the others show black."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment {augment!r}: choose among {', '.join(AUGMENTS)}")
    b, scanner = image.shape[0], augment in ("scanner", "floor")
    rnd = torch.rand(b, 5, generator=generator).to(image.device)
    gain = (0.7 + 0.6 * rnd[:, 0]).view(b, 1, 1, 1)
    gamma = torch.exp((rnd[:, 1] * 2 - 1) * math.log(1.6)).view(b, 1, 1, 1)
    out = image.clamp(min=0) ** gamma * gain
    if scanner:
        out = _random_curve(out, generator)
    sigma = (2.25 if scanner else 1.5) * rnd[:, 3]
    blur = rnd[:, 4] < 0.5
    if bool(blur.any()):
        out = torch.where(blur.view(b, 1, 1, 1), _gaussian_blur(out, sigma), out)
    if augment == "floor":
        out = _noise_floor(out, generator)
    noise = torch.randn(image.shape, generator=generator).to(image.device)
    if scanner:
        noise = torch.where((torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1).to(image.device),
                            _coarse_noise(image.shape, generator).to(image.device), noise)
    noise = 1.0 + 0.15 * rnd[:, 2].view(b, 1, 1, 1) * noise
    return (out * noise).clamp(0, 1.5)


def _random_curve(x: torch.Tensor, generator: torch.Generator | None, knots: int = 4,
                  strength: float = 0.6) -> torch.Tensor:
    """A random monotonic grey-level map per sample, piecewise linear through `knots` inner
    points on [0, 1], fixing 0 and 1 (values above 1 are shifted with it), blended with the
    identity by up to `strength`."""
    b, dev = x.shape[0], x.device
    steps = torch.rand(b, knots + 1, generator=generator).to(dev) + 0.2
    ys = torch.cat([torch.zeros(b, 1, device=dev), steps.cumsum(1)], 1)
    ys = ys / ys[:, -1:]                                               # 0 .. 1, increasing
    xs = torch.linspace(0, 1, knots + 2, device=dev).expand(b, -1)
    mix = strength * torch.rand(b, 1, generator=generator).to(dev)
    ys = (1 - mix) * xs + mix * ys
    v = x.clamp(0, 1).reshape(b, -1) * (knots + 1)
    i = v.floor().clamp(max=knots).long()
    lo, hi = ys.gather(1, i), ys.gather(1, i + 1)
    mapped = (lo + (v - i) * (hi - lo)).reshape(x.shape)
    return torch.where(x > 1, x, mapped)


def _noise_floor(x: torch.Tensor, generator: torch.Generator | None,
                 levels: tuple[float, float] = (0.05, 0.35)) -> torch.Tensor:
    """On half the batch, the black level raised to a textured grey: x -> L R + (1 - L) x with
    L in `levels` and R speckle-like (Rayleigh, mean 1, grain of 1, 2 or 4 px). Fluid that
    the training scanners clip to black (cisterna magna: 0.01 of the crop's range) shows as
    grey speckle on a scanner with a wider dynamic range (0.25 on the fifth synthetic one)."""
    b, dev = x.shape[0], x.device
    lo, hi = levels
    level = (lo + (hi - lo) * torch.rand(b, generator=generator)).view(b, 1, 1, 1).to(dev)
    on = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1).to(dev)
    pair = [_coarse_noise(x.shape, generator) if float(torch.rand(1, generator=generator)) < 0.5
            else torch.randn(x.shape, generator=generator) for _ in range(2)]
    rayleigh = rayleigh_speckle(pair[0], pair[1]).to(dev)
    return torch.where(on, level * rayleigh + (1 - level) * x, x)


def rayleigh_speckle(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """Speckle-like texture from two Gaussian fields (the echo's real and imaginary parts): their
    magnitude, Rayleigh-distributed, scaled to mean 1 per sample of (B, C, H, W)."""
    magnitude = torch.hypot(re, im)
    return magnitude / magnitude.mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)


def _coarse_noise(shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    """Unit-variance Gaussian noise with a grain of 2 or 4 pixels (drawn small, upsampled)."""
    b, c, h, w = shape
    factor = 4 if float(torch.rand(1, generator=generator)) < 0.5 else 2
    small = torch.randn(b, c, max(h // factor, 1), max(w // factor, 1), generator=generator)
    big = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return big / big.std().clamp(min=1e-6)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Per-sample separable Gaussian blur of (B, C, H, W) with standard deviations sigma (B,)."""
    b, c = x.shape[:2]
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None, :] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)            # (B*C, 2r+1)
    y = x.reshape(1, b * c, *x.shape[2:])
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return y.reshape(x.shape)
