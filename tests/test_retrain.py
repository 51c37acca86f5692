"""Retraining on new data, three ticks of pipelines/retrain.py with kfp.local, on data no other test uses.

1. The first tick has no champion: it trains from scratch and crowns v1.
2. The same data again: "no new data", nothing trains, no version is added.
3. More labelled data: the champion is fine-tuned, v2 is registered, and the better holds @champion.

Then unlabelled images: of the training domain (low drift score, nothing to do), and in the target
style: the score passes the threshold, the champion is adapted to them from its own training data
and registered, tagged with those images; the same images again do nothing.
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
    params = {
        "data_uri": str(data),
        "registered_model": "street",
        "epochs": 2,
        "input_size": 64,
        "batch_size": 4,
        "adapt_iterations": 4,
        "adapt_eval_every": 2,
    }
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
    def unlabelled_tick(images) -> tuple[dict, object]:
        tick = orchestration.run_local(PIPELINE, {**params, "data_uri": str(images)})
        assert "train-model" not in tick["tasks"]
        return tick, client.get_run(tick["mlflow_run_id"])

    calm_images = synthesize(tmp_path / "unl-source", "source", num_images=12, size=64, seed=79, unlabeled=True)
    moved_images = synthesize(tmp_path / "unl-target", "target", num_images=12, size=64, seed=80, unlabeled=True)
    calm_tick, calm = unlabelled_tick(calm_images)  # the training domain
    assert "adapt-model" not in calm_tick["tasks"], sorted(calm_tick["tasks"])
    moved_tick, moved = unlabelled_tick(moved_images)  # the camera style
    low, high = calm.data.metrics["drift_score"], moved.data.metrics["drift_score"]
    print(f"drift scores: unshifted {low:.3f}, shifted {high:.3f}")
    assert calm.data.tags["segflow.retrain"].startswith("unlabelled images, no drift")
    assert moved.data.tags["segflow.retrain"].startswith("unlabelled images that drifted")
    assert moved.data.tags["segflow.retrain"].endswith("adapt the champion")
    assert low < high

    # The drifted images: the champion was adapted to them (DACS, its training data as the source)
    # and registered as a new version that says what it was adapted to.
    assert {"adapt-model", "register-model-2"} <= set(moved_tick["tasks"]), sorted(moved_tick["tasks"])
    adapted = max(client.search_model_versions("name = 'street'"), key=lambda v: int(v.version))
    assert adapted.tags[registry.ADAPTED_TO] == moved.data.tags["segflow.source_fingerprint"]
    assert adapted.tags[registry.TRAINING_DATA] == champion.tags[registry.TRAINING_DATA]
    versions = len(client.search_model_versions("name = 'street'"))
    again_tick, again = unlabelled_tick(moved_images)
    assert "adapt-model" not in again_tick["tasks"], again_tick["tasks"]
    assert again.data.tags["segflow.retrain"].startswith("unlabelled images v"), again.data.tags["segflow.retrain"]
    assert len(client.search_model_versions("name = 'street'")) == versions
