"""Retraining on new data, three ticks of pipelines/retrain.py with kfp.local, on data no other test uses.

1. The first tick has no champion: it trains from scratch and crowns v1.
2. The same data again: "no new data", nothing trains, no version is added.
3. More labelled data: the champion is fine-tuned, v2 is registered, and the better holds @champion.

Then unlabelled images: of the training domain (`segflow check-data`: low drift score, nothing
to do), and in the target style: the score passes the threshold, the pipeline adapts the champion to
them from its own training data and registers it, tagged with those images; the same images again
do nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import mlflow
import pytest
from conftest import REPO, run_cli

from segflow import registry, tracking
from segflow.data.synth import synthesize
from segflow.lifecycle import Decision
from segflow_kfp import orchestration

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
    v1_score = json.loads(v1_now.tags[rescored[0]])["val_mDice"]
    v2_score = float(v2.tags["segflow.score.val_mDice"])
    assert str(champion.version) == ("2" if v2_score > v1_score else "1")
    training = json.loads((third["job_dir"] / "train-model" / "model" / "config.json").read_text())
    assert training["architecture"] == "lite_hrnet_s"
    assert "segflow.drift_reference" in champion.tags

    # Unlabelled images land. What a tick decides without training comes from the same stage as the
    # command's (`segflow check-data`): asked there, it spares the suite two pipeline runs.
    def check_data(images) -> str:
        code, out, err = run_cli("check-data", images, "--registered-model", "street")
        said = [line for line in out.splitlines() if line.split(":")[0] in {d.value for d in Decision}]
        assert code == 0 and said, out + err
        return said[-1]

    calm_images = synthesize(tmp_path / "unl-source", "source", num_images=12, size=64, seed=79, unlabeled=True)
    moved_images = synthesize(tmp_path / "unl-target", "target", num_images=12, size=64, seed=80, unlabeled=True)
    calm = check_data(calm_images)  # the training domain
    assert calm.startswith("unlabelled: unlabelled images, no drift"), calm
    low = float(re.search(r"score ([0-9.]+)", calm)[1])

    # The camera style, through the pipeline: the score passes the threshold, and the champion is
    # adapted to them (DACS, its training data as the source) and registered as a new version that
    # says what it was adapted to.
    moved_tick = orchestration.run_local(PIPELINE, {**params, "data_uri": str(moved_images)})
    moved = client.get_run(moved_tick["mlflow_run_id"])
    high = moved.data.metrics["drift_score"]
    print(f"drift scores: unshifted {low:.3f}, shifted {high:.3f}")
    assert low < high
    assert moved.data.tags["segflow.retrain"].startswith("unlabelled images that drifted")
    assert moved.data.tags["segflow.retrain"].endswith("adapt the champion")
    assert "train-model" not in moved_tick["tasks"]
    assert {"adapt-model", "register-model-2"} <= set(moved_tick["tasks"]), sorted(moved_tick["tasks"])
    adapted = max(client.search_model_versions("name = 'street'"), key=lambda v: int(v.version))
    assert adapted.tags[registry.ADAPTED_TO] == moved.data.tags["segflow.source_fingerprint"]
    assert adapted.tags[registry.TRAINING_DATA] == champion.tags[registry.TRAINING_DATA]
    again = check_data(moved_images)  # the same images again: nothing to do
    assert again.startswith(f"adapted: unlabelled images v{adapted.version} was already adapted to"), again
