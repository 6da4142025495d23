"""Results back to PACS: per exam, a DICOM Segmentation and a DICOM Structured Report.

`cbh predict --dicom-out DIR` writes, for every exam whose best frame (`predict.exam_rows`)
comes from a DICOM file:

- `DIR/exam-N/seg.dcm`: a binary Segmentation (highdicom) of the predicted cerebellum
  (segment 1, SNOMED 113305005) and cisterna magna (segment 2, SNOMED 54165005) on the best
  frame's pixel grid, referencing that source image (none for a frame of a cine: see
  CINE_SEG);
- `DIR/exam-N/sr.dcm`: a Comprehensive 3D SR holding a TID 1500 measurement report: TCD
  (LOINC 11863-8), cisterna magna length (11860-4) and head circumference (11984-2) in mm, each
  with its growth percentile rank (DCM 125012), the gestational age (18185-9), the hypoplasia
  probability (DCM 122157) and the decision as a finding (hypoplasia 55199003 / normal
  17621005) on the cerebellum, referencing the frame of a cine; the model version (`models:/
  name/N`, an alias resolved) is the algorithm version of every group.

Both objects take the patient, study and frame-of-reference modules from their source image
(highdicom copies them), so they join the study they describe: a de-identified source gives a
de-identified result with the same pseudonyms, and every date in it is the source's shifted
study date (`dates_like_source`); an identified one gives a result for the same patient.
Nothing else from the source header is copied, and the output names are the exam numbers, never
a UID. An exam scored on PNG/JPEG frames has no DICOM study to return to: it gets no objects,
and the summary says how many.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

SERIES_SEG, SERIES_SR = 9901, 9902
# highdicom 0.28 segments one frame of a multi-frame image only when it has patient coordinates
# (plane positions), which an ultrasound cine lacks; its SR can still name the frame
CINE_SEG = "no SEG for a frame of a cine without patient coordinates (the SR names the frame)"


class CineSegmentationError(ValueError):
    """A SEG was asked for one frame of a multi-frame image without a coordinate system."""
SOFTWARE = "cbh"


@dataclass(frozen=True)
class ExamResult:
    """What one exam's objects say: its number, the best frame's source and labels on the
    source grid, and the exam row's figures."""

    exam: str
    source: Path
    frame: int                       # 0-based frame of the source the labels belong to
    labels: NDArray[np.uint8]        # rows x columns: 0 background, 1 cerebellum, 2 cisterna magna
    row: dict                        # the exam row (predict.exam_rows)


def _codes():
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd, codes


def _algorithm(model_uri: str):
    hd, codes = _codes()
    return hd.AlgorithmIdentificationSequence(name="cbh cerebellar hypoplasia", version=model_uri[:64],
                                              family=codes.cid7162.ArtificialIntelligence)


def _uid(*parts: str) -> str:
    """A UID derived from the exam's output and the source's own SOP Instance UID, so writing the
    same exam twice gives the same objects (PACS replaces rather than duplicates them)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=list(parts))


def segmentation(source, frame: int, labels: NDArray[np.uint8], model_uri: str, salt: str = ""):
    """The binary SEG of `labels` (1 cerebellum, 2 cisterna magna) on `source`'s frame `frame`;
    `salt` (the operating threshold) joins the model in its UIDs."""
    hd, codes = _codes()
    alg = _algorithm(model_uri)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=label, segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=concept, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=alg)
        for n, (label, concept) in enumerate((("cerebellum", codes.SCT.Cerebellum),
                                              ("cisterna magna", codes.SCT.CisternaMagna)), 1)]
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        raise CineSegmentationError(CINE_SEG)
    pixels = labels[None]
    uid = str(source.SOPInstanceUID)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # a pseudonym is a one-component person name
        return hd.seg.Segmentation(
            source_images=[source], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments, series_instance_uid=_uid("seg-series", uid, model_uri, salt),
            series_number=SERIES_SEG, sop_instance_uid=_uid("seg", uid, str(frame), model_uri, salt), instance_number=1,
            manufacturer=SOFTWARE, manufacturer_model_name="cerebellar-hypoplasia", software_versions=model_uri[:64],
            device_serial_number="none", series_description="cbh posterior fossa segmentation",
            omit_empty_frames=False)


def _measurement(name, value: float, unit, alg, finding_site=None):
    hd, _ = _codes()
    sites = [hd.sr.FindingSite(finding_site)] if finding_site is not None else None
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=alg, finding_sites=sites)


def structured_report(source, frame: int, row: dict, model_uri: str, salt: str = ""):
    """The TID 1500 measurement report of one exam row, its evidence the best frame's source."""
    hd, codes = _codes()
    alg = hd.sr.AlgorithmIdentification(name="cbh cerebellar hypoplasia", version=model_uri[:64])
    mm, percent, weeks, one = (hd.sr.CodedConcept(v, "UCUM", m) for v, m in
                               (("mm", "millimeter"), ("%", "percent"), ("wk", "week"), ("1", "no units")))
    from highdicom._standard_utils import is_multiframe_image

    refs = [hd.sr.SourceImageForMeasurementGroup.from_source_image(
        source, referenced_frame_numbers=[frame + 1] if is_multiframe_image(source) else None)]
    groups = []
    for label, concept, col, site in (
            ("TCD", codes.LN.TransverseCerebellarDiameter, "tcd", codes.SCT.Cerebellum),
            ("CM", codes.LN.CisternaMagnaLength, "cm", codes.SCT.CisternaMagna),
            ("HC", codes.LN.HeadCircumference, "hc", None)):
        value, centile = _finite(row.get(f"{col}_mm")), _finite(row.get(f"{col}_centile"))
        if value is None:
            continue                 # not measured: absent, never zero
        items = [_measurement(concept, value, mm, alg, site)]
        if centile is not None:
            items.append(_measurement(codes.DCM.GrowthPercentileRank, centile, percent, alg, site))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid("track", label, str(source.SOPInstanceUID)),
                                                         identifier=label),
            algorithm_id=alg, measurements=items, source_images=refs,
            finding_sites=[hd.sr.FindingSite(site)] if site is not None else None))
    prob, ga = _finite(row.get("hypoplasia_probability")), _finite(row.get("ga_weeks"))
    decision = str(row.get("prediction", ""))
    items = [m for m in (_measurement(codes.DCM.Probability, prob, one, alg) if prob is not None else None,
                         _measurement(codes.LN.GestationalAge, ga, weeks, alg) if ga is not None else None) if m]
    evaluations = [hd.sr.QualitativeEvaluation(codes.DCM.Finding, codes.SCT.Hypoplasia if decision == "hypoplasia"
                                               else codes.SCT.Normal)] if decision in ("hypoplasia", "normal") else None
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid("track", "diagnosis", str(source.SOPInstanceUID)),
                                                     identifier="diagnosis"),
        algorithm_id=alg, measurements=items or None, qualitative_evaluations=evaluations, source_images=refs,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Cerebellum)]))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("device", model_uri), name="cbh", manufacturer_name=SOFTWARE, model_name=model_uri[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.Ultrasonography, imaging_measurements=groups)
    uid = str(source.SOPInstanceUID)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return hd.sr.Comprehensive3DSR(
            evidence=[source], content=report, series_instance_uid=_uid("sr-series", uid, model_uri, salt),
            series_number=SERIES_SR, sop_instance_uid=_uid("sr", uid, str(frame), model_uri, salt), instance_number=1,
            manufacturer=SOFTWARE, is_complete=True, is_final=False, is_verified=False,
            series_description="cbh posterior fossa measurements")


def _finite(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def dates_like_source(obj, source) -> None:
    """For a de-identified source (PatientIdentityRemoved YES), every date and time the new
    object carries becomes the source's (shifted) study date and time. The day the result was
    made is real, and beside a shifted study date it would tell the shift."""
    if str(source.get("PatientIdentityRemoved", "")).upper() != "YES":
        return
    day, time = str(source.get("StudyDate", "") or ""), str(source.get("StudyTime", "") or "")
    for elem in obj.iterall():
        if elem.VR in ("DA", "TM", "DT") and elem.value not in (None, ""):
            elem.value = {"DA": day, "TM": time, "DT": day + time}[elem.VR]


def write_exam(result: ExamResult, out_dir: Path, model_uri: str, salt: str = "") -> tuple[Path | None, Path, str]:
    """sr.dcm and, where the best frame allows it, seg.dcm of one exam under `out_dir/<exam>/`;
    returns (seg path or None, SR path, why there is no SEG or ''). `model_uri` should name a
    version (not an alias): it is the objects' algorithm version and, with `salt` (the
    threshold), part of their UIDs, so another model or threshold never reuses them."""
    from pipelines.imaging.scan import read_dicom

    source = read_dicom(result.source, header_only=True)
    folder = out_dir / result.exam
    folder.mkdir(parents=True, exist_ok=True)
    seg_path, sr_path = folder / "seg.dcm", folder / "sr.dcm"
    why = ""
    try:
        seg = segmentation(source, result.frame, result.labels, model_uri, salt)
        dates_like_source(seg, source)
        seg.save_as(seg_path)
    except CineSegmentationError as exc:
        seg_path.unlink(missing_ok=True)           # an earlier run's SEG must not sit beside this SR
        seg_path, why = None, str(exc)
    sr = structured_report(source, result.frame, result.row, model_uri, salt)
    dates_like_source(sr, source)
    sr.save_as(sr_path)
    return seg_path, sr_path, why


def read_back(seg_path: Path | None, sr_path: Path) -> tuple[NDArray[np.uint8] | None, dict[str, float], str | None]:
    """What a PACS viewer would show: the SEG's labels on the source grid (1 cerebellum, 2
    cisterna magna) and the SR's measurements by LOINC or
    DCM code (`11863-8`, `11860-4`, `11984-2`, `18185-9`, `122157`; centiles as `125012:<code>`)
    and its finding ('hypoplasia' / 'normal' / None)."""
    hd, codes = _codes()
    labels = None
    if seg_path is not None:
        seg = hd.seg.segread(seg_path)
        source_uid = seg.get_source_image_uids()[0][2]
        labels = np.asarray(seg.get_pixels_by_source_instance([source_uid], segment_numbers=[1, 2],
                                                              combine_segments=True)[0], np.uint8)
    sr = hd.sr.srread(sr_path)
    values: dict[str, float] = {}
    finding = None
    for group in sr.content.get_image_measurement_groups():
        base = None
        for m in group.get_measurements():
            code = m.name.value
            if code == "125012" and base:
                values[f"125012:{base}"] = float(m.value)
            else:
                values[code], base = float(m.value), code
        # (highdicom 0.28's get_qualitative_evaluations finds none here: the items are read directly)
        for item in group[0].ContentSequence:
            if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Finding.value:
                code = item.ConceptCodeSequence[0]
                finding = {"55199003": "hypoplasia", "17621005": "normal"}.get(code.CodeValue, code.CodeMeaning)
    return labels, values, finding
