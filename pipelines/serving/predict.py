"""`cbh predict`: a file, a folder or a cohort in, one CSV row per image out, plus overlays.

The model is loaded through MLflow (default `models:/cerebellar-hypoplasia@champion`).
Rows carry only the input's relative path and pseudonym-free measurements: nothing from
the header or the pixels' burned-in text is copied out.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable, NamedTuple

import cv2
import mlflow.pyfunc
import numpy as np

from pipelines.errors import CbhError
from pipelines.imaging.preprocess import PreprocessError, frame_labels, load_frame
from pipelines.imaging.scan import RASTER_SUFFIXES, ScanError, pixel_spacing_mm, read_dicom, sidecar_spacing_mm
from pipelines.imaging.scan import header_ga_weeks as scan_header_ga_weeks
from pipelines.serving.pyfunc import OUTPUT_COLUMNS

COLUMNS = OUTPUT_COLUMNS + ["overlay"]


class PredictInputError(CbhError, ValueError):
    """The input cannot be predicted on as given (a cohort's row without a number, nothing to read)."""


def _spacing(path: Path) -> tuple[float, float] | None:
    if path.suffix.lower() in RASTER_SUFFIXES:
        return sidecar_spacing_mm(path)
    return pixel_spacing_mm(read_dicom(path, header_only=True))


NO_GA = ("no gestational age: none given with --ga-weeks or in annotations.csv, and the DICOM header has no "
         "LastMenstrualDate with a StudyDate to count it from")


def _header(path: Path):
    """The DICOM header of `path`, or None (a raster, or a file whose own error comes later)."""
    if path.suffix.lower() in RASTER_SUFFIXES:
        return None
    try:
        return read_dicom(path, header_only=True)
    except (ScanError, OSError):
        return None


def header_ga_weeks(path: Path, ds=None) -> float:
    """Gestational age from `path`'s DICOM header (`scan.header_ga_weeks`); NaN for a raster or
    an unreadable header."""
    ds = ds if ds is not None else _header(path)
    return scan_header_ga_weeks(ds) if ds is not None else math.nan


def _frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1)) if ds is not None else 1
    except (TypeError, ValueError):
        return 1


def prediction_inputs(inp: Path, ga_default: float | None, use_masks: bool,
                      frame_stride: int = 1) -> list[tuple[Path, str, int, float, Path | None]]:
    """(file, display name, frame, GA, mask) for every frame to predict: a cohort's rows as
    listed; a file or folder's images, every `frame_stride`-th frame of a multi-frame DICOM."""
    if (inp / "annotations.csv").is_file():
        from pipelines.data.ingest import read_annotations
        out = []
        for n, row in enumerate(read_annotations(inp), 1):
            mask = inp / row["mask"] if use_masks and (row.get("mask") or "").strip() else None
            try:
                frame, ga = int(row.get("frame") or 0), float(row["ga_weeks"])
            except (TypeError, ValueError, KeyError):
                raise PredictInputError(f"{inp / 'annotations.csv'}: data row {n}: frame {row.get('frame')!r} or "
                                        f"ga_weeks {row.get('ga_weeks')!r} is not a number") from None
            out.append((inp / row["image"], row["image"], frame, ga, mask))
        return out
    suffixes = (".dcm", *RASTER_SUFFIXES)
    files = [inp] if inp.is_file() else sorted(p for p in inp.rglob("*") if p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"{inp}: no DICOM/PNG/JPEG input found")
    base = inp.parent if inp.is_file() else inp
    out = []
    for f in files:
        ds = _header(f)
        ga = ga_default if ga_default is not None else header_ga_weeks(f, ds)
        out += [(f, str(f.relative_to(base)), k, ga, None) for k in range(0, _frames(ds), max(1, frame_stride))]
    return out


EXAM_COLUMNS = ["exam", "images", "frames", "frames_used", "hypoplasia_probability", "prediction", "reason",
                "best_image", "best_frame", "plane_quality", "tcd_mm", "tcd_centile", "cm_mm", "cm_centile", "hc_mm",
                "hc_centile", "ga_weeks", "model_uri"]


def exam_key(path: Path) -> str:
    """What groups frames into one exam: the DICOM study (StudyInstanceUID), else the file."""
    ds = _header(path)
    uid = str(ds.get("StudyInstanceUID", "") or "").strip() if ds is not None else ""
    return f"study:{uid}" if uid else f"file:{path}"


def _usable(row: dict) -> bool:
    return bool(row.get("_assessable")) and not str(row.get("prediction", "")).startswith("error") \
        and row.get("prediction") != "not_assessable"


def exam_rows(items: list[Item], rows: list[dict], threshold: float, model_uri: str) -> list[dict]:
    """One row per exam, numbered in input order (the study's UID is an identifier: never
    written): the mean probability over its usable frames (assessable, not an error) called at
    the model's threshold; TCD, CM and HC with their centiles from the best frame, the usable
    frame whose less certain structure the segmenter is surest of (`plane_quality`, the mean
    class probability over that structure's pixels; the first such frame on a tie); how many
    frames it has and used. An exam with no usable frame is not_assessable. The threshold is
    the image-level operating point: the exam call has no validated sensitivity of its own.
    `_best` (not written) is the best frame's index in `items`, None without one."""
    groups: dict[str, list[int]] = {}
    keys: dict[Path, str] = {}                   # one header read per file, not per frame
    for k, item in enumerate(items):
        if item[0] not in keys:
            keys[item[0]] = exam_key(item[0])
        groups.setdefault(keys[item[0]], []).append(k)
    out = []
    for n, members in enumerate(groups.values(), 1):
        used = [k for k in members if _usable(rows[k])]
        probs = [float(rows[k]["hypoplasia_probability"]) for k in used
                 if rows[k].get("hypoplasia_probability") not in (None, "")]
        probs = [p for p in probs if math.isfinite(p)]
        prob = float(np.mean(probs)) if probs else math.nan
        quality = [(float(rows[k].get("_quality", math.nan)), -k) for k in used]
        ranked = [q for q in quality if math.isfinite(q[0])]
        best = -max(ranked)[1] if ranked else (used[0] if used else None)
        pick = rows[best] if best is not None else {}
        names = list(dict.fromkeys(items[k][1] for k in members))
        out.append({"exam": f"exam-{n}", "images": ";".join(names), "frames": len(members), "frames_used": len(used),
                    "hypoplasia_probability": prob,
                    "prediction": ("hypoplasia" if prob >= threshold else "normal") if prob == prob else
                    "not_assessable",
                    "reason": "" if used else "no frame of the exam was assessable (see its frame rows)",
                    "best_image": items[best][1] if best is not None else "",
                    "best_frame": items[best][2] if best is not None else "",
                    "plane_quality": float(pick.get("_quality", math.nan)) if pick else math.nan,
                    **{c: _number(pick.get(c)) for c in ("tcd_mm", "tcd_centile", "cm_mm", "cm_centile", "hc_mm",
                                                         "hc_centile", "ga_weeks")},
                    "model_uri": model_uri, "_best": best})
    return out


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


Item = tuple[Path, str, int, float, "Path | None"]     # file, display name, frame, GA, mask


def load_head(ref: str):
    """A head localiser (pipelines.imaging.head.HeadLocaliser) from a folder holding head.json
    and head.pt, or from an MLflow model URI (`models:/fetal-head@champion`, `runs:/...`),
    whose files are under `artifacts/head`."""
    from pipelines.imaging.head import HeadLocaliser

    folder = Path(ref)
    if not (folder / "head.json").is_file():
        if ":/" not in ref:
            raise PredictInputError(f"--head-model {ref}: neither a folder with head.json and head.pt nor a model URI")
        import mlflow.artifacts

        dl = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
        folder = next((f for f in (dl / "artifacts" / "head", dl / "head", dl) if (f / "head.json").is_file()),
                      dl / "artifacts" / "head")
        if not (folder / "head.json").is_file():
            raise PredictInputError(f"--head-model {ref}: the model has no artifacts/head/head.json")
    return HeadLocaliser.load(folder)


def load_model(model_uri: str, tta: bool = False, threshold: float | None = None, head_model: str | None = None):
    """The registered pyfunc's Python model; `threshold` replaces the operating point chosen on
    validation (a site's commissioned one, `pipelines.registry.commission`); `head_model` (a
    folder or model URI, `load_head`) replaces the head localiser the model carries, if any."""
    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    model.model_uri = model_uri
    model.predictor.tta = tta
    if threshold is not None:
        model.predictor.with_threshold(threshold)
    if head_model:
        model.head = load_head(head_model)
    return model


def predict_items(items: list[Item], model, overlay_dir: Path | None, use_masks: bool = False,
                  batch: int = 16, assess: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], int]:
    """One row per item (an unreadable one gets `prediction` "error: ..."), overlays into
    `overlay_dir` when given; returns (rows, rows that failed). A row's `_outside` (not
    written out) says whether the segmenter put cerebellum outside the skull, `_assessable`
    whether it passed the plane-quality gate. `assess` applies that gate (`cbh predict`);
    without it a frame with a head keeps the model's numbers (commissioning measures the model)."""
    model_uri = model.model_uri
    if overlay_dir is not None:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict | None] = [None] * len(items)
    errors = 0
    pending: list[tuple[int, str, int, tuple, np.ndarray | None]] = []

    def error_row(name: str, frame: int, ga: float, why: str) -> dict:
        """The CSV row of a file or frame that could not be predicted: its name and why."""
        return {c: "" for c in COLUMNS} | {"image": name, "frame": frame, "ga_weeks": ga,
                                           "prediction": f"error: {why}", "model_uri": model_uri}

    def predict_pending() -> list[dict]:
        """The model's rows for the pending frames; where the batch fails, frame by frame, so a
        frame the model cannot take costs only its own row (`_failed`: why)."""
        masks = [m for *_, m in pending] if use_masks else None
        try:
            return model.predict_rows([f for _, _, _, f, _ in pending], [n for _, n, _, _, _ in pending],
                                      [fi for _, _, fi, _, _ in pending], masks, assess=assess)
        except Exception:  # boundary: retried one by one below, each failure named on its row
            pass
        out = []
        for _k, name, fi, f, m in pending:
            try:
                out.append(model.predict_rows([f], [name], [fi], [m] if use_masks else None, assess=assess)[0])
            except Exception as exc:  # boundary: one frame, named in the CSV
                text = str(exc).strip().splitlines()
                out.append({"_failed": f"{type(exc).__name__}: {text[-1][:200] if text else ''}"})
        return out

    def flush() -> None:
        nonlocal errors
        if not pending:
            return
        results = predict_pending()
        for (k, name, fi, (grey, valid, _sp, ga), _m), res in zip(pending, results, strict=True):
            if "_failed" in res:
                errors += 1
                rows[k] = error_row(name, fi, ga, res["_failed"])
                continue
            overlay = ""
            if res.get("_labels") is not None and overlay_dir is not None:
                overlay_path = overlay_dir / f"{k:05d}.png"
                labels, footprint = frame_labels(res["_labels"], res["_crop"], grey.shape)
                _draw_overlay(np.where(valid & footprint, grey, 0), footprint, labels, overlay_path)
                overlay = str(overlay_path)
            rows[k] = {c: res.get(c) for c in OUTPUT_COLUMNS} | {
                "overlay": overlay, "_outside": res.get("_outside"), "_assessable": res.get("_assessable"),
                # for the exam's SEG: the crop's labels (small) and how they map back to the frame
                "_quality": res.get("_quality"), "_labels": res.get("_labels"), "_crop": res.get("_crop"),
                "_shape": grey.shape}
        pending.clear()
        if progress:
            progress(sum(r is not None for r in rows), len(items))

    for k, (path, name, frame, ga, mask_path) in enumerate(items):
        try:
            spacing = _spacing(path)
            if spacing is None:
                raise PreprocessError("pixel spacing cannot be established")
            grey, valid = load_frame(path, frame)
            if not math.isfinite(ga):
                raise PreprocessError(NO_GA)
        except (PreprocessError, ScanError, OSError, ValueError, KeyError) as exc:
            errors += 1
            # an OSError's text repeats the full path, which the `image` column gives relative already
            why = (exc.strerror or type(exc).__name__) if isinstance(exc, OSError) else str(exc)
            rows[k] = error_row(name, frame, ga, why)
            continue
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED) if mask_path else None
        pending.append((k, name, frame, (grey, valid, spacing, ga), mask))
        if len(pending) == batch:
            flush()
    flush()
    return [r or {} for r in rows], errors


def _cell(value: object) -> object:
    """CSV text: NaN empty, booleans as true/false (CONTRACT section 5)."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    return "" if isinstance(value, float) and math.isnan(value) else value


class Summary(NamedTuple):
    """What `predict_path` wrote: frame rows, rows that failed, rows not assessable, and the
    drift signal counted once per file (its first assessable frame, else its first scored one):
    files scored and, of those, files whose segmentation left the skull. A cine's frames are
    one sweep, mostly off-plane and strongly correlated: counting them as independent trials
    would make one odd cine look like a new scanner."""

    rows: int
    errors: int
    not_assessable: int
    files_scored: int
    files_outside: int
    dicom_exams: int = 0            # exams given a SEG and SR (--dicom-out)
    dicom_notes: tuple[str, ...] = ()   # exams without one, or without a SEG, and why


def predict_path(inp: Path, out_csv: Path, model_uri: str, use_masks: bool = False,
                 ga_weeks: float | None = None, tta: bool = False, batch: int = 16,
                 threshold: float | None = None, head_model: str | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 frame_stride: int = 1, dicom_out: Path | None = None) -> Summary:
    """Write predictions and overlays, `batch` frames per forward pass; returns a `Summary`.
    `tta` averages each prediction with that of the mirrored crop; `threshold` replaces the
    model's operating point (a commissioned site's); `head_model` the model's head localiser
    (`load_head`). Beside the CSV, `<stem>-exams.csv` holds one row per exam (`exam_rows`); a
    multi-frame DICOM gives every `frame_stride`-th frame. `dicom_out`: a SEG and an SR per
    exam (`dicom_out.write_exam`)."""
    if not inp.exists():
        raise FileNotFoundError(f"{inp}: input not found")
    model = load_model(model_uri, tta, threshold, head_model)
    items = prediction_inputs(inp, ga_weeks, use_masks, frame_stride)
    rows, errors = predict_items(items, model, out_csv.parent / (out_csv.stem + "-overlays"), use_masks, batch,
                                 assess=True, progress=progress)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items() if not k.startswith("_")})
    with (out_csv.parent / (out_csv.stem + "-exams.csv")).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=EXAM_COLUMNS)
        w.writeheader()
        exams = exam_rows(items, rows, float(model.predictor.cfg.threshold), model.model_uri)
        for r in exams:
            w.writerow({k: _cell(v) for k, v in r.items() if not k.startswith("_")})
    written, notes = write_dicom_results(exams, items, rows, dicom_out, version_uri(model.model_uri),
                                         float(model.predictor.cfg.threshold)) if dicom_out else (0, [])
    not_assessable = sum(r.get("prediction") == "not_assessable" for r in rows)
    per_file: dict[Path, dict] = {}
    for item, r in zip(items, rows, strict=True):
        if str(r.get("prediction", "")).startswith("error") or not r:
            continue
        if item[0] not in per_file or (r.get("_assessable") and not per_file[item[0]].get("_assessable")):
            per_file[item[0]] = r
    return Summary(len(rows), errors, not_assessable, len(per_file),
                   sum(bool(r.get("_outside")) for r in per_file.values()), written, tuple(notes))


def version_uri(uri: str) -> str:
    """`models:/name@alias` as the version it names now (`models:/name/N`); other URIs as they are."""
    import re

    m = re.fullmatch(r"models:/([^/@]+)@([^/@]+)", uri)
    if not m:
        return uri
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return f"models:/{m[1]}/{MlflowClient().get_model_version_by_alias(m[1], m[2]).version}"
    except MlflowException:
        return uri


def write_dicom_results(exams: list[dict], items: list[Item], rows: list[dict], out_dir: Path,
                        model_uri: str, threshold: float | None = None) -> tuple[int, list[str]]:
    """A SEG and an SR for every exam whose best frame is a DICOM file (`dicom_out`); returns how
    many exams got them and, for the others (and a cine's missing SEG), one line each.
    `model_uri` names the version; the threshold joins it in the objects' UIDs."""
    from pipelines.serving.dicom_out import ExamResult, write_exam

    written, notes = 0, []
    for exam in exams:
        k = exam["_best"]
        if k is None:
            notes.append(f"{exam['exam']}: no assessable frame, nothing to report")
            continue
        path, _name, frame, *_ = items[k]
        if path.suffix.lower() in RASTER_SUFFIXES:
            notes.append(f"{exam['exam']}: scored on PNG/JPEG, no DICOM study to return to")
            continue
        labels, _ = frame_labels(rows[k]["_labels"], rows[k]["_crop"], rows[k]["_shape"])
        try:
            _seg, _sr, why = write_exam(ExamResult(exam["exam"], path, frame, labels, exam), out_dir, model_uri,
                                        "" if threshold is None else f"threshold={threshold:.6f}")
        except (ValueError, TypeError, AttributeError, KeyError, OSError) as exc:   # one exam named; the rest go on
            notes.append(f"{exam['exam']}: SEG/SR not written: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        written += 1
        if why:
            notes.append(f"{exam['exam']}: {why}")
    return written, notes


def _draw_overlay(grey: np.ndarray, footprint: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Only the head (the crop's footprint inside the ultrasound region) is drawn, so no
    burned-in text outside it can reach the overlay; the two structures are outlined."""
    img = cv2.cvtColor((np.clip(grey, 0, 1) * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    for cls, colour in ((1, (0, 0, 255)), (2, (255, 160, 0))):
        contours, _ = cv2.findContours((labels == cls).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, contours, -1, colour, 2)
    ys, xs = np.nonzero(footprint)
    if xs.size:
        img = img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    cv2.imwrite(str(path), img)
