"""De-identification throughput: `cbh deid` (headers + pixels + OCR check) against dicognito
(headers only), on real ultrasound DICOM replicated into a corpus, in one run.

    .venv/bin/python benchmarks/deid_throughput.py [--files 300] [--workers 2]

The corpus: the real ultrasound files of pydicom, pydicom-data and deid-data (single-frame
and cine, uncompressed, JPEG baseline, JPEG 2000, RLE, palette, 16-bit), each copy given its
own patient, study and instance UIDs so every copy is a distinct exam (the pixels and the
encoding are the originals'). Each tool runs in its own fresh process, three times,
alternating (dicognito, cbh, dicognito, cbh, ...), each run after `sync` so that no run pays
for writing back the previous run's 1.5 GB; the medians are compared. Two more runs show where
the time goes: OCR of the first image of each device only (deid.ocr_sample 0), and no OCR at
all (verification switched off inside the benchmark: no setting of cbh does that). Peak memory is that
process's maximum resident set. `cbh deid` runs twice more, on half and on the whole corpus,
to show whether its peak memory grows with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

ROOT = Path(__file__).resolve().parents[1]
DEID_DATA = Path(__import__("deid_data").__file__).parent / "data" / "ultrasounds"
SOURCES = ["RGB_IMAGE.dcm", "GREYSCALE_IMAGE.dcm", "ultrasound-multiframe.dcm", "OBXXXX1A.dcm",
           "OBXXXX1A_rle.dcm", "examples_ybr_color.dcm", "gdcm-US-ALOKA-16.dcm", "US1_J2KR.dcm", "US1_J2KI.dcm"]
# the GE LOGIQ 700 frames (US1_*) have no regions: a site template, as a steward would configure it
LOGIQ = {"manufacturer": "G.E. Medical Systems", "model": "LOGIQ 700", "rows": 480, "columns": 640,
         "keep": [[48, 105, 592, 345]]}


def source(name: str) -> Path:
    return DEID_DATA / name if (DEID_DATA / name).is_file() else Path(get_testdata_file(name))


def build_corpus(out: Path, n: int) -> None:
    out.mkdir(parents=True)
    for i in range(n):
        name = SOURCES[i % len(SOURCES)]
        ds = pydicom.dcmread(source(name))
        ds.PatientID = f"BENCH{i:05d}"
        for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, attr, f"{pydicom.uid.generate_uid(entropy_srcs=[str(i), attr, name])}")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / f"{i:05d}_{name}")


CBH = """
import json, sys
from pathlib import Path
from pipelines.deid import core as D
from pipelines.deid.folder import deid_folder
settings = D.Settings(templates=D.parse_templates([json.loads(sys.argv[4])]),
                      ocr_sample=float(sys.argv[5]) if len(sys.argv) > 5 else D.Settings.ocr_sample)
if sys.argv[6:] == ["no-ocr"]:   # the cost of the rest alone (no setting turns verification off)
    D.Deidentifier._verify = lambda self, *args, **kwargs: False
rep = deid_folder(Path(sys.argv[1]), Path(sys.argv[2]), D.Pseudonymizer(b"benchmark-key", 365),
                  settings=settings, workers=int(sys.argv[3]))
print(json.dumps({k: rep[k] for k in ("inputs", "deidentified", "quarantined", "reasons", "ocr_verified")}))
"""

DICOGNITO = """
import sys
from pathlib import Path
import pydicom
from dicognito.anonymizer import Anonymizer
anon = Anonymizer(seed="benchmark")
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
n = 0
for path in sorted(Path(sys.argv[1]).iterdir()):
    with pydicom.dcmread(path) as ds:
        anon.anonymize(ds)
        ds.save_as(out / path.name)
        n += 1
print(n)
"""


def timed(code: str, *args: str) -> tuple[float, str]:
    """(wall seconds, last line of stdout) of the code in a fresh interpreter, started with no
    dirty pages left by an earlier run."""
    os.sync()
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return seconds, res.stdout.strip().splitlines()[-1]


def peak_of(code: str, *args: str) -> float:
    """Peak RSS (MiB) of the largest process of a fresh run's tree (wait4 reports the child's own
    maximum or that of its waited-for descendants, the pool's workers, whichever is larger)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"run failed ({status})")
    return usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2, help="cbh deid processes (params.yaml default: 2)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each tool (the median counts)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cbh-deid-bench-") as tmp:
        tmp = Path(tmp)
        build_corpus(tmp / "corpus", a.files)
        size = sum(p.stat().st_size for p in (tmp / "corpus").iterdir()) / 2 ** 20
        print(f"corpus: {a.files} files, {size:.0f} MiB, {len(SOURCES)} real ultrasound sources; "
              f"{os.cpu_count()} CPUs")
        template = json.dumps(LOGIQ)
        runs: dict[str, list[float]] = {"dicognito": [], "cbh": []}
        for _ in range(a.repeats):
            t, n_dic = timed(DICOGNITO, str(tmp / "corpus"), str(tmp / "dicognito"))
            runs["dicognito"].append(t)
            shutil.rmtree(tmp / "dicognito")
            t, rep = timed(CBH, str(tmp / "corpus"), str(tmp / "cbh"), str(a.workers), template)
            runs["cbh"].append(t)
            shutil.rmtree(tmp / "cbh")
        t_one, _ = timed(CBH, str(tmp / "corpus"), str(tmp / "cbh1"), "1", template)
        shutil.rmtree(tmp / "cbh1")
        # where the time goes: OCR of the first image of each device only (no sample), then none
        t_first, rep_first = timed(CBH, str(tmp / "corpus"), str(tmp / "cbh2"), str(a.workers), template, "0")
        shutil.rmtree(tmp / "cbh2")
        t_none, _ = timed(CBH, str(tmp / "corpus"), str(tmp / "cbh3"), str(a.workers), template, "0", "no-ocr")
        shutil.rmtree(tmp / "cbh3")
        t_dic, t_cbh = statistics.median(runs["dicognito"]), statistics.median(runs["cbh"])
        spread = {k: " ".join(f"{v:.1f}" for v in vals) for k, vals in runs.items()}
        print(f"dicognito (headers only, 1 process):           {int(n_dic) / t_dic:7.1f} files/s  "
              f"(median {t_dic:.1f} s of {spread['dicognito']})")
        print(f"cbh deid (headers + pixels + OCR, {a.workers} processes): "
              f"{a.files / t_cbh:7.1f} files/s  (median {t_cbh:.1f} s of {spread['cbh']})  {rep}")
        print(f"cbh deid (1 process):                          {a.files / t_one:7.1f} files/s  ({t_one:.1f} s)")
        print(f"ratio cbh/dicognito: {t_dic / t_cbh * a.files / int(n_dic):.2f} "
              f"(1 process: {t_dic / t_one * a.files / int(n_dic):.2f})")
        verified = json.loads(rep_first)["ocr_verified"]
        print(f"where the time goes ({a.workers} processes, one run each): OCR of the first image of each "
              f"device only ({verified} read): {a.files / t_first:.1f} files/s, ratio "
              f"{t_dic / t_first * a.files / int(n_dic):.2f}; no OCR at all: {a.files / t_none:.1f} files/s, "
              f"ratio {t_dic / t_none * a.files / int(n_dic):.2f}")
        # peak memory against corpus size: half the corpus, then all of it (fresh processes)
        half = tmp / "half"
        half.mkdir()
        for p in sorted((tmp / "corpus").iterdir())[: a.files // 2]:
            os.link(p, half / p.name)
        m_half = peak_of(CBH, str(half), str(tmp / "m1"), str(a.workers), template)
        m_full = peak_of(CBH, str(tmp / "corpus"), str(tmp / "m2"), str(a.workers), template)
        print(f"cbh deid peak RSS of the largest process: {m_half:.0f} MiB for {a.files // 2} files, "
              f"{m_full:.0f} MiB for {a.files} files")


if __name__ == "__main__":
    main()
