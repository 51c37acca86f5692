"""Domain adaptation on tiny synthetic data: every method runs through the one engine, keeps its
state in the checkpoint, chooses snapshots by a recorded criterion, and fails clearly on bad input.
Whether adaptation pays is measured in benchmarks/domain_adaptation.py, not here."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, run_import, run_train
from PIL import Image
from safetensors.torch import load_file

from segflow.adapt.config import AdaptConfig
from segflow.adapt.selection import CRITERIA, DESCRIPTIONS
from segflow.data.synth import synthesize
from segflow.errors import SegflowError
from segflow.evaluate.evaluation import EvalConfig
from segflow.stages import adapt_stage, ensemble_stage, evaluate_stage
from segflow.train.config import TrainConfig

SHAPE = {"input_size": 64, "batch_size": 4}


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict[str, Path]:
    """A source dataset, a target dataset, target images alone, and a model trained on the source."""
    root = tmp_path_factory.mktemp("domains")
    run_import(synthesize(root / "src_raw", "source", 16, 64, seed=31), root / "source", val_fraction=0.25)
    target_raw = synthesize(root / "tgt_raw", "target", 16, 64, seed=32)
    run_import(target_raw, root / "target", val_fraction=0.25)
    run_train(TrainConfig(data=str(root / "source"), out=str(root / "init"), epochs=2, iters_per_epoch=4, **SHAPE))
    return {
        "source": root / "source",
        "target": root / "target",
        "images": target_raw / "images",
        "init": root / "init",
    }


def config(domains, out: Path, method: str, target: Path | None = None, **kwargs) -> AdaptConfig:
    return AdaptConfig(
        source=str(domains["source"]),
        target=str(target or domains["target"]),
        init=str(domains["init"]),
        out=str(out),
        method=method,
        **{"iterations": 4, "eval_every": 2, **SHAPE, **kwargs},
    )


@pytest.mark.parametrize(
    "method, levels, logged",
    [
        ("adaptsegnet", "multi", {"train_adv", "train_disc", "train_disc_accuracy", "train_target_entropy"}),
        ("advent", "single", {"train_adv", "train_disc_accuracy"}),
        ("minent", "multi", {"train_target_entropy"}),
        ("dacs", "single", {"train_mix", "train_confident_share"}),
    ],
)
def test_each_method_adapts_and_records_its_choice(domains, tmp_path, method, levels, logged):
    result = adapt_stage(config(domains, tmp_path / "m", method, levels=levels), track=False)
    assert result.method == method and result.record["iterations"] == 4 and result.record["snapshots"] == 2
    assert result.selection["criterion"] == "highest target val mDice"
    assert result.selection["epoch"] in (1, 2)
    history = result.record["history"]
    assert logged <= set(history[-1]), set(history[-1])
    assert {"val_target_mDice", "val_target_mIoU"} <= set(history[-1])
    training = json.loads((tmp_path / "m" / "training.json").read_text())
    assert training["selection"] == result.selection
    code, _, err = run_cli("evaluate", "--model", tmp_path / "m", "--data", domains["target"], "--out", tmp_path / "e")
    assert code == 0, err


def test_discriminators_learn_while_the_segmenter_fools_them(domains, tmp_path):
    """AdaptSegNet's two optimisers both move: the discriminators' weights change, and their
    accuracy is logged; the checkpoint holds them."""
    from segflow.storage import checkpoint_dir

    out = tmp_path / "m"
    adapt_stage(config(domains, out, "adaptsegnet", levels="multi", iterations=6, eval_every=3), track=False)
    saved = torch.load(checkpoint_dir(str(out)) / "last.pt", weights_only=True)
    assert {"disc_main", "disc_aux"} <= set(saved["objective"]) and set(saved["parts"]) == {"model", "discriminator"}
    first_conv = saved["objective"]["disc_main"]["net.0.weight"]
    assert saved["parts"]["discriminator"]["optimizer"]["state"], "the discriminators' optimiser took steps"
    assert torch.isfinite(first_conv).all()


def test_label_free_choice_with_target_images_only(domains, tmp_path):
    cfg = config(domains, tmp_path / "m", "minent", target=domains["images"], input_size=0)
    result = adapt_stage(cfg, track=False)
    assert result.selection["criterion"] == DESCRIPTIONS["consistency"]
    history = result.record["history"]
    measured = {"val_target_entropy", "val_consistency", "val_agreement", "val_source_mDice"}
    assert measured | {f"val_select_{name}" for name in CRITERIA} <= set(history[0])
    assert "val_target_mDice" not in history[0]
    best = max(history, key=lambda h: h["val_select_consistency"])
    assert result.selection["epoch"] == best["epoch"] + 1
    # --input-size 0 (the default): the size the --init model was trained at.
    assert result.record["config"]["input_size"] == 64


def test_label_free_choice_beside_target_labels(domains, tmp_path):
    """--select label-free on a labelled target: the labels score every snapshot (the oracle's
    view, for benchmarks) but the label-free criterion chooses."""
    cfg = replace(config(domains, tmp_path / "m", "source", iterations=6, eval_every=2), select="agreement")
    result = adapt_stage(cfg, track=False)
    history = result.record["history"]
    assert result.selection["criterion"] == DESCRIPTIONS["agreement"]
    assert {"val_target_mDice", "val_select_agreement"} <= set(history[0])
    assert result.selection["epoch"] == max(history, key=lambda h: h["val_agreement"])["epoch"] + 1


def test_select_labels_needs_a_labelled_target(domains, tmp_path):
    cfg = replace(config(domains, tmp_path / "m", "minent", target=domains["images"]), select="labels")
    with pytest.raises(SegflowError, match="--select labels needs target labels"):
        adapt_stage(cfg, track=False)
    with pytest.raises(SegflowError, match="--select 'entropy' is not known"):
        replace(cfg, select="entropy").validate()
    assert not (tmp_path / "m").exists()


class _Fixed(torch.nn.Module):
    """A stand-in segmenter: logits from a function of the image (a Segmentor's calling convention)."""

    def __init__(self, logits) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return SimpleNamespace(logits=self.logits(images))


def test_consistency_does_not_reward_collapse():
    """A model that predicts one class everywhere is the most confident there is; the old rule
    (lowest entropy) prefers it, consistency prefers a model that tells the image's regions apart."""
    from segflow.adapt.selection import CRITERIA, measure_target, target_predictions

    images = torch.zeros(1, 3, 32, 32)
    images[..., :, 16:] = 1.0  # two regions: left and right
    batches = [{"image": images}]

    def regions(x):  # class 0 on the dark side, 1 on the bright side, moderately sure
        return torch.cat([1 - x[:, :1], x[:, :1], torch.zeros_like(x[:, :1])], 1) * 2

    diverse = _Fixed(regions)
    collapsed = _Fixed(lambda x: torch.tensor([50.0, 0, 0]).view(1, 3, 1, 1).expand(len(x), 3, *x.shape[-2:]))
    reference = target_predictions(diverse, batches, "cpu")
    scores = {}
    for name, model in (("diverse", diverse), ("collapsed", collapsed)):
        measures = measure_target(model, batches, 3, "cpu", reference)
        scores[name] = {rule: CRITERIA[rule](measures) for rule in ("confidence", "consistency", "agreement")}
    assert scores["collapsed"]["confidence"] > scores["diverse"]["confidence"]
    assert scores["diverse"]["consistency"] > 0.6 > 1 / 3 + 1e-6 > scores["collapsed"]["consistency"] - 1e-6
    assert scores["diverse"]["agreement"] == pytest.approx(2 / 3) and scores["collapsed"]["agreement"] < 0.3


def test_dacs_recolours_mixed_images_for_the_student_only():
    """The mixed image goes through DACS's jitter and blur on its way back from the normalised
    tensor; the same generator gives the same images, and the round trip alone changes nothing."""
    from segflow.adapt.objectives import DACS
    from segflow.data.datasets import Normalization, to_image, to_tensor

    norm = Normalization([120.0, 110.0, 100.0], [60.0, 55.0, 50.0])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    batch = torch.stack([to_tensor(im, norm.mean, norm.std) for im in images])
    assert all(np.array_equal(to_image(t, norm.mean, norm.std), im) for t, im in zip(batch, images, strict=True))
    dacs = DACS(AdaptConfig("-", "-", "-", "-", method="dacs"), target=None, norm=norm)
    first = dacs.augment(batch, torch.Generator().manual_seed(5))
    again = dacs.augment(batch, torch.Generator().manual_seed(5))
    assert first.shape == batch.shape and first.dtype == batch.dtype
    assert torch.equal(first, again) and not torch.allclose(first, batch, atol=0.05)


def test_dacs_weights_each_pseudo_label_by_the_teachers_confidence():
    """``pixel`` (the default): a pixel's weight is the teacher's probability of its pseudo-label;
    ``image`` (the paper's): every pixel of an image gets the share of its confident pixels."""
    from segflow.adapt.objectives import pseudo_label_weights
    from segflow.models.outputs import pseudo_labels

    # Two classes, one image of 2 x 2 pixels: the teacher is sure of the first pixel only.
    p = torch.tensor([[0.99, 0.7], [0.6, 0.2]])
    logits = torch.stack([p.log(), (1 - p).log()])[None]
    _, confidence = pseudo_labels(logits)
    confident = confidence >= 0.968
    pixel = pseudo_label_weights(confidence, confident, AdaptConfig("-", "-", "-", "-").mix_weighting)
    assert torch.allclose(pixel, torch.tensor([[[0.99, 0.7], [0.6, 0.8]]]), atol=1e-6)
    image = pseudo_label_weights(confidence, confident, "image")
    assert image.shape == (1, 2, 2) and torch.allclose(image, torch.full((1, 2, 2), 0.25))
    with pytest.raises(SegflowError, match="--mix-weighting must be pixel or image"):
        AdaptConfig("s", "t", "i", "o", method="dacs", mix_weighting="soft").validate()


def test_each_adversarial_method_has_its_own_tuned_weight_unless_given():
    weights = {m: AdaptConfig("-", "-", "-", "-", method=m).adversarial_weight for m in ("adaptsegnet", "advent")}
    assert weights == {"adaptsegnet": 0.01, "advent": 0.1}
    assert AdaptConfig("-", "-", "-", "-", method="adaptsegnet", adv_weight=0.3).adversarial_weight == 0.3
    assert AdaptConfig("-", "-", "-", "-", method="adaptsegnet", adv_weight=0.0).adversarial_weight == 0.0


def test_discriminators_read_maps_pooled_to_the_head_s_resolution_down_to_32_px():
    """AdaptSegNet's and AdvEnt's discriminators read average-pooled maps: by --disc-pool (4), halved
    while the map would be under the 32 px their five stride-2 convolutions need; 1 keeps them whole."""
    from segflow.adapt.objectives import Adversarial

    logits = torch.randn(2, 7, 256, 192)
    for maps in ("softmax", "self_information"):
        pooled = Adversarial(AdaptConfig("-", "-", "-", "-"), None, 7, maps).map(logits)
        assert pooled.shape == (2, 7, 64, 48)
    whole = Adversarial(AdaptConfig("-", "-", "-", "-", disc_pool=1), None, 7, "softmax").map(logits)
    assert torch.allclose(
        F.avg_pool2d(whole, 4), Adversarial(AdaptConfig("-", "-", "-", "-"), None, 7, "softmax").map(logits)
    )
    assert torch.allclose(whole.sum(1), torch.ones(2, 256, 192))  # still probabilities
    small = Adversarial(AdaptConfig("-", "-", "-", "-"), None, 7, "softmax")
    assert small.map(torch.randn(1, 7, 64, 64)).shape[-2:] == (32, 32)
    assert small.map(torch.randn(1, 7, 48, 48)).shape[-2:] == (48, 48)
    with pytest.raises(SegflowError, match="--disc-width and --disc-pool must be at least 1"):
        AdaptConfig("s", "t", "i", "o", disc_pool=0).validate()


def test_entropy_weight_scales_the_target_term_on_both_levels():
    """MinEnt's loss is the source loss plus ent_weight x (main entropy + aux_ratio x auxiliary
    entropy): weight 0 leaves the source loss alone, and the tuned default is what is applied."""
    from segflow.adapt.objectives import MinEnt
    from segflow.models import create_model
    from segflow.models.outputs import entropy_map, probabilities

    torch.manual_seed(0)
    net = create_model("lite_hrnet_s", 7, aux=True).eval()  # eval: the same forward every call
    batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 7, (2, 32, 32))}
    batch["target"] = {"image": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        out = net(batch["target"]["image"], with_aux=True)
        main, aux = (entropy_map(probabilities(x)).mean() for x in (out.logits, out.aux_logits))
        totals = {}
        for weight in (0.0, AdaptConfig("-", "-", "-", "-").ent_weight):
            cfg = AdaptConfig("-", "-", "-", "-", method="minent", levels="multi", ent_weight=weight)
            totals[weight], logs = MinEnt(cfg, target=None).loss(net, batch, None)
    weight = max(totals)
    assert weight == 1.0 and cfg.aux_ratio == 0.2
    assert torch.allclose(totals[0.0], torch.tensor(logs["seg"]), atol=1e-6)
    assert torch.allclose(totals[weight] - totals[0.0], weight * (main + 0.2 * aux), atol=1e-5)


@pytest.mark.parametrize("method", ["adaptsegnet", "dacs"])
def test_resume_gives_the_same_result(domains, tmp_path, method):
    """Discriminators and their optimiser (AdaptSegNet), the EMA teacher (DACS): all in the
    checkpoint, so a run stopped after its first snapshot ends where an uninterrupted one does."""
    straight = tmp_path / "straight"
    adapt_stage(config(domains, straight, method), track=False)

    class Killed(Exception):
        pass

    def kill(epoch, record):
        raise Killed  # after the first snapshot's checkpoint is written

    cfg = config(domains, tmp_path / "b", method)
    with pytest.raises(Killed):
        adapt_stage(cfg, track=False, on_epoch=kill)
    assert not (tmp_path / "b").exists(), "a stopped run publishes nothing"
    resumed = adapt_stage(config(domains, tmp_path / "b", method, resume=True), track=False)
    assert resumed.record["iterations"] == 4
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_clear_errors(domains, tmp_path):
    common = ["--source", domains["source"], "--out", tmp_path / "m", "--method", "minent", "--no-track"]
    # A target with another label set.
    other = synthesize(tmp_path / "other_raw", "target", 8, 64, seed=5)
    meta = json.loads((other / "dataset_meta.json").read_text())
    meta["label_map"]["0"] = "heaven"
    (other / "dataset_meta.json").write_text(json.dumps(meta))
    run_import(other, tmp_path / "other")
    code, _, err = run_cli("adapt", *common, "--target", tmp_path / "other", "--init", domains["init"])
    assert code == 2 and "has labels" in err and "heaven" in err
    # An empty target.
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("adapt", *common, "--target", tmp_path / "empty", "--init", domains["init"])
    assert code == 2 and "holds no images" in err
    # An --init of another architecture than --model, and an --init that is not a model folder.
    code, _, err = run_cli(
        "adapt", *common, "--target", domains["target"], "--init", domains["init"], "--model", "lite_hrnet_18"
    )
    assert code == 2 and "'lite_hrnet_s' model but --model is 'lite_hrnet_18'" in err
    code, _, err = run_cli("adapt", *common, "--target", domains["target"], "--init", domains["source"])
    assert code == 2 and "no config.json" in err
    with pytest.raises(SegflowError, match="--method"):
        AdaptConfig("s", "t", "i", "o", method="cycada").validate()
    with pytest.raises(SegflowError, match="--ent-weight must not be negative"):
        AdaptConfig("s", "t", "i", "o", method="minent", ent_weight=-1.0).validate()
    with pytest.raises(SegflowError, match="--adv-weight and --ent-weight must not be negative"):
        AdaptConfig("s", "t", "i", "o", method="advent", adv_weight=-0.1).validate()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other", "other_raw"]


def test_ensemble_evaluates_exports_and_predicts(domains, tmp_path):
    """Two models of one label set averaged: it scores, exports (parity-checked) and predicts like one."""
    members = [str(domains["init"]), str(tmp_path / "second")]
    run_train(TrainConfig(data=str(domains["source"]), out=members[1], epochs=1, seed=5, **SHAPE))
    code, out, err = run_cli("ensemble", "--models", *members, "--out", tmp_path / "ens", "--no-track")
    assert code == 0, err
    config = json.loads((tmp_path / "ens" / "config.json").read_text())
    assert config["format"] == "segflow.ensemble/2" and len(config["members"]) == 2
    # Its probabilities are the members' mean, on any input.
    from segflow.models import artifact
    from segflow.models.outputs import probabilities

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        mean = sum(probabilities(artifact.load(m)[0](x).logits) for m in members) / 2
        ensemble = probabilities(artifact.load(tmp_path / "ens")[0](x).logits)
    assert torch.allclose(ensemble, mean, atol=1e-5)
    metrics = evaluate_stage(
        EvalConfig(model=str(tmp_path / "ens"), data=str(domains["target"]), out=str(tmp_path / "e")), track=False
    )
    assert 0 < metrics.mDice <= 1
    code, out, err = run_cli(
        "export",
        "--model",
        tmp_path / "ens",
        "--out",
        tmp_path / "ir",
        "--calibration",
        domains["target"],
        "--no-track",
    )
    assert code == 0 and "parity" in out, err
    code, out, err = run_cli(
        "predict", "--model", tmp_path / "ir", "--input", domains["images"], "--out", tmp_path / "p"
    )
    assert code == 0 and "16 images predicted" in out, err
    with pytest.raises(SegflowError, match="at least 2"):
        ensemble_stage([members[0]], str(tmp_path / "one"), track=False)
    other = tmp_path / "other_labels"
    shutil.copytree(members[0], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "labels": config["labels"][::-1]}))
    with pytest.raises(SegflowError, match="members must agree"):
        ensemble_stage([members[0], str(other)], str(tmp_path / "mixed"), track=False)
    assert not (tmp_path / "mixed").exists()


def test_evaluation_beside_a_baseline_shows_both_with_entropy(domains, tmp_path):
    adapt_stage(config(domains, tmp_path / "m", "minent"), track=False)
    cfg = EvalConfig(
        model=str(tmp_path / "m"), data=str(domains["target"]), out=str(tmp_path / "e"), baseline=str(domains["init"])
    )
    metrics = evaluate_stage(cfg, track=False)
    assert {"baseline_mDice", "baseline_mIoU"} <= set(metrics.metrics)
    picture = np.asarray(Image.open(tmp_path / "e" / "comparison.png"))
    four = np.asarray(Image.open(tmp_path / "e" / "predictions.png"))
    assert picture.shape[1] > 1.8 * four.shape[1], "six panels per row against three"
    assert "comparison.png" in (tmp_path / "e" / "report.md").read_text()


def test_picks_name_each_criterion_s_snapshot_beside_the_oracle():
    from segflow.adapt.selection import picks

    history = [
        {"epoch": 0, "val_target_mIoU": 0.30, "val_select_confidence": -0.5, "val_select_consistency": 0.6,
         "val_select_agreement": 0.9, "val_select_source": 0.7},
        {"epoch": 1, "val_target_mIoU": 0.35, "val_select_confidence": -0.2, "val_select_consistency": 0.7,
         "val_select_agreement": 0.8, "val_select_source": 0.6},
        {"epoch": 2, "val_target_mIoU": 0.25, "val_select_confidence": -0.1, "val_select_consistency": 0.5,
         "val_select_agreement": 0.7, "val_select_source": 0.5},
    ]  # fmt: skip
    chosen = picks(history)
    assert {k: v["epoch"] for k, v in chosen.items()} == {
        "oracle": 1, "confidence": 2, "consistency": 1, "agreement": 0, "source": 0
    }  # fmt: skip
    assert chosen["confidence"]["score"] == 0.25


def test_choose_copies_the_best_evaluated_candidate(tiny, tmp_path):
    """`segflow choose`: the candidate whose evaluation scores highest is copied to --out; the same
    name twice is refused; an existing --out needs --overwrite."""
    scores = {}
    for subset in ("val", "train"):
        out = tmp_path / f"eval-{subset}"
        evaluate_stage(EvalConfig(model=str(tiny["model"]), data=str(tiny["data"]), out=str(out), subset=subset))
        scores[subset] = json.loads((out / "metrics.json").read_text())["mIoU"]
    assert scores["val"] != scores["train"]
    args = ["choose", "--out", tmp_path / "best", "--metric", "mIoU", "--no-track", "--report", tmp_path / "r.md"]
    for subset in ("val", "train"):
        args += ["--candidate", f"{subset}={tiny['model']},{tmp_path / f'eval-{subset}'}"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    best = max(scores, key=scores.get)
    assert f"best: {best}" in out and (tmp_path / "best" / "model.safetensors").exists()
    assert f"| **{best}** |" in (tmp_path / "r.md").read_text()
    code, _, err = run_cli(*args)
    assert code == 2 and "--overwrite" in err
    twice = ["choose", "--out", tmp_path / "b2", "--no-track"] + 2 * ["--candidate", f"a={tiny['model']},{tmp_path}"]
    code, _, err = run_cli(*twice)
    assert code == 2 and "given twice" in err and not (tmp_path / "b2").exists()
    code, _, err = run_cli("choose", "--out", tmp_path / "b3", "--candidate", str(tiny["model"]))
    assert code == 2 and "NAME=MODEL,EVALUATION" in err and not (tmp_path / "b3").exists()
