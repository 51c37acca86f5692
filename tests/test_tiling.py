"""Large images: tiles at native resolution for training, blended tiled inference everywhere the
model goes (evaluate, predict, the IR, the MLflow pyfunc), and the pixel guard."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from conftest import run_cli, run_evaluate, run_export, run_import, run_predict, run_train
from PIL import Image

from segflow.data.datasets import Normalization, SegmentationDataset, class_focus
from segflow.data.synth import synthesize
from segflow.data.transforms import tile_crop
from segflow.errors import SegflowError
from segflow.evaluate.evaluation import EvalConfig
from segflow.export.openvino_ir import ExportConfig
from segflow.export.predict import PredictConfig
from segflow.models import artifact as model_artifact
from segflow.models.tiling import Tiling, auto_tiling, blend_window, blended_rows, segment_tiled, tile_starts
from segflow.train.config import TrainConfig

MEAN, STD = np.full(3, 128.0, np.float32), np.full(3, 64.0, np.float32)


def test_tiles_cover_the_image_evenly_and_windows_fade_only_at_shared_edges():
    assert tile_starts(1000, 256, 192) == [0, 186, 372, 558, 744]  # last ends exactly at 1000
    assert tile_starts(200, 256, 192) == [0]
    for length in (257, 300, 999, 4096):
        starts = tile_starts(length, 256, 192)
        assert starts[0] == 0 and starts[-1] + 256 == length
        assert max(np.diff(starts)) <= 192
    window = blend_window(64, 16, rise=True, fall=False)
    assert window[0] == pytest.approx(1 / 17) and window[15] == pytest.approx(16 / 17)
    assert (window[16:] == 1).all()
    assert (blend_window(64, 16, rise=False, fall=False) == 1).all()  # a lone tile: no fading


def _local_model(channels: int = 5, pool: int = 9) -> torch.nn.Module:
    """A small translation-equivariant model with a 9 px receptive field and zero padding: its
    logits near a tile's edge differ from the whole image's, as a real network's do."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.AvgPool2d(pool, stride=1, padding=pool // 2, count_include_pad=True),
        torch.nn.Conv2d(3, channels, 1),
    ).eval()


def _smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width + 8, height + 8), Image.BILINEAR))[:height, :width].copy()


def test_blending_leaves_no_seam_where_hard_stitching_does():
    """Predictions compared across tile borders: blended tiles agree with the whole image there
    as well as anywhere; hard-stitched tiles (no overlap) disagree along every border."""
    model = _local_model()
    image = _smooth_image(200, 330)
    x = torch.from_numpy(((image.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1))[None]
    with torch.no_grad():
        whole = model(x)[0].argmax(0).numpy()
    blended, _ = segment_tiled(model, image, Tiling(64, 0.25), MEAN, STD)
    stitched, _ = segment_tiled(model, image, Tiling(64, 0.0), MEAN, STD)
    border = np.zeros(image.shape[1], bool)
    for start in tile_starts(image.shape[1], 64, 64)[1:]:
        border[start - 4 : start + 4] = True  # within the receptive field of a stitched border
    stitched_miss = (stitched != whole)[:, border].mean()
    blended_miss = (blended != whole)[:, border].mean()
    assert stitched_miss > 0.02
    assert blended_miss < stitched_miss / 4
    assert (blended == whole)[:, ~border].mean() > 0.99


def test_pointwise_model_tiles_exactly_and_rows_stream_in_bounded_bands():
    """A per-pixel model: tiled inference equals the whole image exactly (weights normalise), at
    any scale and for images smaller than one tile; bands never exceed one tile's height."""
    model = _local_model(pool=1)
    for height, width, scale in ((301, 157, 1.0), (40, 50, 1.0), (300, 200, 0.5)):
        image = _smooth_image(height, width, seed=height)
        labels, entropy = segment_tiled(model, image, Tiling(64, 0.25, scale), MEAN, STD, entropy=True)
        assert labels.shape == (height, width) and entropy.dtype == np.float16 and entropy.min() >= 0
        if scale == 1.0:
            x = torch.from_numpy(((image.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1))[None]
            with torch.no_grad():
                assert (labels == model(x)[0].argmax(0).numpy()).all()
    image = _smooth_image(301, 157)
    bands = list(blended_rows(model, image, Tiling(64, 0.25), MEAN, STD))
    assert sum(b.shape[1] for _, b in bands) == 301 and max(b.shape[1] for _, b in bands) <= 64
    assert [y for y, _ in bands] == tile_starts(301, 64, 48)


def test_training_tiles_centre_rare_classes_and_auto_size_follows_objects():
    rng = np.random.default_rng(0)
    image = np.zeros((400, 400, 3), np.uint8)
    mask = np.zeros((400, 400), np.uint8)
    mask[300:304, 50:54] = 1  # one tiny object
    crop_image, crop_mask = tile_crop(rng, image, mask, 64, 1.0, focus=(301, 51))
    assert crop_image.shape == (64, 64, 3) and (crop_mask == 1).any()
    edge_image, edge_mask = tile_crop(rng, image, mask, 64, 0.1)  # a tile larger than the image: padded
    assert edge_image.shape[:2] == (64, 64) and (edge_mask == 255).any()
    focus = class_focus([990_000, 10_000, 0])
    assert focus[1] / focus[0] == pytest.approx(np.sqrt(99)) and focus[2] == 0
    objects = np.zeros((2000, 2000), np.uint8)
    for y in range(0, 2000, 100):
        for x in range(0, 2000, 100):
            objects[y : y + 30, x : x + 30] = 1  # 900 px objects: a 3% tile is ~173 px -> 160
    assert auto_tiling([objects]) == Tiling(160, 0.25, 1.0)
    assert auto_tiling([objects[:250, :250]]) is None  # smaller than two tiles: train on whole images


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> dict:
    """A tiled model (64 px tiles) trained on 160 px scenes, and its FP32 IR."""
    root = tmp_path_factory.mktemp("tiled")
    raw = synthesize(root / "raw", "target", num_images=12, size=160, seed=5)
    run_import(raw, root / "ds", val_fraction=0.25)
    summary = run_train(
        TrainConfig(data=str(root / "ds"), out=str(root / "model"), tile=64, batch_size=4, epochs=2, iters_per_epoch=3)
    )
    report = run_export(ExportConfig(model=str(root / "model"), out=str(root / "ir"), calibration=str(root / "ds")))
    return {"root": root, "raw": raw, "summary": summary, "report": report}


@pytest.mark.xdist_group("tiled")  # one worker trains the module's tiled model once
def test_tiled_model_carries_its_tiling_through_evaluate_export_and_predict(tiled):
    root = tiled["root"]
    setting = {"size": 64, "overlap": 0.25, "scale": 1.0}
    config = json.loads((root / "model" / "config.json").read_text())
    assert config["tiling"] == setting and config["input_size"] == 64
    assert tiled["summary"].tiling == setting and tiled["summary"].record["tiling_chosen_by"] == "--tile"
    ir_model, ir_config = model_artifact.load(root / "ir")
    assert ir_config["tiling"] == setting and ir_model.static and ir_model.size == (64, 64)  # from rt_info
    metrics = run_evaluate(EvalConfig(model=str(root / "model"), data=str(root / "ds"), out=str(root / "eval")))
    assert metrics.images == 3 and metrics.record["pixels"] == 3 * 160 * 160  # scored at full resolution
    assert (root / "eval" / "predictions.png").exists()
    outputs = {}
    for name in ("model", "ir"):
        summary = run_predict(
            PredictConfig(model=str(root / name), input=str(tiled["raw"] / "images"), out=str(root / f"p_{name}"))
        )
        assert summary.record["tiling"] == setting and summary.predicted == 12
        outputs[name] = np.asarray(Image.open(root / f"p_{name}" / "masks" / "target_00000.png"))
    assert outputs["model"].shape == (160, 160)
    assert (outputs["model"] == outputs["ir"]).mean() > 0.999  # IR parity through the same tiling


@pytest.mark.xdist_group("tiled")
def test_pyfunc_predicts_as_segflow_predict_does(tiled):
    from segflow.export.pyfunc import SegmentationModel

    root = tiled["root"]
    pyfunc = SegmentationModel()
    pyfunc.load_context(types.SimpleNamespace(artifacts={"ir_dir": str(root / "ir")}))
    path = tiled["raw"] / "images" / "target_00001.png"
    (mask,) = pyfunc.predict(None, [str(path)])
    run_predict(PredictConfig(model=str(root / "ir"), input=str(path), out=str(root / "p_one")))
    assert np.array_equal(mask, np.asarray(Image.open(root / "p_one" / "masks" / "target_00001.png")))


def test_untiled_models_record_no_tiling(tiny):
    assert "tiling" not in json.loads((tiny["model"] / "config.json").read_text())
    assert tiny["summary"].tiling is None and tiny["summary"].record["tiling_chosen_by"] == "off"


@pytest.mark.xdist_group("tiled")
def test_bad_tiling_settings_and_oversized_images_are_refused_by_name(tiled, tmp_path):
    root = tiled["root"]
    for args, message in (
        (["--tile", "100"], "multiple of 32"),
        (["--tile", "big"], "--tile must be"),
        (["--tile", "64", "--tile-overlap", "0.9"], "--tile-overlap"),
        (["--tile", "64", "--method", "supcon"], "supervised only"),
    ):
        code, _, err = run_cli("train", "--data", str(root / "ds"), "--out", str(tmp_path / "m"), *args)
        assert code == 2 and message in err, err
        assert not (tmp_path / "m").exists()
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    for name in ("model.safetensors", "config.json"):
        (crafted / name).write_bytes((root / "model" / name).read_bytes())
    config = json.loads((crafted / "config.json").read_text())
    (crafted / "config.json").write_text(json.dumps({**config, "tiling": {"size": 1, "overlap": 0.25, "scale": 1}}))
    with pytest.raises(SegflowError, match="tile size"):
        model_artifact.read_config(crafted)
    path = tiled["raw"] / "images" / "target_00002.png"
    with pytest.raises(SegflowError, match="--max-image-pixels 25600"):
        run_predict(
            PredictConfig(model=str(root / "model"), input=str(path), out=str(tmp_path / "p"), max_image_pixels=1000)
        )
    code, out, _ = run_cli(
        "predict", "--model", str(root / "model"), "--input", str(path), "--out", str(tmp_path / "p2"),
        "--max-image-pixels", "25600",
    )  # fmt: skip
    assert code == 0 and "1 images predicted" in out


@pytest.mark.xdist_group("tiled")
def test_training_set_is_tiles_of_the_full_images(tiled):
    root = tiled["root"]
    norm = Normalization([128.0] * 3, [64.0] * 3)
    dataset = SegmentationDataset(root / "ds", "train", 64, norm, train=True, tile_scale=1.0)
    item = dataset[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (64, 64)
    assert dataset.focus is not None and dataset.focus.shape[0] == 7


@pytest.mark.xdist_group("tiled")
def test_predict_reads_images_from_s3_one_at_a_time(tiled, s3, tmp_path):
    """Images under an S3 prefix are predicted like the same local folder: same masks, same names."""
    from segflow.storage import s3 as s3_lib

    root = tiled["root"]
    images = sorted((tiled["raw"] / "images").glob("*.png"))[:3]
    for path in images:
        s3_lib.put_file(path, f"s3://{s3}/incoming/day1/{path.name}")
    summary = run_predict(
        PredictConfig(model=str(root / "model"), input=f"s3://{s3}/incoming", out=str(tmp_path / "p"))
    )
    assert summary.predicted == 3
    for path in images:
        run_predict(PredictConfig(model=str(root / "model"), input=str(path), out=str(tmp_path / path.stem)))
        remote = np.asarray(Image.open(tmp_path / "p" / "masks" / "day1" / path.name))
        local = np.asarray(Image.open(tmp_path / path.stem / "masks" / path.name))
        assert np.array_equal(remote, local)
    with pytest.raises(SegflowError, match="does not exist"):
        run_predict(PredictConfig(model=str(root / "model"), input=f"s3://{s3}/nothing", out=str(tmp_path / "q")))
