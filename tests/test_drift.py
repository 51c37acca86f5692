"""The label-free drift signal: low on new images of the training domain, high on another style."""

from __future__ import annotations

from segflow.data.synth import synthesize
from segflow.evaluate import drift


def test_drift_score_separates_unshifted_from_shifted_images(tiny, tmp_path):
    model = tiny["model"]  # trained on synthetic target-style scenes
    reference = drift.statistics(model, tiny["images"])
    same = synthesize(tmp_path / "same", "target", 16, 64, seed=301, unlabeled=True)
    shifted = synthesize(tmp_path / "shifted", "source", 16, 64, seed=302, unlabeled=True)
    low, _ = drift.drift_score(reference, drift.statistics(model, same))
    high, parts = drift.drift_score(reference, drift.statistics(model, shifted))
    assert low < drift.DEFAULT_THRESHOLD < high, (low, high, parts)
    assert set(parts) == {"entropy", "classes", "colour"} and all(0 <= v <= 1 for v in parts.values())
    assert drift.drift_score(reference, reference)[0] == 0
    chart = drift.drift_chart(reference, drift.statistics(model, shifted), high, tmp_path / "drift.png")
    assert chart.stat().st_size > 1000
