"""Labels are ids: what the artifact's masks hold, pixel by pixel, for the mask encodings and
label maps users have. Every fixture is a few bytes made here; every test reads the written
masks themselves (values, mode, the name at each id), not only the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_import
from PIL import Image

from segflow.data import manifest as manifest_lib
from segflow.errors import SegflowError

SIZE = (6, 8)  # height, width


def dataset(root: Path, meta: dict, masks: list[np.ndarray | Image.Image], suffix: str = ".png") -> Path:
    """A Common Semantic Segmentation folder: one random image per mask."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset_meta.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for i, mask in enumerate(masks):
        image = Image.fromarray(mask) if isinstance(mask, np.ndarray) else mask
        pixels = rng.integers(0, 255, (*image.size[::-1], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"m{i}.png")
        image.save(root / "masks" / f"m{i}{suffix}")
    return root


def written(out: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(labels, {item name: mask array}) of an imported artifact; every mask is single-channel."""
    manifest = manifest_lib.read(out)
    masks = {}
    for rel in manifest["files"]:
        if "/masks/" in rel:
            with Image.open(out / rel) as img:
                assert img.mode == "L", (rel, img.mode)
                masks[Path(rel).stem] = np.asarray(img)
    return manifest["labels"], masks


def halves(left: int, right: int, dtype=np.uint8) -> np.ndarray:
    mask = np.full(SIZE, left, dtype=dtype)
    mask[:, SIZE[1] // 2 :] = right
    return mask


def test_colour_masks_become_label_ids(tmp_path):
    colours = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
    rgb = np.zeros((*SIZE, 3), np.uint8)
    rgb[:, 4:] = colours[2]
    rgb[0, 0] = colours[1]
    meta = {"label_map": {"0": "bg", "1": "cat", "2": "dog"}, "segmentation_colors": colours}
    run_import(dataset(tmp_path / "d", meta, [rgb, rgb]), tmp_path / "out")
    labels, masks = written(tmp_path / "out")
    assert labels == ["bg", "cat", "dog"]
    for mask in masks.values():
        assert mask[0, 0] == 1 and mask[1, 0] == 0 and (mask[:, 4:] == 2).all()


def test_label_map_is_read_by_id_in_any_key_order(tmp_path):
    meta = {"label_map": {"1": "building", "0": "sky"}}
    run_import(dataset(tmp_path / "d", meta, [halves(0, 1), halves(1, 0)]), tmp_path / "out")
    labels, masks = written(tmp_path / "out")
    assert labels == ["sky", "building"]  # training id 0 is the dataset's id 0: sky
    assert {tuple(m[0, [0, -1]]) for m in masks.values()} == {(0, 1), (1, 0)}


def test_ids_with_gaps_become_contiguous_and_map_back(tmp_path):
    meta = {"label_map": {str(i): f"c{i}" for i in [0, 1, 2, 3, 4, 5, 9]}}
    run_import(dataset(tmp_path / "d", meta, [halves(0, 9), halves(5, 9)]), tmp_path / "out")
    labels, masks = written(tmp_path / "out")
    assert labels == ["c0", "c1", "c2", "c3", "c4", "c5", "c9"]
    assert sorted(np.unique(np.concatenate([m.ravel() for m in masks.values()])).tolist()) == [0, 5, 6]
    assert manifest_lib.read(tmp_path / "out")["label_ids"]["dataset_ids"] == [0, 1, 2, 3, 4, 5, 9]
    undeclared = dataset(tmp_path / "e", meta, [halves(0, 6)])
    with pytest.raises(SegflowError, match=r"masks/m0.png: mask values \[6\] are not in the label map"):
        run_import(undeclared, tmp_path / "out2")


def test_255_and_named_ignore_labels_are_not_classes(tmp_path):
    meta = {"label_map": {"0": "road", "1": "car", "2": "void", "255": "ignore"}}
    src = dataset(tmp_path / "d", meta, [halves(0, 255), halves(1, 2)])
    run_import(src, tmp_path / "a")
    labels, masks = written(tmp_path / "a")
    assert labels == ["road", "car", "void"]
    assert (masks["m0"][:, 4:] == 255).all()
    run_import(src, tmp_path / "b", ignore_labels=("void",))
    labels, masks = written(tmp_path / "b")
    assert labels == ["road", "car"] and (masks["m1"][:, :4] == 1).all() and (masks["m1"][:, 4:] == 255).all()
    code, out, err = run_cli("data", "import", src, tmp_path / "c", "--ignore-labels", "void", "--no-track")
    assert code == 0 and "2 labels" in out, err
    assert run_cli("data", "import", src, tmp_path / "x", "--ignore-labels", "sky", "--no-track")[0] == 2


def test_16_bit_masks_are_read_by_value(tmp_path):
    meta = {"labels": ["a", "b", "c"]}
    ok = Image.fromarray(halves(0, 2, np.uint16))
    run_import(dataset(tmp_path / "d", meta, [ok]), tmp_path / "out")
    _, masks = written(tmp_path / "out")
    assert masks["m0"][0, 0] == 0 and masks["m0"][0, -1] == 2
    wrapped = Image.fromarray(halves(0, 258, np.uint16))  # 258 read as 2 through an 8-bit view
    with pytest.raises(SegflowError, match=r"mask values \[258\]"):
        run_import(dataset(tmp_path / "e", meta, [wrapped]), tmp_path / "out2")


def test_palette_masks_by_index_or_by_colour(tmp_path):
    indexed = Image.frombytes("P", SIZE[::-1], halves(0, 1).tobytes())
    indexed.putpalette([9, 9, 9, 200, 100, 0] + [0, 0, 0] * 254)
    run_import(dataset(tmp_path / "d", {"labels": ["x", "y"]}, [indexed]), tmp_path / "a")
    _, masks = written(tmp_path / "a")
    assert masks["m0"][0, 0] == 0 and masks["m0"][0, -1] == 1
    meta = {"label_map": {"0": "x", "1": "y"}, "segmentation_colors": [[200, 100, 0], [9, 9, 9]]}
    run_import(dataset(tmp_path / "e", meta, [indexed]), tmp_path / "b")
    _, masks = written(tmp_path / "b")
    assert masks["m0"][0, 0] == 1 and masks["m0"][0, -1] == 0  # read by colour, not by index


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ('{"label_map": {"0": "a", "0": "b"}}', r"id\(s\) \['0'\] are given more than once"),
        ('{"label_map": {"0": "a", "1": "a"}}', r"names \['a'\] are given to more than one id"),
        ('{"label_map": {"0": "a", "x": "b"}}', "must map label ids"),
    ],
)
def test_ambiguous_label_maps_are_refused(tmp_path, meta, message):
    src = dataset(tmp_path / "d", {"labels": ["a"]}, [halves(0, 0)])
    (src / "dataset_meta.json").write_text(meta)
    with pytest.raises(SegflowError, match=message):
        run_import(src, tmp_path / "out")


def test_lossy_masks_are_refused(tmp_path):
    src = dataset(tmp_path / "d", {"labels": ["a", "b"]}, [halves(0, 1)], suffix=".jpg")
    with pytest.raises(SegflowError, match=r"masks/m0\.jpg: mask is a JPG file: lossy"):
        run_import(src, tmp_path / "out")


def test_grey_masks_of_ids_are_copied_byte_for_byte(tmp_path):
    src = dataset(tmp_path / "d", {"labels": ["a", "b"]}, [halves(0, 1)])
    run_import(src, tmp_path / "out")
    manifest = manifest_lib.read(tmp_path / "out")
    rel = next(r for r in manifest["files"] if "/masks/" in r)
    assert (tmp_path / "out" / rel).read_bytes() == (src / "masks" / "m0.png").read_bytes()


# --- the layouts users have ----------------------------------------------------------------------


def segnet_camvid(root: Path) -> Path:
    """SegNet's CamVid release in miniature: X/ images beside Xannot/ masks of ids 0-10, 11 = void."""
    rng = np.random.default_rng(1)
    for subset, count in (("train", 3), ("val", 1), ("test", 2)):
        (root / subset).mkdir(parents=True)
        (root / f"{subset}annot").mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(root / subset / f"0001TP_{i}.png")
            Image.fromarray(halves(i, 11)).save(root / f"{subset}annot" / f"0001TP_{i}.png")
    (root / "train.txt").write_text("/SegNet/CamVid/train/0001TP_0.png /SegNet/CamVid/trainannot/0001TP_0.png\n")
    return root


@pytest.mark.parametrize("flags", [[], ["--format", "camvid"]])
def test_segnet_camvid_imports_in_one_command(tmp_path, flags):
    src = segnet_camvid(tmp_path / "CamVid")
    code, out, err = run_cli("data", "import", src, tmp_path / "out", *flags, "--no-track")
    assert code == 0, err
    assert "train 3, val 1, test 2 images, 11 labels" in out
    labels, masks = written(tmp_path / "out")
    assert labels[0] == "Sky" and labels[-1] == "Bicyclist" and "void" not in labels
    assert all((m[:, 4:] == 255).all() for m in masks.values())  # void is ignored
    assert masks["0001TP_2"][0, 0] == 2 and manifest_lib.read(tmp_path / "out")["source"]["format"] == "segnet_camvid"


def test_plain_paired_folders(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "ann"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(2)
    colours = [[0, 0, 0], [250, 0, 0]]
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(images / f"p{i}.jpg")
        rgb = np.zeros((*SIZE, 3), np.uint8)
        rgb[:, 4:] = colours[1]
        Image.fromarray(rgb).save(masks / f"p{i}_mask.png")
    (tmp_path / "colors.json").write_text(json.dumps(colours))
    (tmp_path / "names.txt").write_text("background\nlesion\n")
    args = ["data", "import", "--images", images, "--masks", masks, "--mask-suffix", "_mask", "--no-track"]
    code, out, err = run_cli(
        *args, "--labels", tmp_path / "names.txt", "--colors", tmp_path / "colors.json", tmp_path / "o"
    )
    assert code == 0 and "2 labels" in out, err
    labels, written_masks = written(tmp_path / "o")
    assert labels == ["background", "lesion"]
    assert all((m[:, 4:] == 1).all() and (m[:, :4] == 0).all() for m in written_masks.values())
    code, _, err = run_cli(*args, "--labels", "background,lesion", tmp_path / "o2")  # colours without --colors
    assert code == 2 and "no segmentation_colors" in err
    assert run_cli("data", "import", "--images", images, tmp_path / "o3", "--no-track")[0] == 2  # no --masks
    (images / "p9.gif").write_bytes(b"GIF89a")
    code, _, err = run_cli(
        *args, "--labels", tmp_path / "names.txt", "--colors", tmp_path / "colors.json", tmp_path / "o4"
    )
    assert code == 2 and "p9.gif: GIF images cannot be read in full" in err


def test_reader_options_pass_through(tmp_path):
    """--option KEY=VALUE: prefixes for Common Semantic Segmentation, anything else for
    Datumaro's importer, whose own reason is in the message when it refuses."""
    src = dataset(tmp_path / "d", {"labels": ["a", "b"]}, [halves(0, 1)])
    (src / "images" / "m0.png").rename(src / "images" / "image_m0.png")
    (src / "masks" / "m0.png").rename(src / "masks" / "gt_m0.png")
    code, _, err = run_cli("data", "import", src, tmp_path / "a", "--no-track")
    assert code == 2 and "image has no mask" in err
    flags = ["--option", "image_prefix=image_", "--option", "mask_prefix=gt_", "--no-track"]
    code, out, err = run_cli("data", "import", src, tmp_path / "b", *flags)
    assert code == 0 and "train 1 images" in out, err
    code, _, err = run_cli("data", "import", src, tmp_path / "c", "--option", "nonsense", "--no-track")
    assert code == 2 and "write KEY=VALUE" in err
    code, _, err = run_cli("data", "import", src, tmp_path / "c", "--option", "subset=x", "--no-track")
    assert code == 2 and "takes image_prefix and mask_prefix only" in err


def test_exif_orientation_is_applied_as_viewers_show_it(tmp_path):
    """A phone photo stored sideways with an EXIF rotation, annotated as it is shown."""
    shown = np.zeros((*SIZE, 3), np.uint8)
    shown[:, 4:] = 255  # the right half is bright, where the mask says class 1
    src = dataset(tmp_path / "d", {"labels": ["dark", "bright"]}, [halves(0, 1)])
    stored = Image.fromarray(np.rot90(shown, 1).copy())  # stored turned; EXIF 6 turns it back for viewers
    exif = Image.Exif()
    exif[0x0112] = 6
    (src / "images" / "m0.png").unlink()
    stored.save(src / "images" / "m0.jpg", exif=exif, quality=100)
    report = run_import(src, tmp_path / "out")
    assert any("EXIF orientation" in w for w in report.warnings)
    manifest = manifest_lib.read(tmp_path / "out")
    rel = next(r for r in manifest["files"] if "/images/" in r)
    image = np.asarray(Image.open(tmp_path / "out" / rel).convert("L"))
    assert image.shape == SIZE and image[:, 5:].mean() > 200 and image[:, :3].mean() < 50


def test_predict_writes_the_datasets_own_ids(tmp_path):
    """A dataset with ids 0, 1, 9: the model learns classes 0, 1, 2; `predict --ids dataset`
    writes 0, 1, 9 again (a Cityscapes user gets Cityscapes ids back)."""
    meta = {"label_map": {"0": "road", "1": "car", "9": "bike"}}
    rng = np.random.default_rng(3)
    masks = [rng.choice([0, 1, 9], size=(32, 32)).astype(np.uint8) for _ in range(6)]
    src = dataset(tmp_path / "d", meta, masks)
    run_import(src, tmp_path / "ds")
    train = ["train", "--data", tmp_path / "ds", "--out", tmp_path / "m", "--input-size", "32", "--batch-size", "2"]
    assert run_cli(*train, "--epochs", "1", "--no-track")[0] == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dataset_ids"] == [0, 1, 9]
    found = {}
    for ids in ("train", "dataset"):
        out = tmp_path / f"p-{ids}"
        code, _, err = run_cli(
            "predict", "--model", tmp_path / "m", "--input", src / "images", "--out", out, "--ids", ids
        )
        assert code == 0, err
        found[ids] = set(
            np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in (out / "masks").iterdir()]))
        )
    assert found["train"] <= {0, 1, 2} and found["dataset"] <= {0, 1, 9}
    assert len(found["train"]) == len(found["dataset"])


def test_voc_images_without_masks_are_left_out_and_said(css_dataset, tmp_path):
    """VOC annotates masks for a part of its images: those without one are left out with a
    warning instead of refusing the whole dataset."""
    import datumaro as dm

    voc = tmp_path / "voc"
    dm.Dataset.import_from(str(css_dataset), "common_semantic_segmentation").export(
        str(voc), "voc_segmentation", save_media=True
    )
    first = sorted((voc / "SegmentationClass").iterdir())[0]
    first.unlink()
    (voc / "SegmentationObject" / first.name).unlink(missing_ok=True)
    report = run_import(voc, tmp_path / "out")
    assert sum(report.counts.values()) == 11
    assert any("have no segmentation mask" in w and first.stem in w for w in report.warnings)
    # Where Datumaro itself gives up, its own reason follows its wrapper's message.
    for mask in (voc / "SegmentationClass").iterdir():
        mask.unlink()
    with pytest.raises(SegflowError, match=r"could not read the dataset as voc_segmentation: ItemImportError.* <- "):
        run_import(voc, tmp_path / "out2")


def test_synthia_text_labels_of_one_row(tmp_path):
    """SYNTHIA-RAND's GTTXT label files: Datumaro reads them with np.loadtxt, as floats, and as
    1-D for a one-row image; they import by value."""
    root = tmp_path / "synthia"
    (root / "RGB").mkdir(parents=True)
    (root / "GTTXT").mkdir()
    for i, row in enumerate(["1 1 10 10 10", "2 2 2 3 3"]):
        Image.fromarray(np.full((1, 5, 3), 40 * i, np.uint8)).save(root / "RGB" / f"00000{i}.png")
        (root / "GTTXT" / f"00000{i}.txt").write_text(row + "\n")
    report = run_import(root, tmp_path / "out", format="synthia_rand")
    labels, masks = written(tmp_path / "out")
    assert sum(report.counts.values()) == 2
    assert [labels[v] for v in masks["000000"][0]] == [labels[1]] * 2 + [labels[10]] * 3


def test_instance_datasets_are_refused_with_the_way_to_convert(tmp_path):
    import datumaro as dm
    from datumaro.components.annotation import Polygon
    from datumaro.components.media import Image as DmImage

    items = [dm.DatasetItem("a", media=DmImage.from_numpy(np.zeros((8, 8, 3), np.uint8)),
                            annotations=[Polygon([0, 0, 4, 0, 4, 4], label=0)])]  # fmt: skip
    dm.Dataset.from_iterable(items, categories=["thing"]).export(str(tmp_path / "coco"), "coco", save_media=True)
    with pytest.raises(SegflowError, match=r"looks like a 'coco\w*' dataset .* instance annotations .*datum convert"):
        run_import(tmp_path / "coco", tmp_path / "out")


def test_mvtec_defect_free_pixels_and_images_are_the_good_class(tmp_path):
    """MVTec's masks mark defects only: what they do not cover, and every image without a mask,
    is the defect-free class."""
    root = tmp_path / "bottle"
    for label in ("good", "crack"):
        (root / "test" / label).mkdir(parents=True)
        Image.fromarray(np.full((*SIZE, 3), 90, np.uint8)).save(root / "test" / label / "000.png")
    (root / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(halves(0, 255)).save(root / "ground_truth" / "crack" / "000_mask.png")
    run_import(root, tmp_path / "out", format="mvtec_segmentation")
    labels, masks = written(tmp_path / "out")
    good, crack = labels.index("good"), labels.index("crack")
    assert (masks["good__000"] == good).all()
    assert (masks["crack__000"][:, :4] == good).all() and (masks["crack__000"][:, 4:] == crack).all()


def test_lossy_masks_are_snapped_only_when_asked(tmp_path):
    colours = [[255, 0, 0], [0, 0, 255]]
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8], rgb[:, 8:] = colours
    meta = {"label_map": {"0": "red", "1": "blue"}, "segmentation_colors": colours}
    src = dataset(tmp_path / "d", meta, [rgb, rgb], suffix=".jpg")
    with pytest.raises(SegflowError, match="--lossy-masks"):
        run_import(src, tmp_path / "a")
    run_import(src, tmp_path / "b", lossy_masks=128)
    _, masks = written(tmp_path / "b")
    for mask in masks.values():
        assert set(np.unique(mask)) <= {0, 1} and (mask[:, :6] == 0).all() and (mask[:, 10:] == 1).all()
    # Grey ids: JPEG rings at the edge between 0 and 200; within 40 every value snaps back.
    grey_mask = np.zeros((16, 16), np.uint8)
    grey_mask[:, 5:] = 200  # an edge inside an 8x8 JPEG block
    grey = dataset(tmp_path / "g", {"label_map": {"0": "a", "200": "b"}}, [grey_mask], suffix=".jpg")
    with pytest.raises(SegflowError, match="are not in the label map"):
        run_import(grey, tmp_path / "c", lossy_masks=0)
    run_import(grey, tmp_path / "grey-out", lossy_masks=40)
    _, masks = written(tmp_path / "grey-out")
    assert set(np.unique(masks["m0"])) <= {0, 1}
    assert (masks["m0"][:, :3] == 0).all() and (masks["m0"][:, 8:] == 1).all()
    with pytest.raises(SegflowError, match="--lossy-masks"):
        run_import(grey, tmp_path / "e", lossy_masks=-2)


def test_subset_lists_choose_the_split(tmp_path):
    src = segnet_camvid(tmp_path / "CamVid")  # its train/ and trainannot/ as plain paired folders
    (tmp_path / "train.txt").write_text("/SegNet/CamVid/train/0001TP_0.png /SegNet/CamVid/trainannot/0001TP_0.png\n")
    (tmp_path / "val.txt").write_text("0001TP_1.png\n")
    args = ["data", "import", "--images", src / "train", "--masks", src / "trainannot", "--no-track"]
    args += ["--labels", ",".join(f"c{i}" for i in range(12)), "--ignore-labels", "11"]
    code, out, err = run_cli(*args, "--subset-list", tmp_path / "train.txt", "--subset-list", tmp_path / "val.txt",
                             tmp_path / "out")  # fmt: skip
    assert code == 0 and "train 1, val 1 images" in out, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any("0001TP_2.png" in w and "--subset-list" in w for w in report["warnings"])


def test_nested_images_pair_and_a_lone_image_is_warned_about(tmp_path):
    src = dataset(tmp_path / "d", {"labels": ["a", "b"]}, [halves(0, 1)])
    for sub in ("images", "masks"):
        (src / sub / "day").mkdir()
        (src / sub / "m0.png").rename(src / sub / "day" / "m0.png")
    report = run_import(src, tmp_path / "out")
    _, masks = written(tmp_path / "out")
    assert list(masks) == ["day__m0"] and report.counts == {"train": 1}
    assert any("no val subset" in w for w in report.warnings)
