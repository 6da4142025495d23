"""The one typed configuration: params.yaml loaded into frozen dataclasses.

Loaded once at an entry point and passed down; nothing here reads the environment or
touches the disk at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """params.yaml or an override is invalid."""


@dataclass(frozen=True)
class Paths:
    data: str
    incoming: str
    deid: str
    manifest: str
    quarantine: str
    contract_quarantine: str
    deid_report: str
    validation: str
    dataset: str
    frozen_test: str
    model_dir: str
    metrics: str
    evaluation: str
    contract: str
    split_contract: str
    plots: str
    audit: str
    cache: str
    gx_root: str
    key_file: str
    dvc_remote: str
    mlflow_uri: str
    mlflow_artifacts: str
    prefect_home: str
    demo_cohort: str


@dataclass(frozen=True)
class SynthParams:
    patients: int
    seed: int
    hypoplasia_fraction: float
    ga_min: float
    ga_max: float
    max_exams: int
    png_fraction: float
    styles: tuple[str, ...]


@dataclass(frozen=True)
class DeidParams:
    key_env: str
    max_date_shift_days: int
    keep_columns: tuple[str, ...]
    options: tuple[str, ...]
    templates: tuple[dict, ...]
    ocr_sample: float
    ocr_min_chars: int
    ocr_min_confidence: float
    ocr_allowed: tuple[str, ...]
    ocr_vocabulary: tuple[str, ...]
    workers: int
    executor: str
    dask_address: str


@dataclass(frozen=True)
class ValidateSection:
    min_per_class: int
    ga_min: float
    ga_max: float
    spacing_min_mm: float
    spacing_max_mm: float
    cm_max_mm: float
    tcd_max_abs_z: float
    frame_min_px: int
    frame_max_px: int
    tcd_mask_tolerance_mm: float
    max_ga_ks: float
    max_site_shift: float


@dataclass(frozen=True)
class SplitParams:
    seed: int
    test_fraction: float
    val_fraction: float
    test_site: str | None = None


@dataclass(frozen=True)
class PreprocessParams:
    size: int
    crop_margin: float


@dataclass(frozen=True)
class SegmentParams:
    max_epochs: int
    batch_size: int
    lr: float
    channels: tuple[int, ...]
    augment: str = "basic"      # basic | scanner | floor (random transforms: models/augment.py)
    norm: str = "batch"         # batch | instance (models/networks.py make_segmenter)


@dataclass(frozen=True)
class TrainParams:
    model: str
    seed: int
    max_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    features: int
    predicted_mask_fraction: float
    early_stopping_patience: int
    num_workers: int
    accelerator: str
    backbone: str = "small"
    shape_backbone: str = "small"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    resume: bool = True
    augment: str = "basic"
    image_norm: str = "none"    # none | equalise (the classifier's image branch: models/networks.py)


@dataclass(frozen=True)
class EvaluateParams:
    sensitivity_target: float
    bootstrap: int


@dataclass(frozen=True)
class CommissionParams:
    min_sensitivity: float      # a site's threshold keeps sensitivity at or above this ...
    confidence: float           # ... with this probability (pipelines/commission.py)
    max_tcd_error_mm: float     # a site's biometry is trusted when its TCD error is within this
    seed: int                   # draws the one image per hypoplasia patient the rule counts
    cohorts: dict               # site -> its labelled cohort: `cbh retrain` commissions each new champion


@dataclass(frozen=True)
class PromoteParams:
    min_auc: float
    min_sensitivity: float
    auc_margin: float
    max_ece: float
    require_valid_data: bool
    model_name: str


AUGMENTS = ("basic", "scanner", "floor")        # models/augment.py random_intensity
IMAGE_NORMS = ("none", "equalise")              # models/networks.py ASCNet
SEG_NORMS = ("batch", "instance")               # models/networks.py make_segmenter
MODELS = ("asc", "asc-ga", "asc-scale", "image-only", "biometry-rule")


@dataclass(frozen=True)
class Params:
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
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value` for logging (MLflow params, lineage)."""
        out: dict[str, Any] = {}
        for section, values in self.raw.items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = getattr(typ, "__origin__", None)
    try:
        if origin is tuple:
            (inner, _) = typ.__args__
            return tuple(_coerce(v, inner, where) for v in value)
        if typ is bool:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if typ in (int, float, str):
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return typ(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"params.yaml: {where} = {value!r} is not a valid {typ}") from exc
    return value


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"params.yaml: unknown key(s) in '{section}': {sorted(unknown)}")
    missing = names - set(values)
    if missing:
        raise ConfigError(f"params.yaml: missing key(s) in '{section}': {sorted(missing)}")
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a raw params dict."""
    out = {k: dict(v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in out or name not in out[section]:
            raise ConfigError(f"override {item!r}: there is no '{key}' in params.yaml")
        out[section][name] = yaml.safe_load(value)
    return out


_SECTIONS = {f.name: f.type for f in fields(Params) if f.name != "raw"}


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a raw dict (as read from params.yaml) into Params."""
    hints = get_type_hints(Params)
    built = {}
    for section in _SECTIONS:
        if section not in raw:
            raise ConfigError(f"params.yaml: missing section '{section}'")
        built[section] = _build(hints[section], raw[section] or {}, section)
    params = Params(**built, raw=raw)
    if params.train.model not in MODELS:
        raise ConfigError(f"params.yaml: train.model = {params.train.model!r}; choose one of {MODELS}")
    for where, value in (("segment.augment", params.segment.augment), ("train.augment", params.train.augment)):
        if value not in AUGMENTS:
            raise ConfigError(f"params.yaml: {where} = {value!r}; choose one of {AUGMENTS}")
    if params.segment.norm not in SEG_NORMS:
        raise ConfigError(f"params.yaml: segment.norm = {params.segment.norm!r}; choose one of {SEG_NORMS}")
    if params.train.image_norm not in IMAGE_NORMS:
        raise ConfigError(f"params.yaml: train.image_norm = {params.train.image_norm!r}; choose one of {IMAGE_NORMS}")
    if not isinstance(params.commission.cohorts, dict):
        raise ConfigError("params.yaml: commission.cohorts must map site labels to cohort folders (or be {})")
    if not (0 < params.commission.min_sensitivity < 1 and 0 < params.commission.confidence < 1):
        raise ConfigError("params.yaml: commission.min_sensitivity and commission.confidence must lie in (0, 1)")
    if not 0 < params.split.test_fraction < 1 or not 0 < params.split.val_fraction < 1:
        raise ConfigError("params.yaml: split fractions must lie in (0, 1)")
    return params


def load_params(path: Path | str = "params.yaml", overrides: list[str] | None = None,
                profile: str | None = None) -> Params:
    """Read params.yaml, apply a named profile's overrides (section `profiles:`), then
    `overrides`, and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run cbh from the workspace root)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    profiles = raw.pop("profiles", None) or {}
    if profile is not None and profile not in profiles:
        raise ConfigError(f"params.yaml: no profile {profile!r}; profiles: {sorted(profiles)}")
    chosen = list(profiles.get(profile, [])) if profile else []
    return parse_params(apply_overrides(raw, chosen + list(overrides or [])))


def replace(params: Params, overrides: list[str]) -> Params:
    """A copy of params with overrides applied."""
    return parse_params(apply_overrides(params.raw, overrides))


__all__ = ["Params", "ConfigError", "load_params", "replace", "apply_overrides", "MODELS"]
