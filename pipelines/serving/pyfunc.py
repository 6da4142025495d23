"""The registered model: an MLflow pyfunc around pipelines.serving.inference.Predictor.

Input: a DataFrame with `image` (base64 of a PNG or of a DICOM file), `ga_weeks` and
`pixel_spacing_mm` (optional for DICOM). Output: the columns of `cbh predict` without
`overlay` (CONTRACT.md section 3).

The registered model carries the `pipelines` and `models` packages in its `code/` folder
(tracking.code_paths), so it loads where this checkout is not installed; what this module
imports, transitively, must be pinned in tracking.SERVING_PACKAGES.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from pipelines.errors import CbhError
from pipelines.imaging import scan as S
from pipelines.imaging.scan import ScanError, is_dicom_bytes, read_scan

OUTPUT_COLUMNS = ["image", "frame", "hypoplasia_probability", "prediction", "reason", "tcd_mm", "tcd_z",
                  "tcd_centile", "cm_mm", "cm_centile", "hc_mm", "hc_centile", "head_found", "ga_weeks",
                  "model_uri"]
# what a not_assessable row leaves empty: no diagnosis and no posterior-fossa number from the wrong picture
WITHHELD = ("hypoplasia_probability", "tcd_mm", "tcd_z", "tcd_centile", "cm_mm", "cm_centile")


def _ga_weeks(value: Any, n: int) -> float:
    """A row's GA as a float: missing (None, NaN) is NaN, which the plane gate answers with
    `not_assessable`; text that is not a number is the caller's error."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"row {n}: ga_weeks {value!r} is not a number") from None


class InputError(CbhError, ValueError):
    """A request row cannot be read (bad base64, unknown format, no spacing)."""


def decode_image(payload: str, spacing_mm: Any) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float]]]:
    """Frames (grey, valid region, spacing) of a base64 PNG/JPEG or DICOM file. Base64 wrapped in
    lines (MIME's 76 columns, PEM's 64) is read as one."""
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError("image is not valid base64") from exc
    try:
        scan = read_scan(raw, spacing=spacing_mm)
    except ScanError as exc:
        raise InputError(str(exc)) from exc
    if scan.spacing is None:
        raise InputError("DICOM has no calibrated region or PixelSpacing and no pixel_spacing_mm was given"
                         if is_dicom_bytes(raw) else "pixel_spacing_mm is required for PNG/JPEG input")
    return [(f, scan.valid, scan.spacing) for f in scan.frames]


class CBHModel(mlflow.pyfunc.PythonModel):
    """Segmenter + ASC classifier + biometry behind MLflow's pyfunc interface, with the fetal
    head from a learned localiser (artifact `head`) when the model carries one, else from the
    classical skull fit, and the plane-quality gate (pipelines.serving.plane) on every row."""

    head: Any = None            # a pipelines.imaging.head.HeadLocaliser, or None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from pipelines.serving.inference import Predictor

        self.predictor = Predictor.load(Path(context.artifacts["weights"]))
        self.head = None
        if context.artifacts.get("head"):
            from pipelines.imaging.head import HeadLocaliser

            self.head = HeadLocaliser.load(Path(context.artifacts["head"]))
        config = context.model_config or {}
        self.model_uri = config.get("model_uri", "")
        # a scoring server's limits: those the model was registered under (or `cbh serve`'s); in a
        # process that read params.yaml (cbh predict, commissioning, a flow) the workspace's stay
        if not S.configured():
            S.configure(config.get("limits"))
        # `cbh serve --site` sets a commissioned site's threshold through the model_config
        if config.get("threshold") is not None:
            self.predictor.with_threshold(float(config["threshold"]))

    def predict_rows(self, frames: list[tuple], names: list[str], frame_idx: list[int],
                     masks: list | None = None, assess: bool = True) -> list[dict[str, Any]]:
        """One output row per frame (plus private `_` keys: labels, crop, QC). `assess=False`
        reports every frame that has a head as the model sees it, gate or not (commissioning
        measures the model itself); a frame without a head is not_assessable either way."""
        from pipelines import biometry
        from pipelines.imaging.head import hc_mm
        from pipelines.serving.plane import NOT_ASSESSABLE, PlaneEvidence, cerebellum_position, ga_problem
        from pipelines.serving.plane import assess as assess_plane

        localiser = getattr(self, "head", None)
        fits = localiser.locate_batch([f[0] for f in frames], [f[2] for f in frames]) if localiser else None
        skulls = [f.skull if f.found else None for f in fits] if fits is not None else None
        results = self.predictor.predict_frames(frames, masks, skulls)
        out = []
        for k, (name, fi, res) in enumerate(zip(names, frame_idx, results, strict=True)):
            row = {c: res.get(c, np.nan) for c in OUTPUT_COLUMNS}
            row.update(image=name, frame=fi, model_uri=self.model_uri, reason="")
            crop = res.get("_crop")
            if fits is not None:
                found, hc, why = fits[k].found, fits[k].hc_mm, fits[k].reason
            else:
                found = crop is not None
                hc = hc_mm(crop.skull.a, crop.skull.b) if crop is not None else None
                why = res.get("no_head", "")
            hc = float(hc) if found and hc is not None else np.nan
            row.update(head_found=bool(found), hc_mm=hc, hc_centile=float(biometry.hc_centile(hc, row["ga_weeks"])))
            conf = res.get("_confidence", (np.nan, np.nan))
            evidence = PlaneEvidence(
                head_found=bool(found) and crop is not None, head_reason=why, hc_mm=hc, ga_weeks=row["ga_weeks"],
                tcd_mm=row["tcd_mm"], cm_mm=row["cm_mm"], cerebellum_confidence=conf[0],
                cisterna_confidence=conf[1], outside=bool(res.get("_outside")),
                crop_skull=crop.skull if crop is not None else None,
                crop_from_classical=res.get("_skull_source") == "classical",
                learned_skull=skulls[k] if skulls is not None else None,
                cerebellum_position=cerebellum_position(res["_labels"], crop.size, crop.skull.a / crop.mm_per_px)
                if crop is not None and res.get("_labels") is not None else np.nan)
            ok, reason = assess_plane(evidence)
            # without a head or a usable GA nothing is reported, even to commissioning
            if not ok and (assess or crop is None or ga_problem(row["ga_weeks"])):
                row.update({c: np.nan for c in WITHHELD}, prediction=NOT_ASSESSABLE, reason=reason)
            row["_labels"], row["_crop"], row["_outside"] = res.get("_labels"), crop, res.get("_outside")
            row["_assessable"] = ok
            # plane quality: how sure the segmenter is of the less certain of the two structures
            row["_quality"] = float(np.nanmin(conf)) if ok and np.isfinite(conf).any() else np.nan
            out.append(row)
        return out

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Served by `mlflow models serve`: a row that cannot be read is the caller's error, answered
        with 400 and one sentence (an MlflowException), never a 500 or a stack trace."""
        import cv2
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self._predict(model_input)
        except (InputError, ValueError, TypeError) as exc:
            raise MlflowException(f"{type(exc).__name__ if not isinstance(exc, InputError) else 'bad input'}: "
                                  f"{exc}", error_code=INVALID_PARAMETER_VALUE) from None
        except cv2.error:        # an image OpenCV cannot resample (e.g. 2x5000): the input's fault, not ours
            raise MlflowException("bad input: the image cannot be processed at this size or shape",
                                  error_code=INVALID_PARAMETER_VALUE) from None

    def _predict(self, model_input: pd.DataFrame) -> pd.DataFrame:
        if "image" not in model_input or "ga_weeks" not in model_input:
            raise InputError("input needs columns 'image' (base64 PNG or DICOM) and 'ga_weeks'")
        size = sum(len(v) for v in model_input["image"] if isinstance(v, str))
        if size > S.LIMITS.max_request_bytes:
            raise InputError(f"the request's images hold {size:,} base64 characters, more than the "
                             f"{S.LIMITS.max_request_bytes:,} of limits.max_request_bytes")
        frames, names, idx = [], [], []
        for n, row in enumerate(model_input.itertuples(index=False)):
            spacing = getattr(row, "pixel_spacing_mm", None)
            for k, (grey, valid, sp) in enumerate(decode_image(row.image, spacing)):
                frames.append((grey, valid, sp, _ga_weeks(row.ga_weeks, n)))
                names.append(str(getattr(row, "name", n)) if hasattr(row, "name") else str(n))
                idx.append(k)
        rows = self.predict_rows(frames, names, idx)
        return pd.DataFrame([{c: r[c] for c in OUTPUT_COLUMNS} for r in rows], columns=OUTPUT_COLUMNS)
