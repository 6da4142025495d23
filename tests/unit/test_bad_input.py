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
