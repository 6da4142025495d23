"""The registered model: an MLflow pyfunc around pipelines.inference.Predictor.

Input: a DataFrame with `image` (base64 of a PNG or of a DICOM file), `ga_weeks` and
`pixel_spacing_mm` (optional for DICOM). Output: the columns of `cbh predict` without
`overlay` (CONTRACT.md section 3).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

OUTPUT_COLUMNS = ["image", "frame", "hypoplasia_probability", "prediction", "tcd_mm", "tcd_z",
                  "tcd_centile", "cm_mm", "cm_centile", "ga_weeks", "model_uri"]


class InputError(ValueError):
    """A request row cannot be read (bad base64, unknown format, no spacing)."""


def decode_image(payload: str, spacing_mm: Any) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float]]]:
    """Frames (grey, valid region, spacing) of a base64 PNG/JPEG or DICOM file."""
    import pydicom

    from pipelines.deid import decode_raster, frames_rgb_or_grey, pixel_spacing_mm, region_mask, regions
    from pipelines.preprocess import to_grey

    try:
        raw = base64.b64decode(payload, validate=True)
    except (ValueError, TypeError) as exc:
        raise InputError("image is not valid base64") from exc
    if len(raw) > 132 and raw[128:132] == b"DICM":
        try:
            ds = pydicom.dcmread(io.BytesIO(raw))
            arr, _ = frames_rgb_or_grey(ds)
        except Exception as exc:  # boundary: any decoding failure is the caller's bad input
            raise InputError(f"DICOM cannot be decoded ({type(exc).__name__})") from exc
        spacing = pixel_spacing_mm(ds)
        if spacing is None and _spacing(spacing_mm) is None:
            raise InputError("DICOM has no calibrated region or PixelSpacing and no pixel_spacing_mm was given")
        spacing = spacing or _spacing(spacing_mm)
        valid = region_mask(arr.shape[1:3], regions(ds))
        return [(to_grey(f), valid, spacing) for f in arr]
    img = decode_raster(raw)
    if img is None:
        raise InputError("image is neither a DICOM file nor a decodable PNG/JPEG")
    spacing = _spacing(spacing_mm)
    if spacing is None:
        raise InputError("pixel_spacing_mm is required for PNG/JPEG input")
    return [(to_grey(img), np.ones(img.shape[:2], bool), spacing)]


def _spacing(value: Any) -> tuple[float, float] | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        vals = [float(v) for v in value]
        return (vals[0], vals[-1]) if vals and min(vals) > 0 else None
    v = float(value)
    return (v, v) if v > 0 else None


class CBHModel(mlflow.pyfunc.PythonModel):
    """Segmenter + ASC classifier + biometry behind MLflow's pyfunc interface."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from pipelines.inference import Predictor

        self.predictor = Predictor.load(Path(context.artifacts["weights"]))
        config = context.model_config or {}
        self.model_uri = config.get("model_uri", "")
        # `cbh serve --site` sets a commissioned site's threshold through the model_config
        if config.get("threshold") is not None:
            self.predictor.with_threshold(float(config["threshold"]))

    def predict_rows(self, frames: list[tuple], names: list[str], frame_idx: list[int],
                     masks: list | None = None) -> list[dict[str, Any]]:
        results = self.predictor.predict_frames(frames, masks)
        out = []
        for name, fi, res in zip(names, frame_idx, results, strict=True):
            row = {c: res.get(c, np.nan) for c in OUTPUT_COLUMNS}
            row.update(image=name, frame=fi, model_uri=self.model_uri)
            if "error" in res:
                row["prediction"] = "error: " + res["error"]
            row["_labels"], row["_crop"], row["_outside"] = res.get("_labels"), res.get("_crop"), res.get("_outside")
            out.append(row)
        return out

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Served by `mlflow models serve`: a row that cannot be read is the caller's error, answered
        with 400 and one sentence (an MlflowException), never a 500 or a stack trace."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self._predict(model_input)
        except (InputError, ValueError, TypeError) as exc:
            raise MlflowException(f"{type(exc).__name__ if not isinstance(exc, InputError) else 'bad input'}: "
                                  f"{exc}", error_code=INVALID_PARAMETER_VALUE) from None

    def _predict(self, model_input: pd.DataFrame) -> pd.DataFrame:
        if "image" not in model_input or "ga_weeks" not in model_input:
            raise InputError("input needs columns 'image' (base64 PNG or DICOM) and 'ga_weeks'")
        frames, names, idx = [], [], []
        for n, row in enumerate(model_input.itertuples(index=False)):
            spacing = getattr(row, "pixel_spacing_mm", None)
            for k, (grey, valid, sp) in enumerate(decode_image(row.image, spacing)):
                frames.append((grey, valid, sp, float(row.ga_weeks)))
                names.append(str(getattr(row, "name", n)) if hasattr(row, "name") else str(n))
                idx.append(k)
        rows = self.predict_rows(frames, names, idx)
        return pd.DataFrame([{c: r[c] for c in OUTPUT_COLUMNS} for r in rows], columns=OUTPUT_COLUMNS)
