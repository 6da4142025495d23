"""Bad input ends in quarantine with one reason, never in a traceback that stops the corpus:
empty ultrasound-region attributes, a PNG that declares more pixels than any frame has."""

import json
import shutil
import struct
import zlib

import pydicom
import pytest

from pipelines.deid.folder import deid_folder
from pipelines.imaging import scan as S


def _png_header_only(width: int, height: int) -> bytes:
    """A few hundred bytes that declare a `width` x `height` grey PNG (the pixels never follow)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_empty_region_attributes_give_no_region_and_no_spacing():
    region = pydicom.Dataset()
    region.RegionLocationMinX0, region.RegionLocationMinY0 = None, 10
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 200, 150
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX, region.PhysicalDeltaY = None, 0.02
    ds = pydicom.Dataset()
    ds.SequenceOfUltrasoundRegions = pydicom.Sequence([region])
    assert S.regions(ds) == [] and S.pixel_spacing_mm(ds) is None
    region.PhysicalDeltaX = float("nan")
    ds.PixelSpacing = [0.2]                        # one value where two are due
    assert S.pixel_spacing_mm(ds) is None
    ds.PixelSpacing = [0.2, 0.25]
    assert S.pixel_spacing_mm(ds) == (0.2, 0.25)


def test_a_png_declaring_too_many_pixels_is_refused_before_decoding():
    with pytest.raises(S.ScanError) as err:
        S.decode_raster(_png_header_only(9000, 9000))
    assert err.value.code == "too_many_pixels" and "9000x9000" in str(err.value)
    with pytest.raises(S.ScanError, match="pixels, more than the 64,000,000") as err:
        S.decode_raster(_png_header_only(14000, 14000))     # past PIL's own bomb limit too
    assert err.value.code == "too_many_pixels"


def test_a_corpus_with_broken_regions_and_a_pixel_bomb_is_processed_file_by_file(small_cohort, tmp_path, pseudo):
    src = tmp_path / "src"
    src.mkdir()
    dicoms = sorted((small_cohort / "scans").glob("*.dcm"))
    shutil.copy(dicoms[0], src / "good.dcm")
    ds = pydicom.dcmread(dicoms[1])
    for region in ds.SequenceOfUltrasoundRegions:
        region.RegionLocationMinX0, region.PhysicalDeltaX = None, None
    ds.save_as(src / "empty_region.dcm")
    (src / "bomb.png").write_bytes(_png_header_only(14000, 14000))
    (src / "bomb.json").write_text(json.dumps({"pixel_spacing_mm": [0.2, 0.2]}))
    rep = deid_folder(src, tmp_path / "out", pseudo, quarantine=tmp_path / "held")
    assert rep["inputs"] == 3 and rep["deidentified"] == 1
    # no region left and no device template: parked for a steward, not cleaned by guesswork
    assert rep["reasons"] == {"no_pixel_template": 1, "too_many_pixels": 1}
    held = sorted(p.name.split("_", 1)[1] for p in (tmp_path / "held" / "files").iterdir())
    assert held == ["bomb.png", "empty_region.dcm"]                  # both kept for the steward


def test_deid_follows_linked_folders_once_and_refuses_wrong_targets_before_work(small_cohort, tmp_path, pseudo):
    from pipelines.deid.folder import FolderError, discover

    days = tmp_path / "days"
    days.mkdir()
    dicoms = sorted((small_cohort / "scans").glob("*.dcm"))
    shutil.copy(dicoms[0], days / "a.dcm")
    src = tmp_path / "src"
    src.mkdir()
    (src / "monday").symlink_to(days, target_is_directory=True)        # a site's export links its days in
    (days / "loop").symlink_to(src, target_is_directory=True)          # and a loop back to the top
    long_name = "x" * 240 + ".dcm"
    (src / long_name).write_bytes(b"not a dicom file at all")
    assert [p.name for p in discover(src)] == ["a.dcm", long_name]
    (tmp_path / "afile").write_text("")
    with pytest.raises(FolderError, match="the destination is a file"):
        deid_folder(src, tmp_path / "afile", pseudo)
    with pytest.raises(FolderError, match="the link file is a folder"):
        deid_folder(src, tmp_path / "out", pseudo, link=days)
    rep = deid_folder(src, tmp_path / "out", pseudo, link=tmp_path / "link.csv", quarantine=tmp_path / "held")
    assert (rep["inputs"], rep["deidentified"], rep["reasons"]) == (2, 1, {"unreadable_dicom": 1})
    held = [p.name for p in (tmp_path / "held" / "files").iterdir()]
    assert len(held) == 1 and held[0].endswith(".dcm") and len(held[0].encode()) <= 255
    assert (tmp_path / "out" / "deid-report.json").is_file() and (tmp_path / "link.csv").is_file()


@pytest.fixture()
def limits():
    """Set the process's limits for one test, and put params.yaml's back after it."""
    before = S.LIMITS
    yield lambda **kw: S.configure({**S.Limits().__dict__, **kw})
    S.configure(before)


def _deflated_bomb(path, inflated: int) -> None:
    """A Part-10 file with the deflated transfer syntax whose dataset inflates to `inflated` bytes
    of zeros (a few KB on disk)."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    head = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(head, meta, enforce_standard=True)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = b"".join(squeeze.compress(b"\0" * (1 << 20)) for _ in range(inflated >> 20)) + squeeze.flush()
    path.write_bytes(b"\0" * 128 + b"DICM" + head.getvalue() + body)


def test_limits_refuse_frames_pixels_inflation_and_spacing_before_the_work(small_cohort, tmp_path, limits):
    """Each limit of params.yaml's `limits` is one reason, raised from the header (or while
    counting inflated bytes), before pixels are decoded; the readers of ingest, cbh deid,
    cbh predict and serving all go through these checks."""
    import cv2
    import numpy as np

    dicom = sorted((small_cohort / "scans").glob("*.dcm"))[0]
    ds = pydicom.dcmread(dicom)
    limits(max_frames=5)
    many = pydicom.dcmread(dicom, stop_before_pixels=True)
    many.NumberOfFrames = 6
    with pytest.raises(S.ScanError, match="6 frames, more than the 5 of limits.max_frames") as err:
        S.check_dimensions(many)
    assert err.value.code == "too_many_frames"
    limits(max_file_pixels=ds.Rows * ds.Columns - 1)
    with pytest.raises(S.ScanError, match="limits.max_file_pixels"):
        S.read_dicom(dicom)
    with pytest.raises(S.ScanError, match="limits.max_file_pixels"):
        S.read_scan(dicom.read_bytes())

    limits(max_inflated_bytes=8 << 20)
    bomb = tmp_path / "bomb.dcm"
    _deflated_bomb(bomb, 64 << 20)
    assert bomb.stat().st_size < 200_000
    for source in (bomb, bomb.read_bytes()):
        with pytest.raises(S.ScanError, match="inflates past the 8,388,608 bytes") as err:
            S.read_dicom(source) if isinstance(source, type(bomb)) else S.read_scan(source)
        assert err.value.code == "inflated_too_large"

    limits()
    png = cv2.imencode(".png", np.full((64, 64), 90, np.uint8))[1].tobytes()
    with pytest.raises(S.ScanError, match=r"pixel spacing 0.0001 x 0.0001 mm lies outside 0.01-5.0 mm") as err:
        S.read_scan(png, spacing=0.0001)
    assert err.value.code == "implausible_spacing"
    assert S.read_scan(png, spacing=0.2).spacing == (0.2, 0.2)


def test_serving_reads_wrapped_base64_and_answers_limits_and_cv2_with_400(limits, monkeypatch):
    """Base64 wrapped at 76 columns (MIME) is read; a request past limits.max_request_bytes, an
    implausible spacing and an image OpenCV cannot process are 400s with one sentence."""
    import base64

    import cv2
    import numpy as np
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipelines.serving.pyfunc import CBHModel, InputError, decode_image

    png = cv2.imencode(".png", np.full((64, 64), 90, np.uint8))[1].tobytes()
    wrapped = base64.encodebytes(png).decode()                      # MIME: a newline every 76 characters
    assert "\n" in wrapped.strip()
    assert decode_image(wrapped, 0.2)[0][0].shape == (64, 64)
    with pytest.raises(InputError, match="lies outside"):
        decode_image(wrapped, 0.0001)

    limits(max_request_bytes=100)
    model = CBHModel()
    with pytest.raises(MlflowException, match="more than the 100 of limits.max_request_bytes") as err:
        model.predict(None, pd.DataFrame({"image": [wrapped], "ga_weeks": [22.0]}))
    assert err.value.get_http_status_code() == 400

    limits()

    def resize_fails(*_):
        raise cv2.error("OpenCV(4.10) resize.cpp:4152: error: (-215:Assertion failed) !ssize.empty()")

    monkeypatch.setattr(model, "_predict", resize_fails)
    with pytest.raises(MlflowException, match="cannot be processed at this size") as err:
        model.predict(None, pd.DataFrame({"image": [wrapped], "ga_weeks": [22.0]}))
    assert err.value.get_http_status_code() == 400 and "resize.cpp" not in str(err.value)


def test_adding_a_cohort_with_a_link_loop_copies_each_file_once(small_cohort, tmp_path):
    """`cbh ingest COHORT` copies the export into the incoming area; a symlink loop inside it
    used to make copytree copy the tree 41 times and then fail, leaving the copy in the way."""
    from pathlib import Path

    from flows.stages import add_cohort
    from pipelines.config import load_params

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    cohort = tmp_path / "export"
    shutil.copytree(small_cohort, cohort)
    days = tmp_path / "day1"
    (cohort / "scans").rename(days)
    (cohort / "scans").symlink_to(days, target_is_directory=True)      # the day linked in
    (days / "back").symlink_to(cohort, target_is_directory=True)        # and a loop to the top
    dest = add_cohort(params, tmp_path / "ws", cohort)
    copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    original = sorted(str(p.relative_to(small_cohort)) for p in small_cohort.rglob("*") if p.is_file())
    assert copied == original
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert add_cohort(params, tmp_path / "ws", cohort) == dest            # the same cohort again: nothing new


def test_a_folder_linked_under_a_second_name_is_copied_under_both(small_cohort, tmp_path):
    """Copying an export keeps every path its annotations may name (`scans/` and `latest/`
    pointing at it), while de-identification's walk reads each scan once."""
    from pathlib import Path

    from flows.stages import add_cohort
    from pipelines.config import load_params
    from pipelines.deid.folder import discover

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    cohort = tmp_path / "export"
    shutil.copytree(small_cohort, cohort)
    (cohort / "latest").symlink_to(cohort / "scans", target_is_directory=True)
    dest = add_cohort(params, tmp_path / "ws", cohort)
    scans = sorted(p.name for p in (small_cohort / "scans").iterdir())
    assert sorted(p.name for p in (dest / "scans").iterdir()) == scans
    assert sorted(p.name for p in (dest / "latest").iterdir()) == scans
    assert len(discover(cohort)) == len(discover(small_cohort))            # each scan once
