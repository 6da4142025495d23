"""Crops in the anatomical frame, prepared once for training and evaluation: every labelled row
of the dataset brought into its skull-aligned crop, with its annotated mask warped alongside.

The skull is the learned head localiser's where one is given (pipelines/imaging/head.py), and
fit_skull's only where the localiser refuses a frame; the row records which (`frame_source`)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import cv2
import numpy as np
import pandas as pd

from pipelines.imaging import preprocess
from pipelines.imaging.preprocess import PreprocessError, load_frame, prepare_frame, warp

if TYPE_CHECKING:
    from pipelines.imaging.head import HeadLocaliser

# frames whose heads are located in one network batch: bounds the frames held in memory
LOCATE_CHUNK = 32


@dataclass
class Prepared:
    """Skull-aligned crops of the labelled rows, with everything training needs."""

    frame: pd.DataFrame                  # the dataset rows kept, in array order
    images: np.ndarray                   # (N, 1, S, S) float32
    labels: np.ndarray                   # (N, S, S) uint8 annotated masks (0 where none)
    mm_per_px: np.ndarray                # (N,)
    axis_ratio: np.ndarray               # (N,) the skull's axis ratio: where the head lies in the crop
    failed: dict[str, str] = field(default_factory=dict)   # image_id -> reason

    def subset(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.frame["split"].to_numpy() == split)

    def save(self, folder: Path, half: bool = False) -> None:
        """Write the arrays, the rows and the failures to `folder` (float16 images if `half`:
        half the size, for carrying a prepared cohort to a GPU worker)."""
        folder.mkdir(parents=True, exist_ok=True)
        images = self.images.astype(np.float16) if half else self.images
        (np.savez_compressed if half else np.savez)(folder / "arrays.npz", images=images, labels=self.labels,
                                                    mm_per_px=self.mm_per_px, axis_ratio=self.axis_ratio)
        self.frame.to_parquet(folder / "frame.parquet", index=False)
        (folder / "failed.json").write_text(json.dumps(self.failed))

    @classmethod
    def load(cls, folder: Path) -> Prepared:
        arrays = np.load(folder / "arrays.npz")
        # crops packed before the axis ratio was kept: NaN, the anatomical prior without the head
        ratio = arrays["axis_ratio"] if "axis_ratio" in arrays.files else np.full(len(arrays["mm_per_px"]), np.nan)
        return cls(pd.read_parquet(folder / "frame.parquet"), arrays["images"].astype(np.float32, copy=False),
                   arrays["labels"], arrays["mm_per_px"], ratio, json.loads((folder / "failed.json").read_text()))


def prepare(dataset: pd.DataFrame, workspace: Path, size: int, margin: float,
            progress: Callable[[int, int], None] | None = None, localiser: HeadLocaliser | None = None) -> Prepared:
    """The crops of the dataset's train/val/test rows, cut around the learned head where
    `localiser` finds it, else around fit_skull's skull; a row neither frames is `failed`."""
    rows = dataset[dataset["split"].isin(["train", "val", "test"])].reset_index(drop=True)
    images, labels, scale, ratio, keep, sources, failed = [], [], [], [], [], [], {}
    for start in range(0, len(rows), LOCATE_CHUNK):
        chunk = list(rows.iloc[start:start + LOCATE_CHUNK].itertuples(index=False))
        loaded: list[tuple[np.ndarray, np.ndarray] | None] = []
        for r in chunk:
            try:
                loaded.append(load_frame(workspace / r.deid_path, int(r.frame)))
            except PreprocessError as exc:
                failed[r.image_id] = str(exc)
                loaded.append(None)
        skulls: list = [None] * len(chunk)
        readable = [k for k, f in enumerate(loaded) if f is not None]
        if localiser is not None and readable:
            fits = localiser.locate_batch([loaded[k][0] for k in readable],
                                          [(chunk[k].spacing_row_mm, chunk[k].spacing_col_mm) for k in readable])
            for k, fit in zip(readable, fits, strict=True):
                skulls[k] = fit.skull if fit.found else None
        for k in readable:
            r, (grey, valid), i = chunk[k], loaded[k], start + k
            try:
                img, crop = prepare_frame(grey, valid, (r.spacing_row_mm, r.spacing_col_mm), size, margin, skulls[k])
            except PreprocessError as exc:
                failed[r.image_id] = str(exc) + ("" if localiser is None else "; the head localiser refused it too")
                continue
            mask = np.zeros((size, size), np.uint8)
            if isinstance(r.mask_path, str) and r.mask_path:
                src = cv2.imread(str(workspace / r.mask_path), cv2.IMREAD_UNCHANGED)
                mask = warp(src, crop, nearest=True)
            images.append(img[None])
            labels.append(mask)
            scale.append(crop.mm_per_px)
            ratio.append(crop.axis_ratio)
            keep.append(i)
            sources.append("learned" if skulls[k] is not None else "classical")
        if progress:
            progress(min(start + LOCATE_CHUNK, len(rows)), len(rows))
    frame = rows.iloc[keep].reset_index(drop=True)
    frame["frame_source"] = pd.Series(sources, dtype="string")
    return Prepared(frame, np.stack(images).astype(np.float32), np.stack(labels), np.asarray(scale),
                    np.asarray(ratio), failed)


def prepare_cached(dataset_path: Path, workspace: Path, size: int, margin: float, cache_dir: Path,
                   progress: Callable[[int, int], None] | None = None, head_dir: Path | None = None) -> Prepared:
    """`prepare`, cached by the dataset's bytes, the crop settings, the preprocessing code and
    the head localiser (`head_dir`, HeadLocaliser.save's folder; None: fit_skull alone).

    Training and evaluation are two DVC stages (and two Prefect tasks); the skull fitting
    they share runs once. The cache lives outside the data store (a disposable speed-up:
    deleting it changes no result).
    """
    import hashlib

    h = hashlib.sha256(dataset_path.read_bytes())
    h.update(Path(preprocess.__file__).read_bytes())
    h.update(f"{size}|{margin}".encode())
    localiser = None
    if head_dir is not None:
        from pipelines.imaging import head

        for name in ("head.pt", "head.json"):
            h.update((head_dir / name).read_bytes())
        h.update(Path(head.__file__).read_bytes())
        localiser = head.HeadLocaliser.load(head_dir)
    entry = cache_dir / f"prepared-{h.hexdigest()[:24]}"
    if (entry / "arrays.npz").is_file():
        return Prepared.load(entry)
    data = prepare(pd.read_parquet(dataset_path), workspace, size, margin, progress, localiser)
    tmp = entry.with_name(entry.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    data.save(tmp)
    for old in cache_dir.glob("prepared-*"):           # one entry: the cache never grows
        if old != tmp:
            shutil.rmtree(old, ignore_errors=True)
    tmp.rename(entry)
    return data
