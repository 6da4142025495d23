"""The demo's promise, at demo scale (slow: about 3 minutes): the champion reaches test AUC
>= 0.90 and cerebellum Dice >= 0.85 on its own synthetic frozen test split."""

import mlflow
import pytest
from mlflow import MlflowClient

from tests.integration.workspace import cbh, make_workspace


@pytest.mark.slow
def test_demo_scale_champion_quality(tmp_path):
    from pipelines.config import load_params
    from pipelines.data.synth import synth_cohort

    ws = make_workspace(tmp_path, tiny=False)
    p = load_params(ws / "params.yaml").synth
    synth_cohort(tmp_path / "export", p.patients, p.seed, p.styles, p.hypoplasia_fraction,
                 (p.ga_min, p.ga_max), p.max_exams, p.png_fraction)
    res = cbh(ws, "retrain", "--cohort", str(tmp_path / "export"))
    assert res.returncode == 0, res.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    client = MlflowClient()
    champ = client.get_model_version_by_alias("cerebellar-hypoplasia", "champion")
    m = client.get_run(champ.run_id).data.metrics
    assert m["test_auc"] >= 0.90, m
    assert m["test_dice_cerebellum"] >= 0.85, m
    assert m["test_tcd_mae_mm"] <= 2.0, m
