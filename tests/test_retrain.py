"""Retraining on new data, three ticks of pipelines/retrain.py with kfp.local, on data no other test uses.

1. The first tick has no champion: it trains from scratch and crowns v1.
2. The same data again: "no new data", nothing trains, no version is added.
3. More labelled data: the champion is fine-tuned, v2 is registered, and the better holds @champion.

Then unlabelled images: of the training domain (low drift score, nothing to do), and in the target
style (the score passes the threshold and the run says so).
"""

from __future__ import annotations

import shutil
import time

import mlflow
import pytest
from conftest import REPO

from segflow import orchestration, registry, tracking
from segflow.data.synth import synthesize

PIPELINE = REPO / "pipelines" / "retrain.py"


@pytest.mark.slow
def test_three_ticks(tmp_path, segflow_home):
    data = synthesize(tmp_path / "landing", "source", num_images=12, size=64, seed=77)
    params = {"data_uri": str(data), "registered_model": "street", "epochs": 2, "input_size": 64, "batch_size": 4}
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()

    first = orchestration.run_local(PIPELINE, params)
    assert "train-model" in first["tasks"] and "register-model" in first["tasks"]
    v1 = client.get_model_version_by_alias("street", "champion")
    assert str(v1.version) == "1" and v1.tags[registry.DECISION] == "champion"

    started = time.monotonic()
    same = orchestration.run_local(PIPELINE, params)
    seconds = time.monotonic() - started
    assert "train-model" not in same["tasks"] and "import-data" not in same["tasks"], same["tasks"]
    assert len(client.search_model_versions("name = 'street'")) == 1
    parent = client.get_run(same["mlflow_run_id"])
    assert parent.data.tags["segflow.retrain"].startswith("no new data")
    assert parent.data.metrics["new_data"] == 0
    print(f"no-new-data tick: {seconds:.1f} s")

    more = synthesize(tmp_path / "more", "source", num_images=8, size=64, seed=78)
    for sub in ("images", "masks"):
        for path in (more / sub).iterdir():
            shutil.copy(path, data / sub / f"m{path.name}")
    third = orchestration.run_local(PIPELINE, params)
    assert "train-model" in third["tasks"]
    v2 = client.get_model_version("street", "2")
    assert v2.tags[registry.SOURCE_FINGERPRINT] != v1.tags[registry.SOURCE_FINGERPRINT]
    champion = client.get_model_version_by_alias("street", "champion")
    challenger = client.get_model_version_by_alias("street", "challenger")
    assert str(challenger.version) == "2"
    # The champion is whichever scored better on the new validation data (v1 re-scored on it).
    v1_now = client.get_model_version("street", "1")
    rescored = [k for k in v1_now.tags if k.startswith("segflow.rescored.")]
    assert rescored, "v1 was scored on other validation data, so it was re-evaluated"
    import json

    v1_score = json.loads(v1_now.tags[rescored[0]])["val_mDice"]
    v2_score = float(v2.tags["segflow.score.val_mDice"])
    assert str(champion.version) == ("2" if v2_score > v1_score else "1")
    training = json.loads((third["job_dir"] / "train-model" / "model" / "config.json").read_text())
    assert training["architecture"] == "lite_hrnet_s"
    assert "segflow.drift_reference" in champion.tags

    # Unlabelled images land: nothing trains; the drift score says whether they moved away.
    def unlabelled_tick(domain: str, seed: int) -> dict:
        images = synthesize(tmp_path / f"unl-{domain}", domain, num_images=12, size=64, seed=seed, unlabeled=True)
        tick = orchestration.run_local(PIPELINE, {**params, "data_uri": str(images)})
        assert "train-model" not in tick["tasks"]
        return client.get_run(tick["mlflow_run_id"])

    calm = unlabelled_tick("source", 79)  # the training domain
    moved = unlabelled_tick("target", 80)  # the camera style
    low, high = calm.data.metrics["drift_score"], moved.data.metrics["drift_score"]
    print(f"drift scores: unshifted {low:.3f}, shifted {high:.3f}")
    assert calm.data.tags["segflow.retrain"].startswith("unlabelled images, no drift")
    assert moved.data.tags["segflow.retrain"].startswith("unlabelled images that drifted")
    assert low < high
