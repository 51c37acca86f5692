"""What stages return: one typed result per stage, made from the record the stage writes."""

from __future__ import annotations

import inspect
import json
import typing

from segflow import stages
from segflow.results import StageResult, TrainResult


def test_every_stage_returns_a_typed_result():
    functions = {name: f for name, f in vars(stages).items() if name.endswith("_stage") and inspect.isfunction(f)}
    assert len(functions) >= 13, sorted(functions)
    for name, function in functions.items():
        returned = typing.get_type_hints(function)["return"]
        assert inspect.isclass(returned) and issubclass(returned, StageResult), f"{name} returns {returned}"
        assert returned is not StageResult, f"{name}: one result class per stage"


def test_a_result_names_the_record_s_figures_and_gives_the_record_back():
    record = {
        "best_val_mDice": 0.5,
        "best_epoch": 3,
        "epochs_run": 4,
        "dataset_fingerprint": "abc",
        "history": [{"epoch": 0, "train_loss": 1.0}],
        "metrics": {"best_val_mDice": 0.5},
    }
    result = TrainResult.of(record)
    assert (result.best_val_mDice, result.best_epoch, result.dataset_fingerprint) == (0.5, 3, "abc")
    assert result.tiling is None and result.metrics == {"best_val_mDice": 0.5}
    assert json.loads(json.dumps(result.to_json())) == record
    assert TrainResult.of(result.to_json()) == result
