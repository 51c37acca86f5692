"""The retraining policy, decision by decision, without MLflow or storage (milliseconds); the
pipeline that acts on it runs in tests/test_retrain.py."""

from __future__ import annotations

import pytest

from segflow.errors import SegflowError
from segflow.lifecycle import (
    Champion,
    Decision,
    after_drift,
    candidate_name,
    candidate_table,
    first_look,
    needs_drift,
    note,
    pick_members,
)

FP = "f" * 64
CHAMPION = Champion(version=3, source_fingerprint="a" * 64, model="s3://m/3", data="s3://d/1", drift_reference="{}")


@pytest.mark.parametrize(
    "champion, adapted, decision, drift",
    [
        (None, None, Decision.NEW, False),  # no champion: train
        (Champion(1, source_fingerprint=FP), None, Decision.SAME, False),  # the champion's own data
        (CHAMPION, 4, Decision.ADAPTED, False),  # images a version was already adapted to
        (CHAMPION, None, Decision.NEW, True),  # other data beside a champion with a reference: look closer
        (Champion(1, source_fingerprint="a" * 64), None, Decision.NEW, False),  # no reference recorded
    ],
)
def test_first_look(champion, adapted, decision, drift):
    assert first_look(FP, champion, adapted) is decision
    assert needs_drift(decision, champion) is drift


@pytest.mark.parametrize(
    "champion, labelled, score, decision",
    [
        (CHAMPION, True, 0.9, Decision.NEW),  # labelled data is trained on, drifted or not
        (CHAMPION, False, 0.10, Decision.SHIFTED),  # unlabelled and drifted: adapt
        (CHAMPION, False, 0.05, Decision.UNLABELLED),  # at the threshold: no drift
        (CHAMPION, False, 0.01, Decision.UNLABELLED),
        (Champion(3, drift_reference="{}"), False, 0.9, Decision.UNLABELLED),  # no training data to adapt from
    ],
)
def test_after_drift(champion, labelled, score, decision):
    assert after_drift(champion, labelled, score, threshold=0.05) is decision


def test_each_decision_has_its_note():
    notes = {
        d: note(d, "s3://b/new", FP, CHAMPION, adapted_version=4, drift_score=0.1, threshold=0.05) for d in Decision
    }
    assert notes[Decision.SAME] == "no new data: s3://b/new is what champion v3 was trained on"
    assert notes[Decision.NEW] == f"new data: s3://b/new (fingerprint {FP[:16]})"
    assert notes[Decision.SHIFTED].startswith("unlabelled images that drifted (score 0.100 > 0.05)")
    assert notes[Decision.ADAPTED] == "unlabelled images v4 was already adapted to: nothing to do"
    assert "records no training data" in notes[Decision.UNLABELLED]
    calm = note(Decision.UNLABELLED, "d", FP, CHAMPION, drift_score=0.01, threshold=0.05)
    assert calm == "unlabelled images, no drift (score 0.010 <= 0.05): nothing to do"
    assert [d.value for d in Decision] == ["same", "new", "shifted", "unlabelled", "adapted"]  # pipelines compare these


def test_candidates_are_named_and_picked():
    assert candidate_name("adaptsegnet", "multi") == "adaptsegnet-multi" and candidate_name("dacs", "single") == "dacs"
    assert pick_members({"advent": "b", "minent": "a", "dacs": "c"}, ["minent", "advent"]) == ["a", "b"]
    with pytest.raises(SegflowError, match="no candidate named advent among dacs, minent"):
        pick_members({"minent": "a", "dacs": "c"}, ["minent", "advent"])


def test_the_candidate_table_names_every_model_once():
    table = candidate_table(
        ("src", "src-eval"), [("dacs", "d", "d-eval"), ("minent", "m", "m-eval")], ("ens", "e", "e-eval")
    )
    assert table == {"source-only": ("src", "src-eval"), "dacs": ("d", "d-eval"), "minent": ("m", "m-eval"),
                     "ens": ("e", "e-eval")}  # fmt: skip
    with pytest.raises(SegflowError, match="two candidates are named 'dacs'"):
        candidate_table(("s", "se"), [("dacs", "a", "ae"), ("dacs", "b", "be")], ("ens", "e", "ee"))
