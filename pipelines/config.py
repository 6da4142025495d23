"""The one typed configuration: params.yaml validated by pydantic into frozen sections.

Each section is a pydantic dataclass: strict types (no 'flase' read as False, no list read as
a string), `extra="forbid"` (an unknown key is a mistake), ranges and choices on the fields,
and a one-line `description` per key that `cbh params` shows. They stay real dataclasses,
so `dataclasses.replace` validates the copy. params.yaml names every key: a missing one is
an error, since the file is the record of a run (DVC tracks it, MLflow logs it).

Loaded once at an entry point and passed down; nothing here reads the environment or
touches the disk at import time, and nothing imports torch (the choice tuples below are
copies of those in models/, checked equal by tests).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from pipelines.errors import EXIT_USAGE, CbhError


class ConfigError(CbhError, ValueError):
    """params.yaml or an override is invalid."""

    exit_code = EXIT_USAGE


# models/networks.py make_classifier
Model = Literal["asc", "asc-ga", "asc-scale", "asc-z", "image-only", "biometry-rule", "asc-paper"]
NoTemplate = Literal["quarantine", "blank-text"]   # pipelines/deid/core.py Deidentifier.pixel_plan
OcrEngine = Literal["ppocr", "tesseract"]                       # pipelines/deid/ocr.py KINDS
Augment = Literal["basic", "scanner", "floor"]                      # models/augment.py AUGMENTS
ImageNorm = Literal["none", "equalise"]                             # models/networks.py IMAGE_NORMS
SegNorm = Literal["batch", "instance"]                              # models/networks.py SEG_NORMS
Backbone = Literal["small", "densenet121", "resnet18", "resnet34", "resnet50"]   # models/networks.py BACKBONES
GateReading = Literal["sample", "batch"]                             # models/paper.py GATE_READINGS
Executor = Literal["processes", "dask"]                             # flows/executors.py
HeadAugment = Literal["basic", "floor", "fan"]                               # models/head.py HEAD_AUGMENTS
HeadMethod = Literal["contour", "moments", "robust"]                 # pipelines/imaging/head.py ellipse_from_mask

MODELS: tuple[str, ...] = get_args(Model)
AUGMENTS: tuple[str, ...] = get_args(Augment)
IMAGE_NORMS: tuple[str, ...] = get_args(ImageNorm)
SEG_NORMS: tuple[str, ...] = get_args(SegNorm)
BACKBONES: tuple[str, ...] = get_args(Backbone)


def _listed(value: Any) -> Any:
    """YAML has no tuples: a list becomes one (sections are hashed and compared by value)."""
    return tuple(value) if isinstance(value, list) else value


Strs = Annotated[tuple[str, ...], BeforeValidator(_listed)]
Widths = Annotated[tuple[Annotated[int, Field(gt=0)], ...], BeforeValidator(_listed)]
Mappings = Annotated[tuple[dict[str, Any], ...], BeforeValidator(_listed)]
Text = Annotated[str, Field(min_length=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]
OpenFraction = Annotated[float, Field(gt=0, lt=1)]

# strict: a value of the wrong type is refused, never converted
_STRICT = ConfigDict(strict=True, extra="forbid")


def _ordered(section: Any, low: str, high: str) -> None:
    if getattr(section, low) > getattr(section, high):
        raise ValueError(f"{low} ({getattr(section, low)}) must not exceed {high} ({getattr(section, high)})")


@dataclass(frozen=True, config=_STRICT)
class Paths:
    """Where everything lives, relative to the workspace root."""

    data: Text = Field(description="the data folder: everything DVC versions lies under it")
    incoming: Text = Field(description="raw cohorts as exported (PHI; a DVC dependency, never pushed)")
    deid: Text = Field(description="de-identified scans and masks")
    manifest: Text = Field(description="the manifest: one row per de-identified image (parquet)")
    quarantine: Text = Field(description="ingest's held rows: identified side (raw image paths), never pushed")
    ingest_cache: Text = Field(description="what ingest already de-identified, by file digest, settings and "
                                           "key: identified side (header patient IDs), never pushed")
    contract_quarantine: Text = Field(description="rows the data contract held (pseudonymous ids)")
    deid_report: Text = Field(description="de-identification report of the data store (JSON)")
    validation: Text = Field(description="cbh validate --json document of the last contract run")
    dataset: Text = Field(description="manifest + split column (parquet)")
    frozen_test: Text = Field(description="the frozen test set: its patients stay in test (parquet)")
    model_dir: Text = Field(description="state dicts of the last training run")
    metrics: Text = Field(description="test metrics of the last evaluation (dvc metrics show/diff)")
    evaluation: Text = Field(description="subgroup metrics and split summary of the last evaluation")
    contract: Text = Field(description="steward summary (html, md) and the contract's quarantine table")
    split_contract: Text = Field(description="the split suite's summary and JSON")
    plots: Text = Field(description="ROC, reliability and per-image test predictions (dvc plots)")
    audit: Text = Field(description="the promotion audit trail (JSON lines, keyed hash chain)")
    cache: Text = Field(description="disposable: prepared crops shared by train and evaluate")
    gx_root: Text = Field(description="Great Expectations project: suites and Data Docs")
    key_file: Text = Field(description="the de-identification key file `make demo` creates (demo only)")
    audit_key: Text = Field(description="the audit trail's chain key (unless CBH_AUDIT_KEY is set)")
    dvc_remote: Text = Field(description="the local DVC remote folder")
    mlflow_uri: Text = Field(description="MLflow tracking URI (unless MLFLOW_TRACKING_URI is set)")
    mlflow_artifacts: Text = Field(description="MLflow artifact folder for a local tracking store")
    prefect_home: Text = Field(description="Prefect's home folder (unless PREFECT_HOME is set)")
    demo_cohort: Text = Field(description="where `make demo` writes the synthetic export")
    head: Text = Field(description="the head localiser of the last `head` stage: weights, metrics, split")


@dataclass(frozen=True, config=_STRICT)
class SynthParams:
    """The synthetic cohort `cbh synth` renders."""

    patients: int = Field(gt=0, description="patients in the cohort")
    seed: int = Field(ge=0, description="random seed of the cohort")
    hypoplasia_fraction: Fraction = Field(description="share of patients with cerebellar hypoplasia")
    ga_min: float = Field(gt=0, description="lowest gestational age, weeks")
    ga_max: float = Field(gt=0, description="highest gestational age, weeks")
    max_exams: int = Field(gt=0, description="most exams per patient (each patient has 1 to this many)")
    png_fraction: Fraction = Field(description="share of images exported as PNG instead of DICOM")
    styles: Strs = Field(min_length=1, description="vendor styles mixed in the cohort (pipelines/data/synth_render.py)")

    @model_validator(mode="after")
    def _ga_range(self) -> SynthParams:
        _ordered(self, "ga_min", "ga_max")
        return self


@dataclass(frozen=True, config=_STRICT)
class DeidParams:
    """De-identification: DICOM PS3.15 profile, pixel cleaning, OCR verification, workers."""

    key_env: Text = Field(description="environment variable holding the pseudonymisation key")
    max_date_shift_days: int = Field(ge=0, description="dates move by a keyed per-patient shift within +/- this")
    keep_columns: Strs = Field(description="annotations.csv columns kept (all others are dropped)")
    options: Strs = Field(description="PS3.15 Table E.1-1 options on top of the Basic Profile "
                                      "(pipelines/deid/profile.py OPTIONS)")
    templates: Mappings = Field(description="regions to keep per device and frame size, for ultrasound "
                                            "without SequenceOfUltrasoundRegions")
    no_template: NoTemplate = Field(description="ultrasound with no regions, no template and no "
                                                "BurnedInAnnotation NO: quarantine it, or blank the text "
                                                "OCR finds and verify again (blank-text)")
    ocr_sample: Fraction = Field(description="share of images OCR re-reads after the first of each device "
                                             "(keyed, reproducible)")
    ocr_engine: OcrEngine = Field(description="what reads cleaned pixels: ppocr (PP-OCRv4 detection and "
                                              "recognition, onnxruntime) | tesseract")
    ocr_min_chars: int = Field(gt=0, description="a word of at least this many letters/digits is text")
    ocr_min_confidence: float = Field(ge=0, le=100, description="Tesseract confidence below which a word "
                                                                "is ignored (speckle reads below ~60)")
    ocr_allowed: Strs = Field(description="extra regexes of allowed on-screen marks "
                                          "(pipelines/deid/ocr.py DEFAULT_ALLOWED)")
    ocr_vocabulary: Strs = Field(description="extra allowed on-screen words (pipelines/deid/ocr.py DEFAULT_VOCABULARY)")
    workers: int = Field(ge=0, description="processes for `cbh deid` (0: one per core)")
    executor: Executor = Field(description="processes: a pool on this machine; dask: Prefect tasks on prefect-dask")
    dask_address: str = Field(description="dask: '' starts a LocalCluster of `workers` processes; "
                                          "else tcp://scheduler:8786")


@dataclass(frozen=True, config=_STRICT)
class ValidateSection:
    """Thresholds of the data contract (pipelines/contract/validate.py, expectations/).

    The only section with defaults (params.yaml's values, checked equal by a test), so that
    a test or benchmark can build one with a single threshold changed."""

    min_per_class: int = Field(10, gt=0, description="dataset gate: labelled images per class left after "
                                                      "quarantine")
    ga_min: float = Field(14.0, gt=0, description="lowest plausible gestational age, weeks")
    ga_max: float = Field(42.0, gt=0, description="highest plausible gestational age, weeks")
    spacing_min_mm: float = Field(0.04, gt=0, description="smallest plausible pixel spacing, mm")
    spacing_max_mm: float = Field(0.5, gt=0, description="largest plausible pixel spacing, mm")
    cm_max_mm: float = Field(25.0, gt=0, description="largest plausible cisterna magna depth, mm")
    tcd_max_abs_z: float = Field(5.0, gt=0, description="largest |z| of TCD for GA on the INTERGROWTH-21st curve")
    frame_min_px: int = Field(128, gt=0, description="smallest frame height and width, pixels")
    frame_max_px: int = Field(4096, gt=0, description="largest frame height and width, pixels")
    tcd_mask_tolerance_mm: float = Field(2.0, ge=0, description="largest difference of mask-derived TCD and "
                                                                "annotated tcd_mm, mm")
    head_min_ellipse_iou: Fraction = Field(0.95, description="smallest IoU of a head mask with its fitted "
                                                              "ellipse (one filled ellipse per image)")
    hc_mask_tolerance_mm: float = Field(2.0, ge=0, description="largest difference of the head mask's "
                                                               "circumference and annotated hc_mm, mm")
    max_ga_ks: Fraction = Field(0.5, description="warning: GA distribution of a split vs train (KS statistic)")
    max_site_shift: Fraction = Field(0.5, description="warning: site mix of a split vs train "
                                                      "(total variation distance)")

    @model_validator(mode="after")
    def _ranges(self) -> ValidateSection:
        for low, high in (("ga_min", "ga_max"), ("spacing_min_mm", "spacing_max_mm"),
                          ("frame_min_px", "frame_max_px")):
            _ordered(self, low, high)
        return self


@dataclass(frozen=True, config=_STRICT)
class SplitParams:
    """Patient-level split into train, validation and a frozen test set."""

    seed: int = Field(ge=0, description="random seed of the validation draw")
    test_fraction: OpenFraction = Field(description="share of patients in test: the latest by first exam date "
                                                    "(temporal hold-out, frozen)")
    val_fraction: OpenFraction = Field(description="share of the other patients drawn for validation "
                                                   "(the operating point is chosen there)")
    test_site: str | None = Field(description="a site name: test on every patient of that site instead "
                                              "(unseen scanner style); null: temporal")


@dataclass(frozen=True, config=_STRICT)
class PreprocessParams:
    """The skull-aligned crop both networks see."""

    size: int = Field(gt=0, description="side of the skull-aligned crop, pixels")
    crop_margin: float = Field(gt=0, description="crop side as a multiple of the skull's long axis")
    frame: Literal["learned", "classical"] = Field(
        "learned", description="where the crop's skull comes from: the fetal-head localiser (fit_skull only where it "
                               "refuses a frame or no head model exists) or fit_skull alone")


@dataclass(frozen=True, config=_STRICT)
class SegmentParams:
    """The U-Net segmenting cerebellum and cisterna magna."""

    max_epochs: int = Field(ge=0, description="training epochs of the segmenter (0: untrained, for tests)")
    batch_size: int = Field(gt=0, description="images per batch")
    lr: float = Field(gt=0, description="learning rate")
    channels: Widths = Field(min_length=1, description="channels of the U-Net's levels, top to bottom")
    augment: Augment = Field(description="random intensity transforms (models/augment.py): scanner adds a grey-level "
                                         "curve and coarser grain, floor a speckled noise floor")
    norm: SegNorm = Field(description="the U-Net's normalisation layers (instance: robust to unseen scanners)")


@dataclass(frozen=True, config=_STRICT)
class TrainParams:
    """The classifier and the Lightning Trainer both networks use."""

    model: Model = Field(description="classifier: image and shape branches, +GA, +scale, image only, "
                                     "or the biometry rule")
    seed: int = Field(ge=0, description="random seed of training")
    max_epochs: int = Field(ge=0, description="training epochs of the classifier (0: untrained, for tests)")
    batch_size: int = Field(gt=0, description="images per batch")
    lr: float = Field(gt=0, description="learning rate of the classifier")
    weight_decay: float = Field(ge=0, description="AdamW weight decay")
    features: int = Field(gt=0, description="width of each branch's feature vector")
    backbone: Backbone = Field(description="image branch network (the resnets and densenet121 are MONAI's)")
    shape_backbone: Backbone = Field(description="shape branch network (sees the two masks)")
    predicted_mask_fraction: Fraction = Field(description="share of training samples that see the segmenter's masks")
    early_stopping_patience: int = Field(gt=0, description="epochs without a lower validation loss before stopping")
    num_workers: int = Field(ge=0, description="dataloader worker processes (arrays are in memory: 0 is fastest "
                                               "on CPU)")
    accelerator: Text = Field(description="Lightning accelerator: auto, cpu, gpu ...")
    devices: int = Field(gt=0, description="devices per node; 2+ with strategy ddp")
    num_nodes: int = Field(gt=0, description="machines taking part in training")
    strategy: Text = Field(description="Lightning strategy: auto, ddp (one process per device), ddp_spawn ...")
    precision: Text = Field(description="auto: bf16-mixed on CUDA, 32-true on CPU; or any Lightning precision "
                                        "string")
    channels_last: bool = Field(description="channels-last memory format on CUDA")
    resume: bool = Field(description="an interrupted training resumes from its last checkpoint (same data, "
                                     "same params)")
    augment: Augment = Field(description="random intensity transforms of the classifier's images "
                                         "(models/augment.py)")
    image_norm: ImageNorm = Field(description="equalise: the image branch sees the crop histogram-equalised")
    # asc-paper only (models/paper.py); defaults, so a params.yaml written before them still loads
    paper_gate: GateReading = Field(default="sample", description="asc-paper's shape gate: each sample's own "
                                    "vector (sample) or the batch as one sequence, as the published code (batch)")
    paper_width: float = Field(default=1.0, gt=0, le=1, description="asc-paper's channel width (1.0: the "
                               "published Inception-v3 and VGG16-bn; less only for fast tests)")
    imagenet_inception: str = Field(default="", description="asc-paper: a local torchvision-format ImageNet "
                                    "state dict for Inception-v3 ('' : from scratch; nothing is downloaded)")
    imagenet_vgg: str = Field(default="", description="asc-paper: the same for VGG16-bn")


@dataclass(frozen=True, config=_STRICT)
class EvaluateParams:
    """Evaluation on the frozen test set."""

    sensitivity_target: OpenFraction = Field(description="the operating threshold keeps at least this validation "
                                                         "sensitivity")
    operating_point: Literal["sensitivity", "margin"] = Field(
        default="margin", description="sensitivity: the validation positives' sensitivity_target quantile; "
        "margin: that threshold moved down to the middle of the gap between the classes on validation (logit "
        "scale), where there is one")
    bootstrap: int = Field(gt=0, description="bootstrap resamples of the test images for the AUC's 95% interval")


@dataclass(frozen=True, config=_STRICT)
class PromoteParams:
    """The promotion gate: a challenger becomes champion only if it passes."""

    min_auc: Fraction = Field(description="absolute test AUC floor, also for the first champion")
    min_sensitivity: Fraction = Field(description="test sensitivity floor at the operating threshold")
    auc_margin: Fraction = Field(description="non-inferiority margin: the lower bound of the challenger's paired "
                                 "AUC difference to the champion (95%, patient bootstrap) must not fall below "
                                 "minus this")
    max_ece: Fraction = Field(description="calibration bound: expected calibration error on the test set")
    require_valid_data: bool = Field(description="the training data must have passed the data contract")
    model_name: Text = Field(description="registered model name in MLflow")


@dataclass(frozen=True, config=_STRICT)
class CommissionParams:
    """`cbh commission`: a site's own operating threshold (pipelines/registry/commission.py)."""

    min_sensitivity: OpenFraction = Field(description="a site's threshold keeps sensitivity at or above this ...")
    confidence: OpenFraction = Field(description="... with this probability (Neyman-Pearson umbrella rule)")
    max_tcd_error_mm: float = Field(gt=0, description="a site's biometry is trusted when its TCD error is "
                                                      "within this, mm")
    seed: int = Field(ge=0, description="draws the one image per hypoplasia patient the rule counts")
    cohorts: dict[str, str] = Field(description="site -> its labelled cohort: `cbh retrain` commissions each new "
                                                "champion on each")


@dataclass(frozen=True, config=_STRICT)
class HeadSection:
    """The learned fetal-head localiser (`head` stage) and its promotion gate.

    With defaults (params.yaml's values), like ValidateSection, so that the HC18 benchmark
    can build one with a few values changed. `tta`, `method` and `level` are where no
    validation subjects choose them (pipelines/training/head.py choose_localiser)."""

    size: int = Field(128, gt=0, description="side of the square the network sees, pixels")
    features: Widths = Field((8, 16, 32, 64, 128, 8), min_length=2,
                             description="widths of the head network's levels (models/head.py make_head_net)")
    max_epochs: int = Field(12, ge=0, description="training epochs of the head localiser (0: untrained, for tests)")
    batch_size: int = Field(16, gt=0, description="images per batch")
    lr: float = Field(0.003, gt=0, description="learning rate")
    seed: int = Field(0, ge=0, description="random seed of the subject split and of training")
    augment: HeadAugment = Field("basic", description="training augmentation: geometry, gain, gamma, speckle "
                                                      "(basic), and a raised noise floor on half the batch (floor), or "
                                                      "inside a random probe fan only (fan)")
    val_fraction: OpenFraction = Field(0.1, description="share of subjects (patients) for validation")
    test_fraction: OpenFraction = Field(0.2, description="share of subjects (patients) for the test, looked at once")
    tta: bool = Field(True, description="average the prediction with that of the horizontally flipped frame")
    refine: bool = Field(True, description="a second pass on a crop of the source frame around the first "
                                            "pass's head (trained on such crops half the time)")
    method: HeadMethod = Field("moments", description="ellipse from the probability map: its outer contour, "
                                                      "its second moments, or its outer contour "
                                                      "without the points far from the ellipse (robust)")
    level: OpenFraction = Field(0.6, description="probability level that bounds the head")
    min_iou: Fraction = Field(0.9, description="head not found below this IoU of the fitted ellipse and the "
                                               "predicted region")
    min_confidence: Fraction = Field(0.7, description="head not found below this mean probability inside the "
                                                      "ellipse")
    min_ratio: Fraction = Field(0.45, description="head not found below this minor/major axis ratio")
    min_inside: Fraction = Field(0.6, description="head not found when less than this share of the ellipse lies "
                                                  "inside the frame")
    min_dice: Fraction = Field(0.95, description="gate: test Dice of the head region floor")
    max_hc_mae_mm: float = Field(2.5, gt=0, description="gate: test mean absolute HC error bound, mm")
    max_refused: Fraction = Field(0.02, description="gate: largest share of test frames the localiser refuses")
    hc_margin_mm: float = Field(0.2, ge=0, description="gate: the challenger's HC error may be at most this much "
                                                       "above the champion's, mm")
    model_name: Text = Field("fetal-head", description="registered model name of the head localiser in MLflow")

    @model_validator(mode="after")
    def _fractions(self) -> HeadSection:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction ({self.val_fraction + self.test_fraction}) "
                             "must leave subjects to train on")
        return self


@dataclass(frozen=True, config=_STRICT)
class PredictSection:
    """`cbh predict` on files and folders."""

    frame_stride: int = Field(gt=0, description="every how many frames of a multi-frame DICOM (cine) are predicted "
                                                "(1: all)")


@dataclass(frozen=True, config=_STRICT)
class LimitsSection:
    """What one input may cost; past a limit it is quarantined (ingest, cbh deid), an error row
    (cbh predict) or HTTP 400 (serving), with one sentence naming the limit."""

    max_frame_pixels: int = Field(gt=0, description="rows x columns of one frame (PNG/JPEG: from its header, "
                                                    "before decoding)")
    max_file_pixels: int = Field(gt=0, description="rows x columns x frames of one DICOM file")
    max_frames: int = Field(gt=0, description="frames of one multi-frame DICOM file")
    min_spacing_mm: float = Field(gt=0, description="smallest plausible pixel spacing, mm per pixel")
    max_spacing_mm: float = Field(gt=0, description="largest plausible pixel spacing, mm per pixel")
    max_inflated_bytes: int = Field(gt=0, description="a deflated DICOM's dataset once inflated, bytes")
    max_request_bytes: int = Field(gt=0, description="serving: the images of one request, base64 characters")
    max_request_seconds: int = Field(gt=0, description="serving: time for one request (MLflow answers 504 past it)")

    @model_validator(mode="after")
    def _range(self) -> LimitsSection:
        if self.min_spacing_mm >= self.max_spacing_mm:
            raise ValueError(f"min_spacing_mm ({self.min_spacing_mm}) must be below max_spacing_mm "
                             f"({self.max_spacing_mm})")
        return self


@dataclasses.dataclass(frozen=True)
class Params:
    """Every section, validated; `raw` is the dict they came from (overrides applied)."""

    paths: Paths
    synth: SynthParams
    deid: DeidParams
    validate: ValidateSection
    split: SplitParams
    preprocess: PreprocessParams
    segment: SegmentParams
    train: TrainParams
    evaluate: EvaluateParams
    promote: PromoteParams
    commission: CommissionParams
    head: HeadSection
    predict: PredictSection
    limits: LimitsSection
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value` for logging (MLflow params, lineage)."""
        out: dict[str, Any] = {}
        for section, values in self.raw.items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


SECTIONS: dict[str, type] = {name: kind for name, kind in get_type_hints(Params).items() if name != "raw"}


# -- loading ------------------------------------------------------------------------------

def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a raw params dict."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, value = _split_override(item)
        section, name = key.split(".", 1)
        if not isinstance(out.get(section), dict) or name not in out[section]:
            raise ConfigError(f"override {item!r}: there is no '{key}' in params.yaml (`cbh params` lists the keys)")
        try:
            out[section][name] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", exc)
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from exc
    return out


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    return key.strip(), value


def parse_params(raw: dict[str, Any], source: str = "params.yaml",
                 overridden: dict[str, str] | None = None) -> Params:
    """Validate a raw dict (as read from params.yaml) into Params; every mistake is one
    sentence of the ConfigError, naming `source` (or the override that set the key)."""
    overridden = overridden or {}
    mistakes = [f"{source}: '{name}' is not a section (sections: {', '.join(SECTIONS)})"
                for name in raw if name not in SECTIONS]
    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section)
        if not isinstance(values, dict):
            state = "is missing" if values is None else "is not a mapping of keys"
            mistakes.append(f"{source}: section '{section}' {state}")
            continue
        missing = [f"{source}: {section}.{name} is missing" for name in _field_names(cls) if name not in values]
        if missing:
            mistakes += missing
            continue
        try:
            built[section] = cls(**values)
        except ValidationError as exc:
            mistakes += [_sentence(err, section, source, overridden) for err in exc.errors()]
    if mistakes:
        raise ConfigError("\n".join(dict.fromkeys(mistakes)))
    return Params(**built, raw=raw)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


_PROBLEMS = {
    "bool_type": "is not a boolean (true or false)",
    "int_type": "is not a whole number",
    "float_type": "is not a number",
    "string_type": "is not a string",
    "dict_type": "is not a mapping",
    "tuple_type": "is not a list",
}


def _sentence(err: Any, section: str, source: str, overridden: dict[str, str]) -> str:
    """One pydantic error as one sentence: where, which key, what is wrong with the value."""
    loc, kind, value = err["loc"], err["type"], err.get("input")
    if not loc:                                   # a check across keys (model validator)
        changed = any(k.startswith(f"{section}.") for k in overridden)
        return f"{source}{' with overrides' if changed else ''}: {section}: {err['msg'].removeprefix('Value error, ')}"
    key = f"{section}.{loc[0]}" + "".join(f"[{i}]" for i in loc[1:] if isinstance(i, int))
    where = overridden.get(f"{section}.{loc[0]}", source)
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{where}: {key} is not a key of '{section}' (`cbh params` lists the keys)"
    if kind == "missing":
        return f"{where}: {key} is missing"
    if kind == "literal_error":
        return f"{where}: {key}: {value!r} is not allowed; choose {err['ctx']['expected']}"
    if kind == "too_short":
        need = "must not be empty" if isinstance(value, str) else f"needs at least {err['ctx']['min_length']} item(s)"
        return f"{where}: {key} {need}"
    problem = _PROBLEMS.get(kind) or err["msg"].replace("Input should be", "must be")
    return f"{where}: {key}: {value!r} {problem}"


def load_params(path: Path | str = "params.yaml", overrides: list[str] | None = None,
                profile: str | None = None) -> Params:
    """Read params.yaml, apply a named profile's overrides (section `profiles:`), then
    `overrides`, and validate. Its `limits` become the limits of every scan reader in this
    process (pipelines.imaging.scan.configure)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run cbh from the workspace root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections")
    chosen = _profile(raw.pop("profiles", None) or {}, profile, path.name)
    origin = {_split_override(o)[0]: f"profile '{profile}'" for o in chosen}
    origin |= {_split_override(o)[0]: "override" for o in overrides or []}
    params = parse_params(apply_overrides(raw, chosen + list(overrides or [])), path.name, origin)
    from pipelines.imaging import scan

    scan.configure(dataclasses.asdict(params.limits))
    return params


def _profile(profiles: Any, name: str | None, source: str) -> list[str]:
    """The overrides of profile `name` (none without a name)."""
    if not isinstance(profiles, dict):
        raise ConfigError(f"{source}: profiles must map names to lists of section.key=value")
    if name is None:
        return []
    if name not in profiles:
        raise ConfigError(f"{source}: no profile {name!r}; profiles: {sorted(profiles)}")
    chosen = profiles[name] or []
    if not isinstance(chosen, list) or not all(isinstance(o, str) for o in chosen):
        raise ConfigError(f"{source}: profiles.{name} must be a list of section.key=value strings")
    return chosen


def replace(params: Params, overrides: list[str]) -> Params:
    """A copy of params with overrides applied."""
    origin = {_split_override(o)[0]: "override" for o in overrides}
    return parse_params(apply_overrides(params.raw, overrides), overridden=origin)


# -- description (`cbh params`) -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """One key `--set` accepts: its current value, what it may be, and what it means."""

    key: str
    value: Any
    kind: str
    description: str


def describe(params: Params) -> list[KeyInfo]:
    """Every key of every section, in params.yaml order."""
    rows = []
    for section, cls in SECTIONS.items():
        for name, info in cls.__pydantic_fields__.items():
            value = _plain(getattr(getattr(params, section), name))
            rows.append(KeyInfo(f"{section}.{name}", value, _kind(info.annotation, info.metadata),
                                info.description or ""))
    return rows


def _plain(value: Any) -> Any:
    """Tuples as lists, so the value reads (and dumps) as in params.yaml."""
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


_NAMES = {bool: "true | false", int: "int", float: "number", str: "text"}


def _kind(annotation: Any, metadata: list[Any]) -> str:
    """A type, its choices or its range, in words: `int > 0`, `number in [0, 1]`, `a | b`."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        return _kind(base, [*extra, *metadata])
    if origin is Literal:
        return " | ".join(map(str, get_args(annotation)))
    if origin is tuple:
        size = next((m.min_length for m in metadata if hasattr(m, "min_length")), 0)
        return f"list of {_kind(get_args(annotation)[0], [])}" + (f", at least {size}" if size else "")
    if origin is dict:
        return "mapping"
    if origin is Union or type(annotation).__name__ == "UnionType":
        return " or ".join("null" if a is type(None) else _kind(a, metadata) for a in get_args(annotation))
    return f"{_NAMES.get(annotation, getattr(annotation, '__name__', str(annotation)))}{_bounds(metadata)}"


def _bounds(metadata: list[Any]) -> str:
    b = {k: getattr(m, k) for m in metadata for k in ("gt", "ge", "lt", "le") if getattr(m, k, None) is not None}
    low = ("(", b["gt"]) if "gt" in b else ("[", b["ge"]) if "ge" in b else None
    high = (")", b["lt"]) if "lt" in b else ("]", b["le"]) if "le" in b else None
    if low and high:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f" {'>' if low[0] == '(' else '>='} {low[1]}"
    if high:
        return f" {'<' if high[0] == ')' else '<='} {high[1]}"
    return ""


__all__ = ["Params", "ConfigError", "load_params", "replace", "apply_overrides", "parse_params", "describe",
           "KeyInfo", "MODELS", "AUGMENTS", "IMAGE_NORMS", "SEG_NORMS", "BACKBONES", "Paths", "SynthParams",
           "DeidParams", "ValidateSection", "SplitParams", "PreprocessParams", "SegmentParams", "TrainParams",
           "EvaluateParams", "PromoteParams", "CommissionParams", "HeadSection"]
