import pytest

from pipelines.config import ConfigError, load_params, replace
from tests.conftest import ROOT


def test_params_load_into_typed_sections(params):
    assert params.train.max_epochs > 0 and isinstance(params.segment.channels, tuple)
    assert params.paths.mlflow_uri.startswith("sqlite:///")


def test_override_one_value_for_one_run(params):
    p = replace(params, ["train.max_epochs=0", "train.model=asc"])
    assert p.train.max_epochs == 0 and p.train.model == "asc"
    assert params.train.max_epochs != 0          # the original is untouched (frozen)


@pytest.mark.parametrize("bad, fragment", [
    ("train.nope=1", "no 'train.nope'"),
    ("max_epochs=3", "section.key=value"),
    ("train.max_epochs=abc", "train.max_epochs"),
    ("train.model=resnet", "choose one of"),
    ("segment.augment=strong", "segment.augment = 'strong'; choose one of"),
    ("train.image_norm=clahe", "train.image_norm = 'clahe'; choose one of"),
    ("segment.norm=group", "segment.norm = 'group'; choose one of"),
])
def test_bad_overrides_name_the_problem(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_params(ROOT / "params.yaml", [bad])


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "params.yaml")


def test_paper_profile_is_a_named_set_of_overrides():
    paper = load_params(ROOT / "params.yaml", ["train.lr=0.0003"], profile="paper")
    assert paper.preprocess.size == 224 and paper.train.backbone == "densenet121"
    assert paper.segment.channels == (32, 64, 128, 256, 512)
    assert paper.train.lr == 0.0003                        # --set on top of the profile
    assert "profiles.paper" not in paper.flat()
    with pytest.raises(ConfigError, match="no profile 'huge'"):
        load_params(ROOT / "params.yaml", profile="huge")
