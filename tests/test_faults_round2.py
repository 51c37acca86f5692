"""The fault suite, second round: one test (or more) per numbered case of the reliability issue.

No input destroyed, no password printed, no NaN model published, no hang, exit 2 with one clear
message everywhere. Commands run through `segflow_kfp.cli.main` in this process, except where a
signal or a second process is the point. S3 cases run against moto's server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, listing, run_cli
from test_faults import TRAIN, assert_exit_2, upload

from segflow import storage
from segflow.errors import SegflowError
from segflow.redact import redact
from segflow.storage import s3 as s3_lib
from segflow.storage import sha256_file


def digest(folder: Path) -> str:
    """One hash of every file below ``folder`` (names and bytes): proof that an input is unchanged."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# --- 1-2. no output inside an input, no input inside an output ----------------------------------


def test_mask_folders_never_overwrite_the_images(tiny, tmp_path):
    images = Path(shutil.copytree(tiny["images"], tmp_path / "images"))
    before = digest(images)
    assert_exit_2(run_cli("pseudo-masks", images, "--out", images), "is the input IMAGES")
    assert_exit_2(run_cli("pseudo-masks", images, "--out", images / "masks"), "lies inside the input IMAGES")
    assert_exit_2(run_cli("pseudo-masks", images, "--out", tmp_path, "--overwrite"), "holds the input IMAGES")
    pretrain = ["pretrain", "--images", images, "--out", tmp_path / "w", "--epochs", "1", "--no-track"]
    assert_exit_2(run_cli(*pretrain, "--masks", images), "is the input IMAGES")
    assert digest(images) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_an_output_around_or_equal_to_its_input_is_refused(css_dataset, tiny, tmp_path):
    parent = tmp_path / "par"
    source = Path(shutil.copytree(css_dataset, parent / "src"))
    before = digest(source)
    err = assert_exit_2(run_cli("data", "import", source, parent, "--overwrite", "--no-track"))
    assert "holds the input SRC" in err
    data = Path(shutil.copytree(tiny["data"], tmp_path / "ds"))
    data_before = digest(data)
    assert_exit_2(run_cli("train", "--data", data, "--out", data, "--overwrite", *TRAIN), "is the input --data")
    model = Path(shutil.copytree(tiny["model"], tmp_path / "model"))
    assert_exit_2(
        run_cli("evaluate", "--model", model, "--data", data, "--out", model / "eval", "--no-track"),
        "lies inside the input --model",
    )
    assert_exit_2(
        run_cli("predict", "--model", model, "--input", tiny["images"], "--out", tiny["images"] / "p"),
        "lies inside the input --input",
    )
    assert digest(source) == before and digest(data) == data_before
    assert not (model / "eval").exists() and not (tiny["images"] / "p").exists()


def test_s3_outputs_are_kept_apart_from_s3_inputs(s3, tmp_path, css_dataset):
    storage.check_apart(f"s3://{s3}/a/srcx", {"SRC": f"s3://{s3}/a/src"})  # a shared name prefix is not nesting
    with pytest.raises(SegflowError, match="holds the input SRC"):
        storage.check_output(f"s3://{s3}/a", True, {"SRC": f"s3://{s3}/a/src"})
    with pytest.raises(SegflowError, match="lies inside the input"):
        storage.check_output(f"s3://{s3}/a/src/x", True, {"SRC": f"s3://{s3}/a/src/"})


def test_links_do_not_hide_an_output_inside_an_input(tiny, tmp_path):
    images = Path(shutil.copytree(tiny["images"], tmp_path / "images"))
    (tmp_path / "alias").symlink_to(images)
    assert_exit_2(run_cli("pseudo-masks", images, "--out", tmp_path / "alias" / "m"), "lies inside the input")
    assert not (images / "m").exists()


# --- 3. one writer per mask folder; one overwrite rule for files ---------------------------------


def test_a_mask_folder_has_one_writer(tiny, tmp_path):
    masks = tmp_path / "masks"
    with storage.exclusive(masks):
        assert_exit_2(run_cli("pseudo-masks", tiny["images"], "--out", masks), "another segflow process is writing")
    code, _, err = run_cli("pseudo-masks", tiny["images"], "--out", masks)
    assert code == 0, err
    assert not (tmp_path / ".masks.lock").exists()


def test_compile_and_preview_never_replace_a_file_silently(tmp_path):
    out = tmp_path / "p.yaml"
    out.write_text("mine\n")
    pipeline = REPO / "pipelines" / "supervised.py"
    assert_exit_2(run_cli("compile", pipeline, "--output", out), "already exists", "--overwrite")
    assert out.read_text() == "mine\n"
    png = tmp_path / "grid.png"
    png.write_bytes(b"mine")
    assert_exit_2(run_cli("data", "preview", png, "--size", "32"), "already exists")
    assert png.read_bytes() == b"mine"
    assert run_cli("data", "preview", png, "--size", "32", "--overwrite")[0] == 0
    assert png.read_bytes()[:4] == b"\x89PNG"

    # Two compiles of one output at once (two processes): each writes its own temporary file, or
    # the second is told another writer has it; the result is whole either way.
    command = [sys.executable, "-m", "segflow_kfp.cli", "compile", pipeline, "-o", out, "--overwrite"]
    procs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(proc.wait(timeout=120), proc.stderr.read()) for proc in procs]
    assert any(code == 0 for code, _ in results), results
    assert all(code == 0 or "another segflow process" in err for code, err in results), results
    assert "pipelineInfo" in next(yaml.safe_load_all(out.read_text()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "p.yaml"]


# --- 4. credentials never printed ----------------------------------------------------------------


def test_redact_hides_userinfo_and_secret_query_values():
    assert redact("http://user:pw@host:5000/x") == "http://***@host:5000/x"
    assert redact("postgresql://u:p@ss@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert (
        redact("https://h/a?X-Amz-Signature=abc&page=2&token=t") == "https://h/a?X-Amz-Signature=***&page=2&token=***"
    )
    assert redact("s3://bucket/a@b and key=value") == "s3://bucket/a@b and key=value"
    assert "pw" not in str(SegflowError("cannot reach http://user:pw@host"))


def test_passwords_in_uris_are_not_printed(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:Sup3rSecret@127.0.0.1:9/")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    code, out, err = run_cli("models", "compare", "m")
    assert code == 2 and "Sup3rSecret" not in out + err and "http://***@127.0.0.1:9" in err, err
    import logging

    from segflow.redact import RedactingFilter

    mlflow_handlers = logging.getLogger("mlflow").handlers  # MLflow's logger does not propagate
    assert mlflow_handlers and all(any(isinstance(f, RedactingFilter) for f in h.filters) for h in mlflow_handlers)
    code, out, err = run_cli(
        "submit", REPO / "pipelines" / "supervised.py", "--host", "http://bob:Hunter2pw@127.0.0.1:9"
    )
    assert code == 2 and "Hunter2pw" not in out + err, err


# --- 5. bounded YAML ----------------------------------------------------------------------------


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [{','.join(f'*a{i - 1}' for _ in range(9))}]")
    for where in ("image", "gpu_node_selector"):
        bomb = tmp_path / f"{where}.yaml"
        bomb.write_text("\n".join([*lines, f"{where}: *a9"]) + "\n")
        started = time.monotonic()
        err = assert_exit_2(run_cli("compile", REPO / "pipelines" / "supervised.py", "-o", tmp_path / "p.yaml",
                                    "--cluster-config", bomb), "aliases", str(bomb))  # fmt: skip
        assert time.monotonic() - started < 30, "refused at parse time, not after expanding"
    assert "not allowed" in err
    assert not (tmp_path / "p.yaml").exists()


# --- 6. finite or nothing -----------------------------------------------------------------------


def test_non_finite_settings_are_refused(tiny, tmp_path):
    images, data, model = tiny["images"], tiny["data"], tiny["model"]
    cases = [
        (["train", "--data", data, "--out", tmp_path / "m", "--lr", "inf", *TRAIN], "--lr must be a finite"),
        (["train", "--data", data, "--out", tmp_path / "m", "--lr", "nan", *TRAIN], "--lr must be a finite"),
        (["adapt", "--source", data, "--target", images, "--init", model, "--out", tmp_path / "a",
          "--method", "advent", "--adv-weight", "inf", "--no-track"], "--adv-weight must be a finite"),
        (["pseudo-masks", images, "--out", tmp_path / "pm", "--sigma", "nan"], "sigma nan"),
        (["pseudo-masks", images, "--out", tmp_path / "pm", "--scale", "inf"], "--scale must be a finite"),
        (["pretrain", "--images", images, "--out", tmp_path / "w", "--lr", "nan", "--no-track"], "--lr"),
        (["export", "--model", model, "--out", tmp_path / "ir", "--max-drop", "nan", "--no-track"], "--max-drop"),
        (["data", "import", tiny["raw"], tmp_path / "ds", "--val-fraction", "nan", "--no-track"], "--val-fraction"),
    ]  # fmt: skip
    for args, message in cases:
        assert_exit_2(run_cli(*args), message)
    assert listing(tmp_path) == []


def test_a_diverging_run_stops_and_publishes_nothing(tiny, tmp_path):
    started = time.monotonic()
    err = assert_exit_2(
        run_cli("train", "--data", tiny["data"], "--out", tmp_path / "m", "--lr", "1e30", *TRAIN), "diverged at step"
    )
    assert "lower the learning rate" in err.lower() and time.monotonic() - started < 60
    assert listing(tmp_path) == []  # no model, no checkpoint folder, no lock


def test_an_all_ignore_dataset_does_not_train_to_nan(tiny, tmp_path):
    from PIL import Image

    data = Path(shutil.copytree(tiny["data"], tmp_path / "ds"))
    manifest = json.loads((data / "manifest.json").read_text())
    for mask in (data / "train" / "masks").iterdir():
        Image.new("L", Image.open(mask).size, 255).save(mask)
        manifest["files"][str(mask.relative_to(data))] = sha256_file(mask)
    (data / "manifest.json").write_text(json.dumps(manifest))
    err = assert_exit_2(run_cli("train", "--data", data, "--out", tmp_path / "m", *TRAIN), "diverged", "ignored")
    assert "nan" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_publishing_refuses_non_finite_weights(tmp_path):
    import torch

    from segflow.models import artifact

    with pytest.raises(SegflowError, match="non-finite"):
        artifact.save_weights(tmp_path / "w.safetensors", {"w": torch.tensor([1.0, float("inf")])}, "x")
    assert not (tmp_path / "w.safetensors").exists()


# --- 7. no hangs: FIFOs, and a terminated command cleans up --------------------------------------


def test_a_fifo_in_an_image_folder_is_skipped(tiny, tmp_path, caplog):
    images = Path(shutil.copytree(tiny["images"], tmp_path / "images"))
    os.mkfifo(images / "pipe.png")
    code, out, err = run_cli("pseudo-masks", images, "--out", tmp_path / "masks")
    assert code == 0 and f"{len(list(tiny['images'].iterdir()))} images" in out, err
    code, out, err = run_cli("predict", "--model", tiny["model"], "--input", images, "--out", tmp_path / "p")
    assert code == 0, err
    assert "pipe.png" in caplog.text and "not a regular file" in caplog.text
    assert_exit_2(
        run_cli("predict", "--model", tiny["model"], "--input", images / "pipe.png", "--out", tmp_path / "q"),
        "not a regular file",
    )


def test_a_terminated_predict_leaves_no_staging_or_lock(tiny, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        for src in sorted(tiny["images"].iterdir()):
            shutil.copy(src, images / f"{i}-{src.name}")
    out = tmp_path / "p"
    proc = subprocess.Popen(
        [sys.executable, "-m", "segflow.cli", "predict", "--model", tiny["model"], "--input", images, "--out", out],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".p.staging-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("predict finished before the signal arrived")
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


# --- 8-9. integrity does not depend on a deletable file; one model-config check -------------------


def test_an_ir_without_its_config_is_refused(tiny, tiny_ir, tmp_path):
    ir = Path(shutil.copytree(tiny_ir["ir"], tmp_path / "ir"))
    data = bytearray((ir / "model.bin").read_bytes())
    data[100:140] = bytes(40)
    (ir / "model.bin").write_bytes(bytes(data))
    (ir / "config.json").unlink()
    assert_exit_2(
        run_cli("predict", "--model", ir, "--input", tiny["images"], "--out", tmp_path / "p"), "no config.json"
    )
    assert not (tmp_path / "p").exists()


def test_listed_file_names_stay_inside_the_model(tiny, tmp_path):
    model = Path(shutil.copytree(tiny["model"], tmp_path / "m"))
    config = json.loads((model / "config.json").read_text())
    config["files"]["../../../../etc/hostname"] = "0" * 64
    (model / "config.json").write_text(json.dumps(config))
    assert_exit_2(run_cli("predict", "--model", model, "--input", tiny["images"], "--out", tmp_path / "p"), "outside")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": ["a", "b"]}, "num_classes"),
        ({"labels": "skyroad"}, "labels must be a list"),
        ({"input_size": -32}, "input_size"),
        ({"input_size": "64"}, "input_size"),
        ({"input_size": 1 << 20}, "input_size"),
        ({"normalization": None}, "normalization"),
        ({"normalization": "imagenet"}, "normalization"),
    ],
)
def test_crafted_model_configs_are_refused_by_every_reader(tiny, tmp_path, change, message):
    model = Path(shutil.copytree(tiny["model"], tmp_path / "m"))
    config = json.loads((model / "config.json").read_text()) | change
    (model / "config.json").write_text(json.dumps(config))
    for command in (
        ["predict", "--model", model, "--input", tiny["images"], "--out", tmp_path / "p"],
        ["evaluate", "--model", model, "--data", tiny["data"], "--out", tmp_path / "e", "--no-track"],
        ["export", "--model", model, "--out", tmp_path / "ir", "--no-track"],
        ["ensemble", "--models", model, tiny["model"], "--out", tmp_path / "ens", "--no-track"],
    ):
        assert_exit_2(run_cli(*command), message, "config.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# --- 10. a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 600 KB tmpfs (root can mount one; elsewhere the test is skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_clear_error(tiny, small_disk):
    err = assert_exit_2(run_cli("train", "--data", tiny["data"], "--out", small_disk / "a" / "m", *TRAIN))
    assert f"no space left on {small_disk} while writing" in err
    (small_disk / "filler").write_bytes(b"\0" * 500_000)
    err = assert_exit_2(run_cli("data", "import", tiny["raw"], small_disk / "ds", "--no-track"))
    assert "no space left on" in err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no model, checkpoints or parents left


def test_no_space_is_recognised_in_library_errors():
    assert storage.no_space(OSError(28, "No space left on device"))
    assert storage.no_space(RuntimeError("I/O error: No space left on device (os error 28)"))
    assert not storage.no_space(OSError(13, "Permission denied"))


# --- 11. more exit 2 where there were tracebacks -------------------------------------------------


def test_settings_and_files_that_raised_tracebacks(tiny, tmp_path):
    data, images = tiny["data"], tiny["images"]
    for seed in ("-5", "99999999999999999999999"):
        assert_exit_2(run_cli("train", "--data", data, "--out", tmp_path / "m", "--seed", seed, *TRAIN), "--seed")
    assert_exit_2(run_cli("pseudo-masks", images, "--out", tmp_path / "pm", "--workers", "-3"), "--workers")
    assert not (tmp_path / "pm").exists()
    assert_exit_2(run_cli("params", REPO / "README.md"), "not a pipeline file")
    empty = tmp_path / "empty.pth"
    empty.touch()
    assert_exit_2(run_cli("models", "convert", empty, "--out", tmp_path / "c", "--labels", "a,b"), "empty")
    deep = "[" * 100_000
    for name in ("manifest.json", "dataset_meta.json"):
        copy = Path(shutil.copytree(data, tmp_path / f"ds-{name}"))
        (copy / name).write_text(deep)
        command = ["train", "--data", copy, "--out", tmp_path / "m"] if name == "manifest.json" else []
        if command:
            assert_exit_2(run_cli(*command, *TRAIN), "nested too deeply")
    meta_only = tmp_path / "raw"
    shutil.copytree(tiny["raw"], meta_only)
    (meta_only / "dataset_meta.json").write_text(deep)
    assert_exit_2(run_cli("data", "import", meta_only, tmp_path / "imp", "--no-track"), "nested too deeply")
    model = Path(shutil.copytree(tiny["model"], tmp_path / "deep-model"))
    (model / "config.json").write_text(deep)
    assert_exit_2(run_cli("predict", "--model", model, "--input", images, "--out", tmp_path / "p"), "nested too deeply")


def test_a_damaged_mask_index_is_named_and_overwrite_recovers(tiny, tmp_path):
    masks = tmp_path / "masks"
    assert run_cli("pseudo-masks", tiny["images"], "--out", masks)[0] == 0
    (masks / "index.json").write_text("{not json")
    assert_exit_2(run_cli("pseudo-masks", tiny["images"], "--out", masks), "index.json", "--overwrite")
    code, out, err = run_cli("pseudo-masks", tiny["images"], "--out", masks, "--overwrite")
    assert code == 0 and "masks made" in out, err


def test_a_truncated_best_checkpoint_on_resume_is_named(tiny, tmp_path):
    out = tmp_path / "m"
    args = ["train", "--data", tiny["data"], "--out", out, "--input-size", "64", "--batch-size", "4", "--no-track"]
    assert run_cli(*args, "--epochs", "1")[0] == 0
    best = tmp_path / "m.checkpoints" / "best.safetensors"
    best.write_bytes(best.read_bytes()[:100])
    # Nothing left to train: the run publishes the best epoch straight from the damaged file.
    assert_exit_2(run_cli(*args, "--epochs", "1", "--resume", "--overwrite"), "best.safetensors", "--overwrite")


@pytest.mark.parametrize("files", [["a"], None, "x"])
def test_a_damaged_s3_marker_is_named(s3, tmp_path, files):
    upload(s3, "art/a", b"x")
    upload(s3, f"art/{s3_lib.MARKER}", json.dumps({"files": files, "count": 1}).encode())
    with pytest.raises(SegflowError, match="is damaged"):
        s3_lib.download(f"s3://{s3}/art", tmp_path / "d")


# --- 12. cluster settings: types and ranges, named --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image: [a, b]", "image ['a', 'b'] must be a single string"),
        ("accelerator: 'nvidia.com/gpu; rm -rf'", "accelerator"),
        ("accelerator: 7", "accelerator 7 must be a single string"),
        ("gpus: true", "gpus True must be a whole number"),
        ("gpus: 1e20", "gpus '1e20' must be a whole number"),
        ("gpus: 100000000000000000000", "between 1 and 64"),
        ("gpu_node_selector: {pool: {nested: x}}", "must be strings"),
        ("gpu_node_selector: [a]", "gpu_node_selector ['a'] must be a mapping"),
        ("backoff_seconds: -5", "backoff_seconds -5 must be between"),
        ("retries: -1", "retries -1 must be between"),
    ],
)
def test_cluster_settings_are_typed_and_named(tmp_path, text, message):
    config = tmp_path / "cluster.yaml"
    config.write_text(text + "\n")
    err = assert_exit_2(
        run_cli("compile", REPO / "pipelines" / "supervised.py", "-o", tmp_path / "p.yaml", "--cluster-config", config),
        message,
    )
    assert str(config) in err
    assert not (tmp_path / "p.yaml").exists()


# --- 13. locks of dead writers; the lock is checked before any work ------------------------------


def test_a_dead_writers_s3_lock_on_this_host_is_taken_over_at_once(s3, tmp_path):
    import socket

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f.txt").write_text("x")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = {"owner": f"{socket.gethostname()}:{dead.stdout.strip()}:abc", "created": time.time()}
    upload(s3, ".out.lock", json.dumps(lock).encode())
    s3_lib.publish_dir(tmp_path / "src", f"s3://{s3}/out")  # no 600 s wait
    assert s3_lib.list_keys(s3, "") == ["out/_SEGFLOW_COMPLETE.json", "out/f.txt"]


def test_a_live_s3_lock_refuses_before_any_work(s3, tiny, tmp_path):
    lock = {"owner": "other-host:1:abc", "created": time.time()}
    upload(s3, "models/.m.lock", json.dumps(lock).encode())
    started = time.monotonic()
    err = assert_exit_2(run_cli("train", "--data", tiny["data"], "--out", f"s3://{s3}/models/m", *TRAIN))
    assert "other-host:1:abc" in err and time.monotonic() - started < 20
    assert not (storage.home() / "checkpoints").exists(), "refused before training"


# --- 14-15. no empty folders left; a deleted experiment is named ----------------------------------


def test_failed_commands_leave_no_empty_folders(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny["data"], broken)
    (broken / "manifest.json").write_text("{}")
    assert_exit_2(run_cli("train", "--data", broken, "--out", tmp_path / "a" / "b" / "m", *TRAIN))
    assert_exit_2(run_cli("predict", "--model", broken, "--input", tiny["images"], "--out", tmp_path / "c" / "p"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_a_deleted_experiment_is_named(tiny, tmp_path, monkeypatch):
    from segflow import tracking

    monkeypatch.setenv("SEGFLOW_EXPERIMENT", "gone")
    tracking.ensure_experiment()
    client = tracking.client()
    experiment = client.get_experiment_by_name("gone")
    client.delete_experiment(experiment.experiment_id)
    err = assert_exit_2(run_cli("data", "import", tiny["raw"], tmp_path / "ds"), "'gone'", "was deleted", "restore")
    assert "cannot reach" not in err
    with contextlib.suppress(Exception):
        client.restore_experiment(experiment.experiment_id)
