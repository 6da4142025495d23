"""Inference shared by evaluation, the registered pyfunc and `cbh predict`.

One frame in (grey pixels, ultrasound-region mask, spacing, GA), one row out: probability,
prediction at the validated operating point, masks and the biometry they give in mm.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from numpy.typing import NDArray

from models.lightning import one_hot_masks
from models.networks import BiometryRule, make_classifier, make_segmenter
from pipelines import biometry
from pipelines.imaging.preprocess import (
    Crop,
    PreprocessError,
    Skull,
    head_mask,
    prepare_frame,
    warp,
)
from pipelines.serving.plane import NOT_ASSESSABLE, structure_confidence

GA_MEAN, GA_SD = 26.0, 6.0
SCALE_REF = math.log(0.6)


def context_features(ga_weeks: NDArray, mm_per_px: NDArray) -> NDArray[np.float32]:
    """GA and the crop's physical scale, standardised: the asc-ga model's context input."""
    ga = (np.asarray(ga_weeks, float) - GA_MEAN) / GA_SD
    scale = (np.log(np.asarray(mm_per_px, float)) - SCALE_REF) / 0.5
    return np.stack([ga, scale], 1).astype(np.float32)


@dataclass(frozen=True)
class ModelConfig:
    model: str
    features: int
    seg_channels: tuple[int, ...]
    size: int
    crop_margin: float
    threshold: float
    backbone: str = "small"
    shape_backbone: str = "small"
    image_norm: str = "none"       # a model saved before this option saw its crops as they are
    seg_norm: str = "batch"        # and its segmenter was batch-normalised
    frame: str = "classical"       # its crops were cut around fit_skull's skull, or the learned head's
    gate_reading: str = "sample"   # asc-paper's shape gate (models/paper.py)
    paper_width: float = 1.0       # asc-paper's channel width

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        raw = json.loads(path.read_text())
        raw["seg_channels"] = tuple(raw["seg_channels"])
        return cls(**raw)


def largest_components(labels: NDArray[np.uint8], head: NDArray[np.bool_] | None = None) -> NDArray[np.uint8]:
    """Anatomical priors: one cerebellum and one cisterna magna, stray blobs dropped; and, with
    `head` (preprocess.head_mask), no cerebellum outside the skull. On a scanner never seen in
    training the segmenter can run the cerebellum out through the occipital bone, or put its
    largest piece outside the head, which is what made the worst TCD errors (+5 to +10 mm).
    The cisterna magna is not clipped: it lies against the occipital bone, where the annotated
    cisterna often crosses the fitted ellipse."""
    out = np.zeros_like(labels)
    for cls in (1, 2):
        mask = labels == cls
        if cls == 1 and head is not None:
            mask &= head
        n, comp, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        if n > 1:
            out[comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))] = cls
    return out


def measured_tcd_z(labels: NDArray[np.uint8], context: NDArray[np.float32]) -> NDArray[np.float64]:
    """The TCD z-score each label mask gives at its GA (context columns 0 and 1: GA and the
    crop's scale, as context_features writes them); NaN where the cerebellum is missing."""
    ga = context[:, 0].astype(float) * GA_SD + GA_MEAN
    mm_per_px = np.exp(context[:, 1].astype(float) * 0.5 + SCALE_REF)
    tcd = np.array([biometry.measure_mask(m, s)[0] for m, s in zip(labels, mm_per_px, strict=True)])
    return biometry.tcd_zscore(tcd, ga)


def rule_probability(labels: NDArray[np.uint8], context: NDArray[np.float32]) -> NDArray[np.float64]:
    """P(hypoplasia) of the biometry rule: 1 - Phi(z + 1.645) on the measured TCD's z-score,
    so 0.5 exactly at the 5th centile; a missing measurement scores 0.5 (undecided)."""
    from scipy.special import ndtr

    z = measured_tcd_z(labels, context)
    return np.where(np.isfinite(z), 1.0 - ndtr(z - biometry.Z_5TH), 0.5)


# models whose classifier also reads the TCD z-score of the masks it is shown (context column 2)
TCD_Z_MODELS = ("asc-z",)
Z_CLIP, Z_SCALE = 8.0, 4.0


def with_tcd_z(labels: NDArray[np.uint8], context: NDArray[np.float32]) -> NDArray[np.float32]:
    """context_features plus a third column: the TCD z-score measured on `labels`, clipped to
    +-8 and divided by 4 (so it spans the range of the other inputs); 0, the population's mean,
    where the mask has no cerebellum to measure. The same masks go to the shape branch, so the
    network reads the measurement of what it sees, annotated or predicted."""
    z = np.clip(measured_tcd_z(labels, context), -Z_CLIP, Z_CLIP) / Z_SCALE
    return np.concatenate([context[:, :2], np.nan_to_num(z, nan=0.0)[:, None]], 1).astype(np.float32)


class Predictor:
    """Segmenter + classifier + biometry, on CPU unless told otherwise."""

    def __init__(self, seg: torch.nn.Module, cls: torch.nn.Module, cfg: ModelConfig,
                 device: str = "cpu", tta: bool = False) -> None:
        self.seg, self.cls, self.cfg, self.device = seg.to(device).eval(), cls.to(device).eval(), cfg, device
        # test-time augmentation: average the prediction with that of the left-right mirrored
        # crop (the skull-aligned crop is symmetric about its occipito-frontal axis)
        self.tta = tta

    def with_threshold(self, threshold: float) -> None:
        """Call hypoplasia at `threshold` instead of the operating point chosen on validation
        (a site's commissioned one, `pipelines.registry.commission`)."""
        self.cfg = replace(self.cfg, threshold=float(threshold))

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> "Predictor":
        cfg = ModelConfig.load(folder / "config.json")
        seg = make_segmenter(cfg.seg_channels, cfg.seg_norm)
        # only asc-paper takes its two settings: a model registered earlier carries a make_classifier
        # of five arguments in its own code, which MLflow may load in place of this tree's
        paper = (cfg.gate_reading, cfg.paper_width) if cfg.model == "asc-paper" else ()
        clf = make_classifier(cfg.model, cfg.features, cfg.backbone, cfg.shape_backbone, cfg.image_norm, *paper)
        seg.load_state_dict(torch.load(folder / "segmenter.pt", map_location=device, weights_only=True))
        clf.load_state_dict(torch.load(folder / "classifier.pt", map_location=device, weights_only=True))
        # (a BiometryRule has an empty state dict: nothing to load, nothing learnt)
        return cls(seg, clf, cfg, device)

    def parameter_metrics(self) -> dict[str, float]:
        """The size of what is registered (`model.parameters`, and per network), for reviewers
        comparing architectures."""
        from models.paper import count_parameters

        n_cls, n_seg = count_parameters(self.cls), count_parameters(self.seg)
        return {"model.parameters": float(n_cls + n_seg), "model.parameters_classifier": float(n_cls),
                "model.parameters_segmenter": float(n_seg)}

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.seg.state_dict(), folder / "segmenter.pt")
        torch.save(self.cls.state_dict(), folder / "classifier.pt")
        self.cfg.save(folder / "config.json")

    def segment(self, images: NDArray[np.float32], axis_ratios: NDArray | None = None,
                batch: int = 32) -> NDArray[np.uint8]:
        """Labels of the crops (0 background, 1 cerebellum, 2 cisterna magna). `axis_ratios`: each
        crop's skull axis ratio (Crop.axis_ratio), which places the head for the anatomical prior
        (largest_components); without them the prior is one blob per structure only."""
        return self.segment_qc(images, axis_ratios, batch)[0]

    def segment_qc(self, images: NDArray[np.float32], axis_ratios: NDArray | None = None,
                   batch: int = 32) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
        """`segment`, and for each crop whether the network put cerebellum outside the head
        before the prior cleared it: a segmenter leaving the skull, which on a new scanner is a
        sign of drift that needs no labels to see."""
        labels, outside, _ = self.segment_measure(images, axis_ratios, None, batch)
        return labels, outside

    def segment_measure(self, images: NDArray[np.float32], axis_ratios: NDArray | None,
                        mm_per_px: NDArray | None, batch: int = 32
                        ) -> tuple[NDArray[np.uint8], NDArray[np.bool_], NDArray[np.float64]]:
        """`segment_qc`, and with `mm_per_px` the TCD and CM depth of each crop (N, 2), measured
        from the class probabilities at a quarter of a pixel (`biometry.measure_soft`); NaN
        without. The probabilities live one batch at a time."""
        return self.segment_assess(images, axis_ratios, mm_per_px, batch)[:3]

    @torch.no_grad()
    def segment_assess(self, images: NDArray[np.float32], axis_ratios: NDArray | None,
                       mm_per_px: NDArray | None, batch: int = 32
                       ) -> tuple[NDArray[np.uint8], NDArray[np.bool_], NDArray[np.float64], NDArray[np.float64]]:
        """`segment_measure`, and how sure the segmenter is of each kept structure (N, 2: mean
        probability of cerebellum, cisterna magna over their pixels; NaN where absent), which the
        plane-quality gate reads."""
        n = len(images)
        ratios = np.full(n, np.nan) if axis_ratios is None else np.asarray(axis_ratios, float)
        size = images.shape[-1] if n else self.cfg.size
        labels = np.zeros((n, size, size), np.uint8)
        outside, meas, conf = np.zeros(n, bool), np.full((n, 2), np.nan), np.full((n, 2), np.nan)
        margin = self.cfg.crop_margin
        for i in range(0, n, batch):
            x = torch.from_numpy(images[i:i + batch]).to(self.device)
            prob = torch.softmax(self.seg(x), 1)
            if self.tta:
                prob = (prob + torch.softmax(self.seg(x.flip(-1)), 1).flip(-1)) / 2
            raw = prob.argmax(1).to(torch.uint8).cpu().numpy()
            p = prob.float().cpu().numpy()
            for j, m in enumerate(raw):
                k = i + j
                head = head_mask(size, margin, ratios[k])
                outside[k] = bool(((m == 1) & ~head).any())
                labels[k] = largest_components(m, head)
                conf[k] = structure_confidence(p[j], labels[k])
                if mm_per_px is not None:
                    meas[k] = biometry.measure_soft(p[j], labels[k], float(mm_per_px[k]))
        return labels, outside, meas, conf

    @torch.no_grad()
    def probability(self, images: NDArray[np.float32], labels: NDArray[np.uint8],
                    context: NDArray[np.float32], batch: int = 64) -> NDArray[np.float64]:
        if isinstance(self.cls, BiometryRule):
            return rule_probability(labels, context)
        if self.cfg.model in TCD_Z_MODELS and context.shape[1] == 2:
            context = with_tcd_z(labels, context)
        out = []
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).to(self.device)
            m = one_hot_masks(torch.from_numpy(labels[i:i + batch]).to(self.device))
            c = torch.from_numpy(context[i:i + batch]).to(self.device)
            p = torch.softmax(self.cls(x, m, c), 1)[:, 1]
            if self.tta:
                p = (p + torch.softmax(self.cls(x.flip(-1), m.flip(-1), c), 1)[:, 1]) / 2
            out.append(p.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def predict_frames(self, frames: list[tuple[NDArray, NDArray, tuple[float, float], float]],
                       masks: list[NDArray | None] | None = None,
                       skulls: list[Skull | None] | None = None) -> list[dict[str, Any]]:
        """frames: (grey, valid, spacing, ga); masks: annotated source masks (--use-masks);
        skulls: a head localiser's skull per frame (None where it found none). A model trained on
        learned frames (cfg.frame) cuts its crop around it, and around fit_skull's only where
        the localiser found none; a classical model the other way round. A frame with no skull
        from either gets only `no_head` (why) and its GA; the others the prediction, the crop's
        skull and its source (`_skull_source`: classical or learned) and the segmenter's
        confidence (`_confidence`)."""
        rows: list[dict[str, Any]] = [{} for _ in frames]
        ok: list[int] = []
        crops: list[Crop] = []
        sources: list[str] = []
        images = []
        for i, (grey, valid, spacing, ga) in enumerate(frames):
            learned = skulls[i] if skulls is not None else None
            # the learned head is the same kind of ellipse as fit_skull's (mm, long semi-axis a along
            # `angle`), so either cuts the crop; None asks fit_skull
            have = [learned] if learned is not None else []
            order = [*have, None] if self.cfg.frame == "learned" else [None, *have]
            why = ""
            for skull in order:
                try:
                    img, crop = prepare_frame(grey, valid, spacing, self.cfg.size, self.cfg.crop_margin, skull)
                    source = "classical" if skull is None else "learned"
                    break
                except PreprocessError as exc:
                    why = str(exc)
            else:
                rows[i] = {"no_head": why or "no fetal head found", "ga_weeks": float(ga)}
                continue
            ok.append(i)
            images.append(img[None])
            crops.append(crop)
            sources.append(source)
        if not images:
            return rows
        x = np.stack(images).astype(np.float32)
        labels, outside, soft, conf = self.segment_assess(x, [c.axis_ratio for c in crops],
                                                          [c.mm_per_px for c in crops])
        if masks is not None:
            for j, i in enumerate(ok):
                if masks[i] is not None:
                    labels[j] = warp(masks[i], crops[j], nearest=True)
                    soft[j] = biometry.measure_mask(labels[j], crops[j].mm_per_px)    # the annotated mask's
                    conf[j] = [1.0 if (labels[j] == c).any() else np.nan for c in (1, 2)]
        ga = np.array([frames[i][3] for i in ok], float)
        prob = self.probability(x, labels, context_features(ga, [c.mm_per_px for c in crops]))
        for j, (i, crop) in enumerate(zip(ok, crops, strict=True)):
            tcd, cm = (float(v) for v in soft[j])
            rows[i] = {
                "hypoplasia_probability": float(prob[j]),
                # a NaN probability is no answer, never `normal`
                "prediction": "hypoplasia" if prob[j] >= self.cfg.threshold
                else "normal" if prob[j] < self.cfg.threshold else NOT_ASSESSABLE,
                "tcd_mm": tcd, "tcd_z": float(biometry.tcd_zscore(tcd, ga[j])),
                "tcd_centile": float(biometry.tcd_centile(tcd, ga[j])),
                "cm_mm": cm, "cm_centile": float(biometry.cm_centile(cm, ga[j])),
                "ga_weeks": float(ga[j]), "_labels": labels[j], "_crop": crop,
                "_outside": bool(outside[j]),    # segmenter QC: it put cerebellum outside the skull
                "_skull_source": sources[j], "_confidence": (float(conf[j][0]), float(conf[j][1])),
            }
        return rows


__all__ = ["Predictor", "ModelConfig", "context_features", "with_tcd_z", "PreprocessError"]
