"""Verification of cleaned pixels: Tesseract OCR looks for text left after cleaning.

A word counts as residual text when it has at least `min_chars` letters or digits, Tesseract's
confidence is at least `min_confidence` (speckle yields low-confidence gibberish, burned-in
text is read at 85-96 on the synthetic scanners) and it matches none of the allowed
calibration marks and on-screen labels (DEFAULT_ALLOWED, DEFAULT_VOCABULARY).

Tesseract is Debian's `tesseract-ocr` package (installed by `make ocr`). It runs in this
process through its C API (`libtesseract.so.5`, loaded with ctypes): the language model loads
once per process, not once per image (starting the command costs about 0.1 s, reading a
frame a few hundredths). One OpenMP thread: the de-identification pool is the parallelism.
The limit is given to Debian's libgomp as libtesseract loads it; a process where an OpenMP
runtime of that soname is already loaded (torch brings its own `libgomp.so.1`) could not be
limited, so it runs the `tesseract` command instead, as does a process where the library
cannot be loaded: image on stdin, TSV on stdout, the thread limit for that subprocess only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
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


# Glyphs Tesseract confuses on screen fonts ("Sag" read as "Saq" when the crop cuts the
# descender): a label is looked up in the vocabulary with each folded to one letter.
CONFUSABLE = str.maketrans("qi1|05", "glllos")


def fold(word: str) -> str:
    """A word as the vocabulary is looked up: lower case, confusable glyphs folded."""
    return word.lower().translate(CONFUSABLE)


class OcrUnavailable(CbhError, RuntimeError):
    """Tesseract is not installed: verification cannot run, so nothing may pass unverified."""

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


def available() -> bool:
    return shutil.which("tesseract") is not None


PSM_SPARSE_TEXT, OEM_LSTM_ONLY, DPI = 11, 1, 70      # what the command uses (70 dpi: its default)


def _parse_tsv(text: str) -> list[tuple[str, float]]:
    words = []
    for line in text.splitlines():
        cols = line.split("\t")
        if len(cols) == 12 and cols[11].strip() and cols[0] != "level":
            words.append((cols[11].strip(), float(cols[10])))
    return words


class _Library:
    """Tesseract's C API in this process: one engine, its model loaded once, one call at a time."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("tesseract") or "libtesseract.so.5"
        if _loaded("/libgomp.so"):
            # libgomp reads its thread limit once, when it loads: already loaded here, Tesseract's
            # parallel loops would start a thread per core in every worker process
            raise OSError("the system OpenMP runtime is already loaded")
        old = os.environ.get("OMP_THREAD_LIMIT")
        os.environ["OMP_THREAD_LIMIT"] = "1"          # read by Debian's libgomp as libtesseract loads it
        try:
            lib = ctypes.CDLL(name)
        finally:
            if old is None:
                os.environ.pop("OMP_THREAD_LIMIT", None)
            else:
                os.environ["OMP_THREAD_LIMIT"] = old
        vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        for fn, args, res in (("TessBaseAPICreate", [], vp), ("TessBaseAPIInit2", [vp, cp, cp, ci], ci),
                              ("TessBaseAPISetPageSegMode", [vp, ci], None),
                              ("TessBaseAPISetImage", [vp, vp, ci, ci, ci, ci], None),
                              ("TessBaseAPISetVariable", [vp, cp, cp], ci),
                              ("TessBaseAPIRecognize", [vp, vp], ci), ("TessBaseAPIGetTsvText", [vp, ci], vp),
                              ("TessDeleteText", [vp], None), ("TessBaseAPIClear", [vp], None)):
            getattr(lib, fn).argtypes, getattr(lib, fn).restype = args, res
        self.lib, self.api, self.lock = lib, lib.TessBaseAPICreate(), threading.Lock()
        if not self.api or lib.TessBaseAPIInit2(self.api, None, b"eng", OEM_LSTM_ONLY) != 0:
            raise OSError("libtesseract could not load its English model")
        lib.TessBaseAPISetPageSegMode(self.api, PSM_SPARSE_TEXT)
        lib.TessBaseAPISetVariable(self.api, b"user_defined_dpi", str(DPI).encode())
        lib.TessBaseAPISetVariable(self.api, b"debug_file", os.devnull.encode())   # its notes, not stderr

    def words(self, grey: np.ndarray, invert: bool = True) -> list[tuple[str, float]]:
        grey = np.ascontiguousarray(grey, dtype=np.uint8)
        lib = self.lib
        with self.lock:
            lib.TessBaseAPISetVariable(self.api, b"tessedit_do_invert", b"1" if invert else b"0")
            lib.TessBaseAPISetImage(self.api, grey.ctypes.data, grey.shape[1], grey.shape[0], 1, grey.strides[0])
            if lib.TessBaseAPIRecognize(self.api, None) != 0:
                raise OcrUnavailable("libtesseract failed to read an image")
            ptr = lib.TessBaseAPIGetTsvText(self.api, 0)
            try:
                text = ctypes.string_at(ptr).decode("utf-8", errors="replace") if ptr else ""
            finally:
                if ptr:
                    lib.TessDeleteText(ptr)
                lib.TessBaseAPIClear(self.api)
        return _parse_tsv(text)


def _loaded(fragment: str) -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any(fragment in line for line in maps)
    except OSError:
        return False


_ENGINE: list = []           # [the in-process engine, or None where the library cannot be loaded]


def _library() -> _Library | None:
    """This process's in-process engine, loaded on first use; None where it cannot be."""
    if not _ENGINE:
        try:
            _ENGINE.append(_Library())
        except OSError:
            _ENGINE.append(None)
    return _ENGINE[0]


def engine() -> str:
    """Which Tesseract reads images in this process: 'library' (in process) or 'command'."""
    return "library" if _library() is not None else "command"


def shown_grey(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2GRAY)
    if img.dtype != np.uint8:                       # 16-bit and signed: rescale to the displayed range
        lo, hi = float(img.min()), float(img.max())
        img = ((img.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1.0))).astype(np.uint8)
    return img


def _tesseract_words(grey: np.ndarray, via: str | None = None, invert: bool = True) -> list[tuple[str, float]]:
    """(word, confidence) as Tesseract reads them (sparse text, LSTM engine), in this process
    where the library loads (`via`: force 'library' or 'command'). `invert`: Tesseract also reads
    the inverted line wherever a line reads poorly (its default; False: one polarity only)."""
    if (via or engine()) == "library":
        if (lib := _library()) is None:
            raise OcrUnavailable("libtesseract cannot be loaded")
        return lib.words(grey, invert)
    ok, png = cv2.imencode(".png", grey)
    if not ok:
        raise ValueError("image cannot be encoded for OCR")
    res = subprocess.run(["tesseract", "stdin", "stdout", "--psm", str(PSM_SPARSE_TEXT), "--oem", str(OEM_LSTM_ONLY),
                          "--dpi", str(DPI), "-c", f"tessedit_do_invert={int(invert)}", "tsv"],
                         input=png.tobytes(), capture_output=True, env={**os.environ, "OMP_THREAD_LIMIT": "1"},
                         check=False)
    if res.returncode:
        raise OcrUnavailable(f"tesseract failed ({res.stderr.decode(errors='replace').strip()[-200:]})")
    return _parse_tsv(res.stdout.decode("utf-8", errors="replace"))


def _crop(img: np.ndarray) -> np.ndarray | None:
    """The frame in grey, cropped to its non-blank part (blanked borders carry nothing to read)."""
    grey = shown_grey(img)
    ys, xs = np.nonzero(grey)
    if ys.size == 0:
        return None
    return grey[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def shown_words(grey: np.ndarray) -> list[tuple[str, float]]:
    """The first read of `residual_text`: the grey frame(s) as shown. Burned-in text is bright
    on the dark screen, so the image is inverted and read dark on white, in one polarity.
    Tesseract's per-line retry in the other one costs 40% of the read; it caught 1 more of 400
    planted strings and flagged 2 more clean scans of 708 (benchmarks/ocr_sensitivity.py)."""
    return _tesseract_words(255 - grey, invert=False)


def residual_text(frames: np.ndarray | list[np.ndarray], settings: OcrSettings) -> list[str]:
    """Distinct words Tesseract reads in the frame(s) that are not allowed calibration marks: in
    the frames as shown, then in their bright marks alone (`bright_marks`). Several frames are
    stacked into one image, so Tesseract starts twice at most."""
    if not available():
        raise OcrUnavailable("tesseract is not installed (run `make ocr`): cleaned pixels cannot be verified")
    crops = [c for c in map(_crop, frames if isinstance(frames, list) else [frames]) if c is not None]
    if not crops:
        return []
    width = max(c.shape[1] for c in crops) + 16
    sheet = np.vstack([cv2.copyMakeBorder(c, 8, 8, 8, width - 8 - c.shape[1], cv2.BORDER_CONSTANT, value=0)
                       for c in crops])
    words = [(w, c, settings.min_confidence) for w, c in shown_words(sheet)]
    if (bright := bright_marks(sheet)) is not None:
        floor = max(settings.min_confidence, BRIGHT_MIN_CONFIDENCE)
        words += [(w, c, floor) for w, c in _tesseract_words(bright)]
    found = []
    for word, conf, min_confidence in words:
        if float(conf) < min_confidence or sum(ch.isalnum() for ch in word) < settings.min_chars:
            continue
        if not settings.is_allowed(word):
            found.append(word)
    return list(dict.fromkeys(found))            # a word both reads found, once


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
