"""Verification of cleaned pixels: Tesseract OCR looks for text left after cleaning.

A word counts as residual text when it has at least `min_chars` letters or digits, Tesseract's
confidence is at least `min_confidence` (speckle yields low-confidence gibberish, burned-in
text is read at 85-96 on the synthetic scanners) and it matches none of the allowed
calibration marks and on-screen labels (DEFAULT_ALLOWED, DEFAULT_VOCABULARY).

Tesseract is Debian's `tesseract-ocr` package (installed by `make ocr`), run as a command
with the image on stdin and TSV on stdout, one OpenMP thread per call (the de-identification
pool is the parallelism; the limit is set for that subprocess only, never for this process,
where it would also throttle torch).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import cv2
import numpy as np

# What scanners print inside the image area and is not an identifier: numbers with units
# (depth scale, frequency, gain), short parameter codes (TIS0.4, H4.00, DR60), probe names
# (L12-5, 6C1) and a vocabulary of on-screen labels. A date, a time, a long number or any other
# word is flagged. Sites extend both lists in params.yaml (deid.ocr_allowed, deid.ocr_vocabulary).
DEFAULT_ALLOWED = (
    r"^[+-]?\d{1,4}([.,]\d{1,3})?(cm|mm|MHz|kHz|Hz|dB|%|s|ms|fps|bpm|cm/s)?$",
    r"^[A-Za-z]{1,4}[:=]?\d{1,3}([.,]\d{1,2})?$",
    r"^[A-Za-z]{0,2}\d{1,2}([A-Za-z]{1,2}\d{0,2})?(-\d{1,2})?$",
)
DEFAULT_VOCABULARY = tuple((
    "gen pen hpen res dyn med low high mid gain depth freq comp map mape persist focus zoom cine frame "
    "frames power prf flow color colour pwr dual tgc harm thi asc desc diam dist area circ index cist mag "
    "tcd bpd efw edd liver kidney renal sag trans long axial lat ant post sup inf fetal head brain "
    "cereb vermis gyn abd general breast thyroid adult echo heart cardiac vasc probe preset mhz khz bpm tib tis hgen"
).split())
DATE_OR_TIME = re.compile(r"\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}|\d{1,2}:\d{2}")


class OcrUnavailable(RuntimeError):
    """Tesseract is not installed: verification cannot run, so nothing may pass unverified."""


@dataclass(frozen=True)
class OcrSettings:
    min_chars: int = 3
    min_confidence: float = 80.0
    allowed: tuple[str, ...] = DEFAULT_ALLOWED
    vocabulary: tuple[str, ...] = DEFAULT_VOCABULARY

    def is_allowed(self, word: str) -> bool:
        """A calibration mark or on-screen label: every '/'-separated part is short, a known
        pattern or a known word; dates and times never are."""
        bare = word.strip(".,:;()[]{}'\"*")
        if DATE_OR_TIME.search(bare):
            return False
        vocab = {v.lower() for v in self.vocabulary}
        patterns = [re.compile(p) for p in self.allowed]
        for part in bare.split("/"):
            if sum(ch.isalnum() for ch in part) < self.min_chars or part.lower() in vocab:
                continue
            if not any(p.match(part) for p in patterns):
                return False
        return True


def available() -> bool:
    return shutil.which("tesseract") is not None


def _grey(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2GRAY)
    if img.dtype != np.uint8:                       # 16-bit and signed: rescale to the displayed range
        lo, hi = float(img.min()), float(img.max())
        img = ((img.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1.0))).astype(np.uint8)
    return img


def _tesseract_words(grey: np.ndarray) -> list[tuple[str, float]]:
    """(word, confidence) as Tesseract reads them (sparse text, LSTM engine)."""
    ok, png = cv2.imencode(".png", grey)
    if not ok:
        raise ValueError("image cannot be encoded for OCR")
    res = subprocess.run(["tesseract", "stdin", "stdout", "--psm", "11", "--oem", "1", "tsv"], input=png.tobytes(),
                         capture_output=True, env={**os.environ, "OMP_THREAD_LIMIT": "1"}, check=False)
    if res.returncode:
        raise OcrUnavailable(f"tesseract failed ({res.stderr.decode(errors='replace').strip()[-200:]})")
    words = []
    for line in res.stdout.decode("utf-8", errors="replace").splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) == 12 and cols[11].strip():
            words.append((cols[11].strip(), float(cols[10])))
    return words


def _crop(img: np.ndarray) -> np.ndarray | None:
    """The frame in grey, cropped to its non-blank part (blanked borders carry nothing to read)."""
    grey = _grey(img)
    ys, xs = np.nonzero(grey)
    if ys.size == 0:
        return None
    return grey[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def residual_text(frames: np.ndarray | list[np.ndarray], settings: OcrSettings) -> list[str]:
    """Words Tesseract reads in the frame(s) that are not allowed calibration marks. Several
    frames are stacked into one image, so Tesseract starts once."""
    if not available():
        raise OcrUnavailable("tesseract is not installed (run `make ocr`): cleaned pixels cannot be verified")
    crops = [c for c in map(_crop, frames if isinstance(frames, list) else [frames]) if c is not None]
    if not crops:
        return []
    width = max(c.shape[1] for c in crops) + 16
    sheet = np.vstack([cv2.copyMakeBorder(c, 8, 8, 8, width - 8 - c.shape[1], cv2.BORDER_CONSTANT, value=0)
                       for c in crops])
    found = []
    for word, conf in _tesseract_words(sheet):
        if float(conf) < settings.min_confidence or sum(ch.isalnum() for ch in word) < settings.min_chars:
            continue
        if not settings.is_allowed(word):
            found.append(word)
    return found
