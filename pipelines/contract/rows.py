"""Row-level metrics of the data contract that Great Expectations cannot compute itself.

Mask statistics, TCD z-scores, the mask-derived TCD against the annotated one, and the
per-patient split counts become plain columns (numpy/pyarrow), which standard expectations
then judge (pipelines/contract/validate.py). Mask statistics are cached by the mask file's SHA-256, so
a revalidation, or a new cohort beside an old one, reads and measures each mask once.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import biometry
from pipelines.data.importers import fit_outline

# pixel-domain statistics of one mask (cached); the mm values are derived with the row's spacing
MASK_STATS = ("mask_rows", "mask_cols", "mask_max_value", "mask_cerebellum_px", "mask_cisterna_px",
              "mask_cerebellum_components", "mask_cm_posterior", "mask_tcd_px")
HEAD_STATS = ("head_mask_components", "head_mask_ellipse_iou", "head_mask_hc_mm", "head_mask_hc_diff_mm")
DERIVED = ("tcd_z", "mask_decodes", *[c for c in MASK_STATS if c != "mask_tcd_px"], "mask_tcd_mm",
           "mask_tcd_diff_mm", *HEAD_STATS)
_CACHE_SCHEMA = pa.schema([("sha256", pa.string()), ("mask_rows", pa.int32()), ("mask_cols", pa.int32()),
                           ("mask_max_value", pa.int32()), ("mask_cerebellum_px", pa.int64()),
                           ("mask_cisterna_px", pa.int64()), ("mask_cerebellum_components", pa.int32()),
                           ("mask_cm_posterior", pa.bool_()), ("mask_tcd_px", pa.float64())])


def mask_stats(mask: np.ndarray) -> dict[str, object]:
    """Size, classes, structure sizes, connectivity and layout of one label mask.

    `mask_cm_posterior`: the cisterna magna lies along the head's occipito-frontal axis from
    the cerebellum (behind the vermis), not beside it. The axis is taken, as in the biometry,
    perpendicular to the cerebellum's transverse principal axis; the cisterna's centroid must
    be displaced from the cerebellum's more along that axis than across it, and lie outside
    the cerebellum's half-depth. Masks alone cannot tell front from back: a cisterna drawn in
    front of the cerebellum passes this rule.
    """
    full = np.asarray(mask)
    rows, cols = int(full.shape[0]), int(full.shape[1] if full.ndim > 1 else 0)
    max_value = int(full.max()) if full.size else 0
    # every statistic below is translation-invariant: work on the labels' bounding box only
    x, y, w, h = cv2.boundingRect((full > 0).astype(np.uint8)) if full.ndim == 2 else (0, 0, 0, 0)
    m = full[y:y + h, x:x + w]
    cb, cmask = m == 1, m == 2
    n_cb, n_cm = int(cb.sum()), int(cmask.sum())
    components = int(cv2.connectedComponents(cb.astype(np.uint8), connectivity=8)[0] - 1) if n_cb else 0
    posterior, tcd_px = None, float("nan")
    axis = biometry.cerebellar_axis(m) if n_cb >= 5 else None
    if axis is not None:
        tcd_px = biometry.extent_mm(cb, axis, 1.0)
        if n_cm:
            ys, xs = np.nonzero(cb)
            yc, xc = np.nonzero(cmask)
            d = np.array([xc.mean() - xs.mean(), yc.mean() - ys.mean()])
            across = abs(d @ np.array([math.cos(axis), math.sin(axis)]))
            of = axis - math.pi / 2
            along = abs(d @ np.array([math.cos(of), math.sin(of)]))
            half_depth = biometry.extent_mm(cb, of, 1.0) / 2
            posterior = bool(along > across and along > half_depth)
    return {"mask_rows": rows, "mask_cols": cols, "mask_max_value": max_value, "mask_cerebellum_px": n_cb,
            "mask_cisterna_px": n_cm, "mask_cerebellum_components": components,
            "mask_cm_posterior": posterior, "mask_tcd_px": tcd_px}


class MaskStatsCache:
    """SHA-256 of a mask file -> its statistics, in one Parquet file (disposable)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rows: dict[str, dict[str, object]] = {}
        if path is not None and path.is_file():
            for r in pq.read_table(path).to_pylist():
                self.rows[r.pop("sha256")] = r
        self._dirty = False

    def get(self, file: Path) -> dict[str, object] | None:
        try:
            data = file.read_bytes()
        except OSError:
            return None
        key = hashlib.sha256(data).hexdigest()
        if key in self.rows:
            return self.rows[key]
        mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if mask is None or mask.ndim != 2:
            return None
        self.rows[key] = stats = mask_stats(mask)
        self._dirty = True
        return stats

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([{"sha256": k, **v} for k, v in self.rows.items()], schema=_CACHE_SCHEMA)
        tmp = self.path.with_suffix(".partial")
        pq.write_table(table, tmp)
        tmp.replace(self.path)


def row_metrics(manifest: pd.DataFrame, workspace: Path | None, cache: MaskStatsCache | None = None) -> pd.DataFrame:
    """The manifest plus the derived columns the suites check (DERIVED)."""
    df = manifest.copy()
    tcd = _floats(df, "tcd_mm")
    df["tcd_z"] = np.asarray(biometry.tcd_zscore(tcd, _floats(df, "ga_weeks")), dtype=float)
    cache = cache or MaskStatsCache(None)
    stats: list[dict[str, object]] = []
    decodes: list[bool | None] = []
    paths = df["mask_path"].tolist() if "mask_path" in df else [None] * len(df)
    for rel in paths:
        given = isinstance(rel, str) and bool(rel)
        s = cache.get(workspace / rel) if (workspace is not None and given) else None
        stats.append(s or {})
        # a mask the manifest names but nobody can read here must not pass as "no mask"
        decodes.append((s is not None) if given else None)
    cache.save()
    df["mask_decodes"] = pd.array(decodes, dtype="boolean")
    for col in MASK_STATS:
        values = [s.get(col) for s in stats]
        df[col] = pd.array(values, dtype="boolean" if col == "mask_cm_posterior" else
                           ("Float64" if col == "mask_tcd_px" else "Int64"))
    tcd_mask = _floats(df, "mask_tcd_px") * _floats(df, "spacing_col_mm")
    df["mask_tcd_mm"] = tcd_mask
    df["mask_tcd_diff_mm"] = tcd_mask - tcd
    heads = [head_stats(workspace / rel) if workspace is not None and isinstance(rel, str) and rel else {}
             for rel in (df["head_mask_path"].tolist() if "head_mask_path" in df else [None] * len(df))]
    spacing = (_floats(df, "spacing_row_mm") + _floats(df, "spacing_col_mm")) / 2.0
    df["head_mask_components"] = pd.array([h.get("components") for h in heads], dtype="Int64")
    df["head_mask_ellipse_iou"] = np.array([h.get("iou", np.nan) for h in heads], dtype=float)
    df["head_mask_hc_mm"] = np.array([h.get("perimeter_px", np.nan) for h in heads], dtype=float) * spacing
    df["head_mask_hc_diff_mm"] = df["head_mask_hc_mm"].to_numpy() - _floats(df, "hc_mm")
    return df.drop(columns=["mask_tcd_px"])


def head_stats(path: Path) -> dict[str, float]:
    """One head mask: its connected pieces, how well one ellipse fills it (IoU of the mask and
    its fitted ellipse: an unfilled outline or a stray stroke scores low) and that ellipse's
    perimeter in pixels (mm with the row's spacing; HC18-like frames have square pixels)."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2:
        return {}
    head = (mask > 0).astype(np.uint8)
    pieces = cv2.connectedComponents(head, connectivity=8)[0] - 1
    outline = fit_outline(head)
    if outline is None:
        return {"components": pieces}
    filled = outline.filled(head.shape) > 0
    iou = float((filled & (head > 0)).sum()) / max(float((filled | (head > 0)).sum()), 1.0)
    return {"components": pieces, "iou": iou, "perimeter_px": outline.perimeter_px()}


def _floats(df: pd.DataFrame, column: str) -> np.ndarray:
    """A column as floats, NaN where missing or not a number (all NaN if the column is absent:
    the schema expectation reports that)."""
    if column not in df:
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def split_metrics(dataset: pd.DataFrame, frozen: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Row table (labelled rows, with per-patient split count and frozen-membership check) and
    one row per split (classes present) plus the test-vs-train distribution figures."""
    df = dataset[dataset["split"].isin(["train", "val", "test"])].copy()
    df["patient_split_count"] = df.groupby("patient_pseudo")["split"].transform("nunique").astype("int64")
    if frozen is not None and len(frozen):
        frozen_ids = set(frozen["image_id"])
        in_frozen = dataset["image_id"].isin(frozen_ids)
        # a frozen test image that is no longer in the test split, or a test image not frozen
        moved = set(dataset.loc[in_frozen & (dataset["split"] != "test"), "image_id"])
        added = set(dataset.loc[~in_frozen & (dataset["split"] == "test"), "image_id"])
        df["frozen_test_ok"] = ~df["image_id"].isin(moved | added)
    else:
        df["frozen_test_ok"] = True
    per_split = []
    for name in ("train", "val", "test"):
        part = df[df["split"] == name]
        per_split.append({"split": name, "images": len(part), "patients": part["patient_pseudo"].nunique(),
                          "classes": int(part["label"].nunique()),
                          "hypoplasia_share": float((part["label"] == "hypoplasia").mean()) if len(part) else 0.0,
                          "ga_median": float(part["ga_weeks"].median()) if len(part) else float("nan")})
    summary = pd.DataFrame(per_split)
    train = df[df["split"] == "train"]
    summary["ga_ks_vs_train"] = [_ks(df.loc[df["split"] == s, "ga_weeks"], train["ga_weeks"])
                                 for s in summary["split"]]
    summary["site_shift_vs_train"] = [_total_variation(df.loc[df["split"] == s, "site"], train["site"])
                                      for s in summary["split"]]
    return df, summary


def _ks(a: pd.Series, b: pd.Series) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (0 = same distribution, 1 = disjoint)."""
    x, y = np.sort(a.dropna().to_numpy(float)), np.sort(b.dropna().to_numpy(float))
    if not len(x) or not len(y):
        return float("nan")
    grid = np.concatenate([x, y])
    cdf_x = np.searchsorted(x, grid, "right") / len(x)
    cdf_y = np.searchsorted(y, grid, "right") / len(y)
    return float(np.max(np.abs(cdf_x - cdf_y)))


def _total_variation(a: pd.Series, b: pd.Series) -> float:
    """Total variation distance between the site shares of two groups (0 = same mix)."""
    pa_, pb = a.fillna("unknown").value_counts(normalize=True), b.fillna("unknown").value_counts(normalize=True)
    sites = pa_.index.union(pb.index)
    if not len(a) or not len(b):
        return float("nan")
    return float(0.5 * np.abs(pa_.reindex(sites, fill_value=0) - pb.reindex(sites, fill_value=0)).sum())
