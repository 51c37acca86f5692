"""The import stage: formats, normalised output, manifest, and every bad input's clear error."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import listing, run_import
from PIL import Image

from segflow.data import manifest as manifest_lib
from segflow.data.synth import CLASSES, synthesize
from segflow.errors import SegflowError


def expect_failure(src, out, *fragments, **kwargs) -> str:
    """The import fails with a message holding every fragment, and leaves nothing behind."""
    before = listing(out.parent)
    with pytest.raises(SegflowError) as info:
        run_import(src, out, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert listing(out.parent) == before, "a staging folder was left behind"
    return message


# --- the happy path ---------------------------------------------------------------------------


def test_import_writes_normalised_artifact(css_dataset, tmp_path):
    out = tmp_path / "out"
    report = run_import(css_dataset, out, val_fraction=0.25)
    assert report.counts == {"train": 9, "val": 3}
    assert report.labels == list(CLASSES)
    manifest = manifest_lib.read(out)
    for rel, sha in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == sha
    assert len(manifest["files"]) == 24
    for subset in ("train", "val"):
        meta = json.loads((out / subset / "dataset_meta.json").read_text())
        assert list(meta["label_map"].values()) == list(CLASSES)
    pixels = sum(np.array(s["label_pixels"]) for s in manifest["subsets"].values())
    assert pixels.sum() == 12 * 48 * 48
    assert (out / "report.md").read_text().startswith("# Dataset import report")
    assert (out / "class_distribution.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["fingerprint"] == manifest["fingerprint"]


def test_masks_keep_label_ids_and_images_keep_bytes(css_dataset, tmp_path):
    out = tmp_path / "out"
    run_import(css_dataset, out)
    name = next((out / "train" / "masks").iterdir()).name
    original = np.asarray(Image.open(css_dataset / "masks" / name))
    assert np.array_equal(np.asarray(Image.open(out / "train" / "masks" / name)), original)
    assert (out / "train" / "images" / name).read_bytes() == (css_dataset / "images" / name).read_bytes()


def test_fingerprint_and_split_depend_on_content_and_seed_only(css_dataset, tmp_path):
    a = run_import(css_dataset, tmp_path / "a")
    b = run_import(css_dataset, tmp_path / "b", workers=1)
    c = run_import(css_dataset, tmp_path / "c", seed=1)
    assert a.fingerprint == b.fingerprint
    assert manifest_lib.read(tmp_path / "a")["subsets"] == manifest_lib.read(tmp_path / "b")["subsets"]
    assert a.fingerprint != c.fingerprint  # another split is another dataset version


def test_parallel_workers_give_the_same_artifact(tmp_path):
    src = synthesize(tmp_path / "big", "target", num_images=60, size=32, seed=3)  # above the parallel threshold
    serial = run_import(src, tmp_path / "s", workers=1)
    parallel = run_import(src, tmp_path / "p", workers=2)
    assert serial.fingerprint == parallel.fingerprint
    assert serial.record["statistics"] == parallel.record["statistics"]


def test_existing_subsets_are_kept(tmp_path, _source_template):
    src = tmp_path / "split"
    for subset in ("train", "val"):
        shutil.copytree(_source_template, src / subset)
    for p in (src / "val" / "images").iterdir():  # distinct names per subset
        p.rename(p.with_name("v_" + p.name))
    for p in (src / "val" / "masks").iterdir():
        p.rename(p.with_name("v_" + p.name))
    report = run_import(src, tmp_path / "out")
    assert report.counts == {"train": 12, "val": 12}
    assert report.record["source"]["format"] == "common_semantic_segmentation_with_subset_dirs"


def test_artifact_is_itself_a_datumaro_dataset(css_dataset, tmp_path):
    import datumaro as dm

    run_import(css_dataset, tmp_path / "out")
    again = dm.Dataset.import_from(str(tmp_path / "out"), "common_semantic_segmentation_with_subset_dirs")
    assert len(again) == 12 and set(again.subsets()) == {"train", "val"}


@pytest.mark.parametrize(
    ("fmt", "meta"), [("voc_segmentation", False), ("voc_segmentation", True), ("cityscapes", False), ("camvid", False)]
)
def test_other_datumaro_formats(css_dataset, tmp_path, fmt, meta):
    """Datasets in other layouts (written here by Datumaro's exporters) are detected and imported,
    also with the dataset_meta.json that Datumaro's --save-dataset-meta adds (it does not make
    them Common Semantic Segmentation)."""
    import datumaro as dm

    exported = tmp_path / fmt
    source = dm.Dataset.import_from(str(css_dataset), "common_semantic_segmentation")
    source.export(str(exported), fmt, save_media=True, save_dataset_meta=meta)
    assert (exported / "dataset_meta.json").exists() == meta
    report = run_import(exported, tmp_path / "out")
    assert report.record["source"]["format"] == fmt
    assert sum(report.counts.values()) == 12
    for name in CLASSES:
        assert name in report.labels
    # The same pixels carry the same class names as in the original.
    total = {
        report.labels[i]: n
        for i, n in enumerate(np.sum([s["label_pixels"] for s in report.record["subsets"].values()], 0))
    }
    original = run_import(css_dataset, tmp_path / "orig")
    expected = dict(
        zip(original.labels, np.sum([s["label_pixels"] for s in original.record["subsets"].values()], 0), strict=True)
    )
    assert {k: v for k, v in total.items() if v} == {k: v for k, v in expected.items() if v}


def test_handmade_dataset_with_colour_masks_jpeg_and_grey_images(tmp_path):
    """A layout the generator never writes: RGB colour masks, JPEG and greyscale images, 255 borders."""
    root = tmp_path / "hand"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    colours = {"background": (0, 0, 0), "cat": (255, 0, 0), "dog": (0, 255, 0)}
    (root / "dataset_meta.json").write_text(
        json.dumps(
            {
                "label_map": {"0": "background", "1": "cat", "2": "dog"},
                "segmentation_colors": [list(c) for c in colours.values()],
            }
        )
    )
    rng = np.random.default_rng(0)
    for i in range(5):
        image = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
        mask = np.zeros((40, 56, 3), np.uint8)
        mask[5:20, 5:30] = colours["cat"]
        mask[22:35, 30:50] = colours["dog"]
        Image.fromarray(mask).save(root / "masks" / f"pic{i}.png")
        if i % 2:
            Image.fromarray(image).save(root / "images" / f"pic{i}.jpg", quality=90)
        else:
            Image.fromarray(image[..., 0]).save(root / "images" / f"pic{i}.png")  # greyscale
    report = run_import(root, tmp_path / "out")
    assert report.labels == ["background", "cat", "dog"]
    manifest = manifest_lib.read(tmp_path / "out")
    exts = sorted({rel.rsplit(".", 1)[1] for rel in manifest["files"] if "/images/" in rel})
    assert exts == ["jpg", "png"]
    for rel in manifest["files"]:
        if "/images/" in rel:
            assert Image.open(tmp_path / "out" / rel).mode == "RGB"
    pixels = np.sum([s["label_pixels"] for s in manifest["subsets"].values()], 0)
    assert pixels[1] == 5 * 15 * 25 and pixels[2] == 5 * 13 * 20


def test_ignore_value_255_is_allowed_and_counted(css_dataset, tmp_path):
    mask_path = next((css_dataset / "masks").iterdir())
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[:2] = 255
    Image.fromarray(mask).save(mask_path)
    run_import(css_dataset, tmp_path / "out")
    manifest = manifest_lib.read(tmp_path / "out")
    assert sum(s["ignore_pixels"] for s in manifest["subsets"].values()) == 2 * 48


# --- warnings ---------------------------------------------------------------------------------


def test_warnings_for_imbalance_absent_labels_and_duplicates(css_dataset, tmp_path):
    meta = json.loads((css_dataset / "dataset_meta.json").read_text())
    meta["label_map"]["7"] = "bicycle"  # declared, never drawn
    meta["segmentation_colors"].append([119, 11, 32])
    (css_dataset / "dataset_meta.json").write_text(json.dumps(meta))
    first = sorted((css_dataset / "images").iterdir())[0]
    shutil.copy(first, css_dataset / "images" / "copy.png")
    shutil.copy(css_dataset / "masks" / first.name, css_dataset / "masks" / "copy.png")
    report = run_import(css_dataset, tmp_path / "out", imbalance_ratio=2.0)
    text = "\n".join(report.warnings)
    assert "'bicycle' (id 7) never occurs" in text
    assert "class imbalance" in text
    assert "2 byte-identical images" in text and "copy.png" in text
    assert "bicycle" in (tmp_path / "out" / "report.md").read_text()


# --- bad input: a clear error naming the file, and nothing left behind --------------------------


def test_missing_dataset_meta(css_dataset, tmp_path):
    (css_dataset / "dataset_meta.json").unlink()
    expect_failure(css_dataset, tmp_path / "out", "dataset_meta.json is missing")


def test_invalid_dataset_meta(css_dataset, tmp_path):
    (css_dataset / "dataset_meta.json").write_text('{"label_map": {"0": "sky",')
    expect_failure(css_dataset, tmp_path / "out", "dataset_meta.json is not valid JSON")


def test_dataset_meta_with_too_few_colours(css_dataset, tmp_path):
    meta = json.loads((css_dataset / "dataset_meta.json").read_text())
    meta["segmentation_colors"] = meta["segmentation_colors"][:3]
    (css_dataset / "dataset_meta.json").write_text(json.dumps(meta))
    expect_failure(css_dataset, tmp_path / "out", "segmentation_colors", "has 3 colours")


def test_dataset_meta_without_labels(css_dataset, tmp_path):
    (css_dataset / "dataset_meta.json").write_text('{"colors": []}')
    expect_failure(css_dataset, tmp_path / "out", "names no labels")


def test_corrupt_image(css_dataset, tmp_path):
    bad = sorted((css_dataset / "images").iterdir())[3]
    bad.write_bytes(b"this is not a png" * 20)
    expect_failure(css_dataset, tmp_path / "out", bad.name, "cannot decode image", "nothing was written")


def test_truncated_image(css_dataset, tmp_path):
    bad = sorted((css_dataset / "images").iterdir())[2]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    expect_failure(css_dataset, tmp_path / "out", bad.name, "cannot decode image")


def test_zero_byte_image_and_mask(css_dataset, tmp_path):
    images = sorted((css_dataset / "images").iterdir())
    images[0].write_bytes(b"")
    (css_dataset / "masks" / images[1].name).write_bytes(b"")
    message = expect_failure(css_dataset, tmp_path / "out", "file is empty (0 bytes)")
    assert images[0].name in message and f"masks/{images[1].name}" in message


def test_mask_size_differs_from_image(css_dataset, tmp_path):
    mask_path = sorted((css_dataset / "masks").iterdir())[5]
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(mask_path)
    expect_failure(css_dataset, tmp_path / "out", mask_path.name, "mask is 48x40 but the image is 48x48")


def test_mask_values_outside_label_map(css_dataset, tmp_path):
    mask_path = sorted((css_dataset / "masks").iterdir())[1]
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[0, 0], mask[0, 1] = 9, 40
    Image.fromarray(mask).save(mask_path)
    expect_failure(css_dataset, tmp_path / "out", mask_path.name, "mask values [9, 40] are not in the label map")


def test_undeclared_mask_colour(tmp_path):
    root = tmp_path / "colour"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset_meta.json").write_text(
        json.dumps({"label_map": {"0": "bg", "1": "fg"}, "segmentation_colors": [[0, 0, 0], [255, 255, 255]]})
    )
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "a.png")
    mask = np.zeros((8, 8, 3), np.uint8)
    mask[0, 0] = (12, 34, 56)
    Image.fromarray(mask).save(root / "masks" / "a.png")
    expect_failure(root, tmp_path / "out", "masks/a.png", "(12, 34, 56)", "not in segmentation_colors")


def test_image_without_mask(css_dataset, tmp_path):
    lonely = sorted((css_dataset / "masks").iterdir())[0]
    lonely.unlink()
    expect_failure(css_dataset, tmp_path / "out", lonely.name, "image has no mask")


def test_empty_dataset(tmp_path):
    root = tmp_path / "empty"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset_meta.json").write_text('{"labels": ["a", "b"]}')
    expect_failure(root, tmp_path / "out", "the dataset is empty")


def test_path_that_is_not_a_dataset(tmp_path):
    root = tmp_path / "notes"
    root.mkdir()
    (root / "readme.txt").write_text("hello")
    expect_failure(root, tmp_path / "out", "not a dataset Datumaro recognises", "--format")


def test_dataset_of_another_kind(tmp_path):
    root = tmp_path / "table"
    root.mkdir()
    (root / "table.csv").write_text("a,b\n1,2\n")
    expect_failure(root, tmp_path / "out", "holds no segmentation masks", "--format")


def test_plain_image_folder_has_no_masks(tmp_path):
    root = synthesize(tmp_path / "plain", "source", 3, 48, 0, unlabeled=True)
    expect_failure(root, tmp_path / "out", "--format", format="image_dir")


def test_missing_path_file_path_and_unknown_format(tmp_path, css_dataset):
    expect_failure(tmp_path / "nowhere", tmp_path / "out", "does not exist")
    (tmp_path / "file.txt").write_text("x")
    expect_failure(tmp_path / "file.txt", tmp_path / "out", "is a file")
    with pytest.raises(SegflowError, match="not a Datumaro format"):
        run_import(css_dataset, tmp_path / "out", format="pascal_vocabulary")


def test_bad_settings(css_dataset, tmp_path):
    with pytest.raises(SegflowError, match="--val-fraction"):
        run_import(css_dataset, tmp_path / "out", val_fraction=1.5)
    with pytest.raises(SegflowError, match="same place"):
        run_import(css_dataset, css_dataset)


def test_existing_output_is_kept_unless_overwrite(css_dataset, tmp_path):
    out = tmp_path / "out"
    first = run_import(css_dataset, out)
    with pytest.raises(SegflowError, match="--overwrite"):
        run_import(css_dataset, out, seed=3)
    assert manifest_lib.read(out)["fingerprint"] == first.fingerprint
    # A failing overwrite keeps the old artifact whole.
    sorted((css_dataset / "images").iterdir())[0].write_bytes(b"broken")
    with pytest.raises(SegflowError):
        run_import(css_dataset, out, overwrite=True)
    assert manifest_lib.read(out)["fingerprint"] == first.fingerprint
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_replaces(css_dataset, tmp_path):
    out = tmp_path / "out"
    first = run_import(css_dataset, out)
    second = run_import(css_dataset, out, seed=7, overwrite=True)
    assert manifest_lib.read(out)["fingerprint"] == second.fingerprint != first.fingerprint


# --- the command line -------------------------------------------------------------------------


def segflow(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "segflow.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_error_is_one_clear_line_and_exit_2(css_dataset, tmp_path):
    sorted((css_dataset / "images").iterdir())[0].write_bytes(b"")
    result = segflow("data", "import", css_dataset, tmp_path / "out", "--no-track")
    assert result.returncode == 2
    assert "error:" in result.stderr and "file is empty (0 bytes)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_import_prints_where_things_are(css_dataset, tmp_path):
    result = segflow("data", "import", css_dataset, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "fingerprint" in result.stdout and "report.md" in result.stdout
