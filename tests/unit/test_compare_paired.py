"""`cbh compare`'s paired comparison against real MLflow runs (a throwaway SQLite store): the
two runs' test predictions are joined by image, patients come from the workspace's frozen test
table when its version is the runs', and a run on another test set is not paired."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient

from pipelines.registry.lineage import md5_file
from pipelines.reports.compare import _paired


def test_paired_rows_name_their_unit_and_refuse_another_test_set(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("paired", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("paired")
    try:
        rng = np.random.default_rng(0)
        images = [f"img{i:03d}" for i in range(60)]
        actual = np.where(np.arange(60) % 2 == 1, "hypoplasia", "normal")
        frozen = tmp_path / "frozen_test.parquet"
        pd.DataFrame({"image_id": images, "patient_pseudo": [f"p{i // 3}" for i in range(60)]}).to_parquet(frozen)

        def run(strength: float, test_md5: str) -> str:
            prob = 1 / (1 + np.exp(-(strength * (actual == "hypoplasia") + rng.normal(0, 1, 60))))
            with mlflow.start_run() as r:
                mlflow.set_tag("data.frozen_test_md5", test_md5)
                table = pd.DataFrame({"image_id": images, "actual": actual, "predicted": actual, "probability": prob})
                mlflow.log_text(table.to_csv(index=False), "evaluation/test_predictions.csv")
            return r.info.run_id

        md5 = md5_file(frozen)
        client = MlflowClient()
        runs = [client.get_run(run(0.5, md5)), client.get_run(run(3.0, md5)), client.get_run(run(3.0, "other"))]
        rows = _paired(runs, frozen, 200, 0).rows
        assert rows[0][2:4] == ["60", "20 patients"]
        difference = float(rows[0][4].split()[0])
        assert difference > 0 and float(rows[0][5].lstrip("< ")) < 0.05
        assert "not comparable" in rows[1][4]
        assert _paired(runs[:2], None, 200, 0).rows[0][3] == "images"     # no frozen table: images are the unit
    finally:
        mlflow.set_tracking_uri("")
