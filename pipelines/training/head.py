"""Training and evaluation of the learned head localiser (pipelines/imaging/head.py) on real
fetal-head ultrasound: the HC18 challenge images with their expert ellipses, or any
(grey frame, head mask) pairs, e.g. synthetic heads.

HC18 (van den Heuvel et al. 2018, PLoS ONE 13(8): e0200412; Zenodo 1327317; CC BY 4.0):
each `NNN_HC.png` has `NNN_HC_Annotation.png`, the expert's ellipse drawn as a thin curve,
and a row in `pixel_size_and_hc.csv`. Frames named `NNN_2HC.png` are the same subject as
`NNN_HC.png`, so splits are drawn by subject."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from models.head import HeadModule, make_head_net
from pipelines.config import HeadSection
from pipelines.imaging.head import HeadLocaliser, HeadQuality, crop_square, ellipse_from_mask, hc_mm, to_square


def head_quality(params: HeadSection) -> HeadQuality:
    """The thresholds below which the localiser refuses a frame."""
    return HeadQuality(min_iou=params.min_iou, min_confidence=params.min_confidence, min_ratio=params.min_ratio,
                       min_inside=params.min_inside)


def make_localiser(net: nn.Module, params: HeadSection) -> HeadLocaliser:
    """A trained network wrapped with the section's input size, ellipse method and thresholds."""
    return HeadLocaliser(net, params.size, head_quality(params), params.tta, params.method, params.level,
                         batch_size=params.batch_size, features=params.features, refine=params.refine)


@dataclass(frozen=True)
class HeadItem:
    """One frame with its reference head: grey float32 in [0, 1], filled head mask, spacing
    (row, col) mm, and the reference circumference (the expert's, where given)."""

    name: str
    subject: str
    grey: NDArray[np.float32]
    mask: NDArray[np.bool_]
    spacing: tuple[float, float]
    hc_mm: float


# HC18's filled annotation is the expert's ellipse widened by 1.40 px (SD 0.06 px over the 500
# frames of the subset, measured against the CSV's HC): the outline was drawn thick, then filled
ANNOTATION_PAD_PX = 1.40


def annotation_ellipse(annotation: NDArray[np.uint8], pad_px: float = ANNOTATION_PAD_PX,
                       ) -> tuple[float, float, float, float, float]:
    """The expert's ellipse (cx, cy, a, b, angle; source pixels, radians): the annotation's
    outer contour filled (so a thin drawn curve works too), its second moments, less `pad_px`."""
    cnts, _ = cv2.findContours((annotation > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(annotation.shape, np.float32)
    cv2.drawContours(filled, [max(cnts, key=cv2.contourArea)], -1, 1.0, -1)
    e = ellipse_from_mask(filled, (1.0, 1.0), method="moments")
    if e is None:
        raise ValueError("annotation holds no ellipse")
    return e.cx, e.cy, e.a - pad_px, e.b - pad_px, e.angle


def filled_ellipse(shape: tuple[int, int], ellipse: tuple[float, float, float, float, float]) -> NDArray[np.bool_]:
    """The ellipse (cx, cy, a, b, angle; pixels) drawn filled at sub-pixel precision (cv2's 4-bit shift)."""
    cx, cy, a, b, ang = ellipse
    out = np.zeros(shape, np.uint8)
    cv2.ellipse(out, (round(cx * 16), round(cy * 16)), (round(a * 16), round(b * 16)), math.degrees(ang),
                0, 360, 1, -1, cv2.LINE_8, 4)
    return out > 0


def _hc18_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "pixel_size_and_hc.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def subject_of(name: str) -> str:
    """HC18's subject: the number before the first underscore (`010_2HC.png` -> `010`)."""
    return name.split("_", 1)[0]


def load_hc18(folder: Path, names: Iterable[str] | None = None) -> list[HeadItem]:
    """HC18 frames with filled expert ellipses; `names` restricts to those filenames."""
    keep = set(names) if names is not None else None
    items = []
    for row in _hc18_rows(folder):
        if keep is not None and row["filename"] not in keep:
            continue
        img = cv2.imread(str(folder / "images" / row["filename"]), cv2.IMREAD_GRAYSCALE)
        curve = cv2.imread(str(folder / "images" / row["annotation"]), cv2.IMREAD_GRAYSCALE)
        px = float(row["pixel_size_mm"])
        items.append(HeadItem(row["filename"], subject_of(row["filename"]), img.astype(np.float32) / 255.0,
                              filled_ellipse(img.shape, annotation_ellipse(curve)), (px, px),
                              float(row["head_circumference_mm"])))
    return items


def annotation_check(folder: Path, pad_px: float = ANNOTATION_PAD_PX) -> dict[str, float]:
    """How well the annotations reproduce the expert HC: Ramanujan's HC of the annotation's
    ellipse against the CSV value, absolute difference in mm, as filled (`raw_*`) and less
    `pad_px` (what training uses)."""
    raw, fixed = [], []
    for row in _hc18_rows(folder):
        ann = cv2.imread(str(folder / "images" / row["annotation"]), cv2.IMREAD_GRAYSCALE)
        _, _, a, b, _ = annotation_ellipse(ann, 0.0)
        px, ref = float(row["pixel_size_mm"]), float(row["head_circumference_mm"])
        raw.append(abs(hc_mm(a * px, b * px) - ref))
        fixed.append(abs(hc_mm((a - pad_px) * px, (b - pad_px) * px) - ref))
    out = {"n": float(len(raw))}
    for key, e in (("raw", np.asarray(raw)), ("padfix", np.asarray(fixed))):
        out.update({f"{key}_mean": float(e.mean()), f"{key}_p90": float(np.percentile(e, 90)),
                    f"{key}_max": float(e.max())})
    return out


def split_subjects(subjects: Sequence[str], val_fraction: float, test_fraction: float,
                   seed: int, held: Iterable[str] = (), order: Mapping[str, str] | None = None) -> dict[str, str]:
    """Subject -> 'train' | 'val' | 'test', a seeded permutation of the sorted subjects.

    `held`: subjects that must never train (the diagnosis model's test patients, whose crops
    this localiser frames). They are test subjects, and count towards `test_fraction`; the
    rest of the test part, if any, is drawn from the permutation as without them. `order`: a
    sort key per subject to permute in place of the name (the stage passes the cleaned pixels'
    digest, so a pseudonym that changes with the key does not change the split)."""
    uniq = sorted(set(subjects), key=lambda s: ((order or {}).get(s, ""), s))
    held_here = set(held) & set(uniq)
    free = [s for s in uniq if s not in held_here]
    perm = np.random.default_rng(seed).permutation(len(free))
    n_test = max(round(len(uniq) * test_fraction) - len(held_here), 0)
    n_val = round(len(uniq) * val_fraction)
    out = {s: "test" for s in held_here}
    out.update({free[j]: "test" if i < n_test else "val" if i < n_test + n_val else "train"
                for i, j in enumerate(perm)})
    return out


# the refining crops training sees: the head's long axis spans CROP_FILL of the crop's side
# (inference cuts at REFINE_FILL, inside that range, around a first pass that is never exact),
# and the crop's centre lies up to CROP_JITTER of its side from the head's
CROP_FILL, CROP_JITTER = (0.5, 0.7), 0.05


def arrays_from_pairs(pairs: Iterable[tuple[NDArray[np.floating], NDArray]], size: int,
                      crops: bool = False, seed: int = 0) -> tuple[NDArray[np.float32], ...]:
    """(grey frame, head mask) pairs -> network inputs and soft targets, (N,1,size,size) each:
    both padded to a square and area-resampled, so the target keeps the edge's sub-pixel place.
    With `crops`, also the inputs and targets of the crop of each source frame around its head
    that a refining pass sees (fill and centre drawn with `seed`): four arrays, not two."""
    rng = np.random.default_rng(seed)
    xs, ys, cxs, cys = [], [], [], []
    for grey, mask in pairs:
        g, m = np.asarray(grey, np.float32), np.asarray(mask, np.float32)
        xs.append(to_square(g, size)[0])
        ys.append(to_square(m, size)[0])
        if not crops:
            continue
        head = ellipse_from_mask(m, (1.0, 1.0), method="moments")
        if head is None:                                   # no head drawn: the crop is the frame
            cxs.append(xs[-1])
            cys.append(ys[-1])
            continue
        side = 2 * head.a / rng.uniform(*CROP_FILL)
        dx, dy = rng.uniform(-CROP_JITTER, CROP_JITTER, 2) * side
        cxs.append(crop_square(g, head.cx + dx, head.cy + dy, side, size)[0])
        cys.append(crop_square(m, head.cx + dx, head.cy + dy, side, size)[0])
    whole = (np.stack(xs)[:, None], np.stack(ys)[:, None])
    return (*whole, np.stack(cxs)[:, None], np.stack(cys)[:, None]) if crops else whole


class _FrameOrCrop(Dataset):
    """Each item once per epoch, as its whole frame or, half the time, its refining crop:
    an epoch costs what it costs without crops."""

    def __init__(self, arrays: tuple[NDArray[np.float32], ...], generator: torch.Generator) -> None:
        self.x, self.y, self.cx, self.cy = (torch.from_numpy(a) for a in arrays)
        self.generator = generator

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if float(torch.rand(1, generator=self.generator)) < 0.5:
            return self.cx[i], self.cy[i]
        return self.x[i], self.y[i]


class _EpochLog(L.Callback):
    """One line per epoch: a CPU run is long enough to want to see it converge."""

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        m = trainer.callback_metrics
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
              + " ".join(f"{k} {float(v):.4f}" for k, v in sorted(m.items()) if k.startswith("head_")), flush=True)


def train_head(train: tuple[NDArray, ...], val: tuple[NDArray, NDArray] | None,
               params: HeadSection) -> tuple[nn.Module, float]:
    """The trained network (eval mode, CPU) and the training time in seconds. With
    `params.refine`, `train` holds the whole frames and their crops (arrays_from_pairs(crops=True))."""
    if params.refine != (len(train) == 4):
        raise ValueError(f"head.refine is {params.refine}: training needs arrays_from_pairs(..., crops="
                         f"{params.refine}), got {len(train)} arrays")
    L.seed_everything(params.seed, workers=True)
    net = make_head_net(params.features)
    module = HeadModule(net, params.lr, params.max_epochs, params.augment)
    g = torch.Generator().manual_seed(params.seed)
    data = (_FrameOrCrop(train, torch.Generator().manual_seed(params.seed + 1)) if params.refine
            else TensorDataset(torch.from_numpy(train[0]), torch.from_numpy(train[1])))
    tr = DataLoader(data, batch_size=params.batch_size, shuffle=True, generator=g,
                    drop_last=len(data) > params.batch_size)
    va = (DataLoader(TensorDataset(torch.from_numpy(val[0]), torch.from_numpy(val[1])), batch_size=32)
          if val is not None and len(val[0]) else None)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=params.max_epochs, deterministic=True, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, limit_val_batches=1.0 if va is not None else 0,
                        callbacks=[_EpochLog()])
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, tr, va)
    seconds = time.perf_counter() - start
    # on a shared machine the wall time overstates the cost; the process CPU time does not
    print(f"training wall {seconds:.1f} s, process CPU {time.process_time() - cpu:.1f} s")
    return net.eval(), seconds


def reference_hc(item: HeadItem) -> float:
    """The item's reference HC, or Ramanujan's from its mask where none is given (NaN)."""
    if math.isfinite(item.hc_mm):
        return item.hc_mm
    ell = ellipse_from_mask(item.mask.astype(np.float32), item.spacing)
    return hc_mm(ell.a, ell.b) if ell is not None else math.nan


# what the validation subjects choose between: the ellipse fit, flip averaging, the threshold
METHODS, TTAS, LEVELS = ("contour", "moments", "robust"), (False, True), (0.4, 0.5, 0.6, 0.7)


def choose_localiser(net: nn.Module, params: HeadSection, val: Sequence[HeadItem],
                     ) -> tuple[HeadLocaliser, list[tuple[str, dict[str, float]]]]:
    """The ellipse method, flip averaging and threshold with the lowest HC error on the
    validation frames among those refusing at most `max_refused` of them (the section's own
    choice without validation frames), and every candidate's validation figures. With `refine`,
    every candidate is scored on the crops cut around the section's own first-pass fit (the
    network runs twice per flip setting, not per candidate); the chosen localiser cuts its own,
    so its figures are computed again (benchmarks/head_hc18.py prints them)."""
    if not val:
        return make_localiser(net, params), []
    table, best = [], None
    for tta in TTAS:
        probe = HeadLocaliser(net, params.size, head_quality(params), tta=tta, method=params.method,
                              level=params.level, batch_size=params.batch_size, features=params.features,
                              refine=params.refine)
        computed = probe.probabilities([it.grey for it in val])       # once per flip setting
        for method in METHODS:
            for level in LEVELS:
                loc = HeadLocaliser(net, params.size, head_quality(params), tta, method, level,
                                    batch_size=params.batch_size, features=params.features, refine=params.refine)
                m = evaluate_head(loc, val, computed)
                table.append((f"{method} tta={tta} level={level}", m))
                key = (m["refused_share"] > params.max_refused, m["hc_mae_mean"])
                if best is None or key < best[0]:
                    best = (key, loc)
    assert best is not None
    return best[1], table


def evaluate_head(localiser: HeadLocaliser, items: Sequence[HeadItem],
                  computed: tuple[list, list] | None = None) -> dict[str, float]:
    """Dice of the predicted head against the reference mask (source resolution), HC absolute
    error in mm on the frames given a value, the share refused, and inference ms per frame
    (`computed`: the localiser's probabilities for `items`, already run)."""
    start = time.perf_counter()
    probs, squares = computed if computed is not None else localiser.probabilities([it.grey for it in items])
    fits = [localiser.fit(p, s, it.spacing) for p, s, it in zip(probs, squares, items, strict=True)]
    ms = (time.perf_counter() - start) * 1000 / max(len(items), 1)
    dice, errs = [], []
    for p, s, it, fit in zip(probs, squares, items, fits, strict=True):
        pred = localiser.source_mask(p, s)
        dice.append(2 * np.count_nonzero(pred & it.mask) / max(np.count_nonzero(pred) + np.count_nonzero(it.mask), 1))
        if fit.found:
            errs.append(fit.hc_mm - reference_hc(it))
    signed = np.asarray(errs) if errs else np.asarray([math.nan])
    e = np.abs(signed)
    return {"n": float(len(items)), "dice_mean": float(np.mean(dice)), "hc_mae_mean": float(np.mean(e)),
            "hc_mae_median": float(np.median(e)), "hc_mae_p90": float(np.percentile(e, 90)),
            "hc_bias_mean": float(np.mean(signed)),
            "refused_share": 1.0 - len(errs) / max(len(items), 1), "ms_per_image": ms}


def load_head(path: Path) -> tuple[HeadLocaliser, HeadSection]:
    """A localiser from a state dict saved by benchmarks/head_hc18.py and the head section in
    its `.json` sidecar (keys the sidecar lacks take params.yaml's defaults)."""
    saved = json.loads(path.with_suffix(".json").read_text())
    params = HeadSection(**saved["params"])
    net = make_head_net(params.features)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return make_localiser(net, params), params
