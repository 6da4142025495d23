import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import (
    BACKBONES,
    SECTIONS,
    ConfigError,
    Params,
    ValidateSection,
    describe,
    load_params,
    replace,
)
from pipelines.contract.validate import ValidateParams
from tests.conftest import ROOT


def _write(tmp_path: Path, edit) -> Path:
    """A copy of params.yaml with `edit(raw)` applied."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_params_load_into_typed_sections(params: Params) -> None:
    assert params.train.max_epochs > 0 and isinstance(params.segment.channels, tuple)
    assert isinstance(params.synth.styles, tuple) and isinstance(params.deid.templates, tuple)
    assert params.paths.mlflow_uri.startswith("sqlite:///")
    assert isinstance(params.deid.ocr_min_confidence, float)          # written 80 in params.yaml


def test_override_one_value_for_one_run(params: Params) -> None:
    p = replace(params, ["train.max_epochs=0", "train.model=asc"])
    assert p.train.max_epochs == 0 and p.train.model == "asc"
    assert params.train.max_epochs != 0          # the original is untouched (frozen)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0                    # type: ignore[misc]


def test_sections_compare_and_hash_by_value(params: Params) -> None:
    again = load_params(ROOT / "params.yaml")
    assert again.segment == params.segment and hash(again.segment) == hash(params.segment)


@pytest.mark.parametrize("bad, fragment", [
    ("train.nope=1", "no 'train.nope'"),
    ("max_epochs=3", "section.key=value"),
    ("train.max_epochs=abc", "train.max_epochs: 'abc' is not a whole number"),
    ("train.max_epochs=2.5", "train.max_epochs: 2.5 is not a whole number"),
    ("train.resume=flase", "train.resume: 'flase' is not a boolean"),
    ("train.channels_last=1", "train.channels_last: 1 is not a boolean"),
    ("evaluate.bootstrap=-5", "evaluate.bootstrap: -5 must be greater than 0"),
    ("train.accelerator=[gpu, 1]", r"train.accelerator: \['gpu', 1\] is not a string"),
    ("segment.channels=[16, -1]", r"segment.channels\[1\]: -1 must be greater than 0"),
    ("split.test_fraction=1.0", "split.test_fraction: 1.0 must be less than 1"),
    ("commission.cohorts=[a]", "commission.cohorts: \\['a'\\] is not a mapping"),
    ("train.model=resnet", "train.model: 'resnet' is not allowed; choose 'asc', 'asc-ga'"),
    ("segment.augment=strong", "segment.augment: 'strong' is not allowed; choose 'basic', 'scanner' or 'floor'"),
    ("train.image_norm=clahe", "train.image_norm: 'clahe' is not allowed; choose 'none' or 'equalise'"),
    ("segment.norm=group", "segment.norm: 'group' is not allowed; choose 'batch' or 'instance'"),
    ("train.backbone=vgg", "train.backbone: 'vgg' is not allowed; choose 'small', 'densenet121'"),
    ("deid.executor=threads", "deid.executor: 'threads' is not allowed; choose 'processes' or 'dask'"),
    ("synth.ga_min=40", r"synth: ga_min \(40.0\) must not exceed ga_max \(36.0\)"),
])
def test_bad_overrides_name_the_key_and_the_problem(bad: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_params(ROOT / "params.yaml", [bad])


def test_every_mistake_is_one_sentence() -> None:
    with pytest.raises(ConfigError) as caught:
        load_params(ROOT / "params.yaml", ["train.resume=flase", "evaluate.bootstrap=-5"])
    assert str(caught.value).splitlines() == ["override: train.resume: 'flase' is not a boolean (true or false)",
                                              "override: evaluate.bootstrap: -5 must be greater than 0"]


def test_mistakes_in_the_file_name_it(tmp_path: Path) -> None:
    def edit(raw: dict) -> None:
        raw["train"]["resume"] = "flase"
        raw["train"]["learning_rate"] = 0.1
        del raw["evaluate"]["bootstrap"]
        raw["extras"] = {}
    with pytest.raises(ConfigError) as caught:
        load_params(_write(tmp_path, edit))
    lines = str(caught.value).splitlines()
    assert "params.yaml: 'extras' is not a section" in lines[0]
    assert "params.yaml: evaluate.bootstrap is missing" in lines
    assert "params.yaml: train.resume: 'flase' is not a boolean (true or false)" in lines
    assert any(line.startswith("params.yaml: train.learning_rate is not a key of 'train'") for line in lines)


def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "params.yaml")


def test_paper_profile_is_a_named_set_of_overrides() -> None:
    paper = load_params(ROOT / "params.yaml", ["train.lr=0.0003"], profile="paper")
    assert paper.preprocess.size == 224 and paper.train.backbone == "densenet121"
    assert paper.segment.channels == (32, 64, 128, 256, 512)
    assert paper.train.lr == 0.0003                        # --set on top of the profile
    assert "profiles.paper" not in paper.flat()
    with pytest.raises(ConfigError, match="no profile 'huge'"):
        load_params(ROOT / "params.yaml", profile="huge")


def test_validate_params_is_the_validate_section(params: Params) -> None:
    """One class for params.yaml's validate: and the contract; its defaults are the file's."""
    assert ValidateParams is ValidateSection
    assert ValidateSection() == params.validate
    assert dataclasses.replace(params.validate, min_per_class=3).min_per_class == 3
    with pytest.raises(ValueError, match="ga_min"):
        dataclasses.replace(params.validate, ga_min=50.0)


def test_head_section_defaults_are_the_files(params: Params) -> None:
    """The HC18 benchmark builds the section from its defaults: they must be params.yaml's."""
    from pipelines.config import HeadSection

    assert HeadSection() == params.head
    with pytest.raises(ValueError, match="must leave subjects to train on"):
        dataclasses.replace(params.head, val_fraction=0.5, test_fraction=0.5)


def test_every_key_has_a_description(params: Params) -> None:
    rows = describe(params)
    assert len(rows) == sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())
    assert [r.key for r in rows if not r.description.strip()] == []
    lr = next(r for r in rows if r.key == "train.lr")
    assert lr.value == params.train.lr and lr.kind == "number > 0"
    assert next(r for r in rows if r.key == "segment.norm").kind == "batch | instance"


def test_config_accepts_exactly_the_backbones_there_are() -> None:
    """pipelines.config keeps its own copy (it must not import torch): the two agree."""
    from models.networks import BACKBONES as BUILT

    assert BACKBONES == BUILT


def test_config_does_not_import_torch() -> None:
    code = "import sys, pipelines.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
