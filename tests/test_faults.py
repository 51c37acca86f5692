"""The fault suite: hostile keys, shared outputs, killed writers, damaged files, silent endpoints.

Every case ends in exit code 2 with a message that names the file or setting, or is handled
correctly; nothing outside the output is written, and nothing already stored is lost. S3 cases
run against moto's server over HTTP on 127.0.0.1 (and the 503-answering proxy in
test_storage.py); commands run through `segflow_kfp.cli.main`, in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli, run_import, run_train
from PIL import Image

from segflow import tracking
from segflow.errors import SegflowError
from segflow.storage import confined, sha256_file, staged_output
from segflow.storage import s3 as s3_lib

TRAIN = ["--input-size", "64", "--batch-size", "4", "--epochs", "1", "--no-track"]


def upload(bucket: str, key: str, body: bytes = b"x") -> None:
    s3_lib.client().put_object(Bucket=bucket, Key=key, Body=body)


def assert_exit_2(result: tuple[int, str, str], *fragments: str) -> str:
    code, _, err = result
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err
    return err


# --- 1. confinement -----------------------------------------------------------------------------


def test_hostile_s3_key_cannot_write_outside_the_download(s3, tmp_path, tiny):
    escape = tmp_path / "escaped.txt"
    hostile = "evil/" + "../" * 12 + str(escape).lstrip("/")
    upload(s3, hostile, b"owned")
    upload(s3, "evil/fine.txt")
    with pytest.raises(SegflowError, match="points outside its folder"):
        s3_lib.download(f"s3://{s3}/evil", tmp_path / "dl", sealed=False)
    err = assert_exit_2(run_cli("train", "--data", f"s3://{s3}/evil", "--out", tmp_path / "m", *TRAIN))
    assert "completion marker" in err  # an artifact reader refuses an unsealed prefix before any download
    err = assert_exit_2(run_cli("data", "import", f"s3://{s3}/evil", tmp_path / "ds", "--no-track"))
    assert "points outside its folder" in err and "evil/../" in err
    assert not escape.exists()


def test_hostile_marker_cannot_name_files_outside(s3, tmp_path):
    marker = {"files": {"../../outside.txt": "0" * 64}, "count": 1}
    upload(s3, f"sealed/{s3_lib.MARKER}", json.dumps(marker).encode())
    with pytest.raises(SegflowError, match="points outside its folder"):
        s3_lib.download(f"s3://{s3}/sealed", tmp_path / "a" / "b")
    assert not (tmp_path / "outside.txt").exists()


def test_confined_refuses_escapes_and_links(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    assert confined(tmp_path / "root", "a/b.png") == (tmp_path / "root" / "a" / "b.png").resolve()
    for bad in ("../x", "/etc/passwd", "a/../../x", ""):
        with pytest.raises(SegflowError, match="outside"):
            confined(tmp_path / "root", bad)
    with pytest.raises(SegflowError, match="symbolic link"):
        confined(tmp_path / "root", "link/secret.txt")


def test_symlink_loop_and_link_out_of_a_dataset(css_dataset, tmp_path):
    (css_dataset / "images" / "loop").symlink_to(css_dataset / "images")
    assert_exit_2(run_cli("data", "import", css_dataset, tmp_path / "a", "--no-track"), "symbolic link loop")
    (css_dataset / "images" / "loop").unlink()
    secret = tmp_path / "secret.png"
    shutil.copy(next((css_dataset / "images").iterdir()), secret)
    (css_dataset / "images" / "leak.png").symlink_to(secret)
    assert_exit_2(run_cli("data", "import", css_dataset, tmp_path / "b", "--no-track"), "leak.png", "outside")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["css", "secret.png"]


def test_symlink_loop_in_an_image_folder(tmp_path, tiny):
    images = tmp_path / "images"
    shutil.copytree(tiny["images"], images)
    (images / "again").symlink_to(images)
    assert_exit_2(run_cli("pseudo-masks", images), "symbolic link loop")
    assert_exit_2(run_cli("predict", "--model", tiny["model"], "--input", images, "--out", tmp_path / "p"), "loop")
    assert not (tmp_path / "p").exists()


# --- 2. one overwrite rule, checked before any work -------------------------------------------------


def test_s3_outputs_are_never_silently_replaced(s3, tmp_path, tiny):
    s3_lib.publish_dir(tiny["model"], f"s3://{s3}/models/m")
    before = s3_lib.download(f"s3://{s3}/models/m", tmp_path / "before")
    weights = (before / "model.safetensors").read_bytes()
    err = assert_exit_2(run_cli("train", "--data", tiny["data"], "--out", f"s3://{s3}/models/m", *TRAIN), "--overwrite")
    assert "already holds a segflow artifact" in err
    assert not (tracking.home() / "checkpoints").exists(), "the refusal must come before any training"
    assert_exit_2(
        run_cli("pretrain", "--images", tiny["images"], "--out", f"s3://{s3}/models/m", "--epochs", "1", "--no-track"),
        "--overwrite",
    )
    after = s3_lib.download(f"s3://{s3}/models/m", tmp_path / "after")
    assert (after / "model.safetensors").read_bytes() == weights


def test_missing_bucket_is_found_before_training(s3, tmp_path, tiny):
    err = assert_exit_2(run_cli("train", "--data", tiny["data"], "--out", "s3://no-such-bucket-x/m", *TRAIN))
    assert "bucket does not exist" in err
    assert not (tracking.home() / "checkpoints").exists()


# --- 3. readers trust only sealed artifacts -------------------------------------------------------


def test_interrupted_publish_is_not_read_and_staging_is_cleaned(s3, tmp_path, tiny, monkeypatch, caplog):
    # What a publish killed midway leaves: some files in place, no marker, and its staging prefix.
    upload(s3, "data/ds/manifest.json", (tiny["data"] / "manifest.json").read_bytes())
    upload(s3, "data/.ds.staging-dead/manifest.json")
    err = assert_exit_2(run_cli("train", "--data", f"s3://{s3}/data/ds", "--out", tmp_path / "m", *TRAIN))
    assert "no completion marker" in err and "interrupted" in err
    assert_exit_2(
        run_cli("evaluate", "--model", tiny["model"], "--data", f"s3://{s3}/data/ds", "--out", tmp_path / "e")
    )
    # The next publish to that destination (with --overwrite) removes the dead staging prefix and says so.
    monkeypatch.setenv("SEGFLOW_S3_LOCK_TTL", "0")
    with pytest.raises(SegflowError, match="without a completion marker"):
        s3_lib.publish_dir(tiny["data"], f"s3://{s3}/data/ds")
    s3_lib.publish_dir(tiny["data"], f"s3://{s3}/data/ds", overwrite=True)
    assert "interrupted publish" in caplog.text
    assert [k for k in s3_lib.list_keys(s3, "data") if "staging" in k or k.endswith(".lock")] == []
    assert s3_lib.prefix_state(s3, "data/ds") == "sealed"


# --- 4. concurrent writers ----------------------------------------------------------------------


def test_two_imports_to_one_output_one_wins(css_dataset, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "segflow.cli", "data", "import", str(css_dataset), str(out), "--no-track"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another segflow process is writing" in loser or "already exists" in loser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["css", "out"], "no lock or staging left behind"


def test_a_held_local_lock_refuses_a_second_writer(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as stage:
        (stage / "a.txt").write_text("first")
        with pytest.raises(SegflowError, match="another segflow process is writing"), staged_output(out):
            pass
    assert (out / "a.txt").read_text() == "first"


def test_two_s3_writers_one_wins(s3, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.txt").write_text(name * 1000)
    outcomes: dict[str, str] = {}

    def publish(name: str) -> None:
        try:
            s3_lib.publish_dir(tmp_path / name, f"s3://{s3}/shared")
            outcomes[name] = "won"
        except SegflowError as exc:
            outcomes[name] = str(exc)

    threads = [threading.Thread(target=publish, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v == "won" for v in outcomes.values()) == [False, True], outcomes
    loser = next(v for v in outcomes.values() if v != "won")
    assert "publishing to" in loser or "already holds" in loser
    winner = next(n for n, v in outcomes.items() if v == "won")
    back = s3_lib.download(f"s3://{s3}/shared", tmp_path / "back")
    assert (back / "w.txt").read_text() == winner * 1000


def test_s3_lock_is_exclusive_and_a_stale_one_is_taken_over(s3, tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f.txt").write_text("x")
    lock = {"owner": "other-host:1:abc", "created": time.time()}
    upload(s3, ".out.lock", json.dumps(lock).encode())
    with pytest.raises(SegflowError, match="other-host:1:abc"):
        s3_lib.publish_dir(tmp_path / "src", f"s3://{s3}/out")
    monkeypatch.setenv("SEGFLOW_S3_LOCK_TTL", "0")  # the holder died long ago
    s3_lib.publish_dir(tmp_path / "src", f"s3://{s3}/out")
    assert s3_lib.list_keys(s3, "") == ["out/_SEGFLOW_COMPLETE.json", "out/f.txt"]


def test_parallel_stages_on_a_fresh_sqlite_store(segflow_home):
    code = (
        "import sys\nfrom segflow import tracking\n"
        "ctx = tracking.RunContext(run_key='job-1', run_name='r')\n"
        "with tracking.stage_run('s', {'a': 1}, ctx, label=sys.argv[1]):\n    pass\n"
    )
    env = {**os.environ, "SEGFLOW_HOME": str(segflow_home)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stderr=subprocess.PIPE) for i in range(4)]
    errors = [p.stderr.read().decode()[-800:] for p in procs if p.wait(timeout=300) != 0]
    assert errors == []
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = mlflow.search_runs(experiment_names=["segflow"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["r", "s 0", "s 1", "s 2", "s 3"]


# --- 5. damaged artifacts and unwritable outputs --------------------------------------------------


def damaged_copy(src: Path, dst: Path, name: str, how: str) -> Path:
    shutil.copytree(src, dst)
    path = dst / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else os.urandom(len(data)))
    return dst


@pytest.mark.parametrize("how", ["truncate", "random"])
def test_damaged_weights_are_named(tiny, tmp_path, how):
    model = damaged_copy(tiny["model"], tmp_path / "m", "model.safetensors", how)
    for command in (
        ["export", "--model", model, "--out", tmp_path / "ir", "--no-track"],
        ["evaluate", "--model", model, "--data", tiny["data"], "--out", tmp_path / "e", "--no-track"],
        ["predict", "--model", model, "--input", tiny["images"], "--out", tmp_path / "p"],
    ):
        assert_exit_2(run_cli(*command), "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_model_without_checksums_is_refused(tiny, tmp_path):
    """Integrity does not depend on a deletable list: a config.json without its `files` is
    refused, so a changed weight file cannot load by removing its checksum."""
    model = damaged_copy(tiny["model"], tmp_path / "m", "model.safetensors", "random")
    config = json.loads((model / "config.json").read_text())
    config.pop("files")
    (model / "config.json").write_text(json.dumps(config))
    assert_exit_2(run_cli("export", "--model", model, "--out", tmp_path / "ir", "--no-track"), "records no checksums")


def test_non_finite_weights_are_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny["model"], tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["files"]["model.safetensors"] = sha256_file(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert_exit_2(run_cli("export", "--model", tmp_path / "m", "--out", tmp_path / "ir", "--no-track"), "NaN")
    # Nor can it be an ensemble's member, or the start of an adaptation.
    err = assert_exit_2(run_cli("ensemble", "--models", tmp_path / "m", tiny["model"], "--out", tmp_path / "ens"))
    assert "NaN" in err and str(tmp_path / "m") in err and not (tmp_path / "ens").exists()
    args = ["--source", tiny["data"], "--target", tiny["images"], "--method", "minent", "--no-track"]
    err = assert_exit_2(run_cli("adapt", *args, "--init", tmp_path / "m", "--out", tmp_path / "a", "--iterations", "1"))
    assert "NaN" in err and not (tmp_path / "a").exists()


def test_truncated_ir_is_named(tiny, tiny_ir, tmp_path):
    ir = damaged_copy(tiny_ir["ir"], tmp_path / "ir2", "model.bin", "truncate")
    assert_exit_2(run_cli("predict", "--model", ir, "--input", tiny["images"], "--out", tmp_path / "p"), "model.bin")
    config = json.loads((ir / "config.json").read_text())
    config.pop("files")
    (ir / "config.json").write_text(json.dumps(config))
    assert_exit_2(run_cli("evaluate", "--model", ir, "--data", tiny["data"], "--out", tmp_path / "e"), "no checksums")


def test_damaged_mask_in_an_imported_dataset(tiny, tmp_path):
    data = tmp_path / "ds"
    shutil.copytree(tiny["data"], data)
    mask = sorted((data / "train" / "masks").iterdir())[2]
    mask.write_bytes(mask.read_bytes()[:40])
    for command in (
        ["train", "--data", data, "--out", tmp_path / "m", *TRAIN],
        ["evaluate", "--model", tiny["model"], "--data", data, "--out", tmp_path / "e", "--subset", "train"],
        ["export", "--model", tiny["model"], "--calibration", data, "--out", tmp_path / "ir", "--no-track"],
    ):
        assert_exit_2(run_cli(*command), mask.name, "manifest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_unwritable_outputs(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    for command in (
        ["train", "--data", tiny["data"], "--out", out, *TRAIN],
        ["evaluate", "--model", tiny["model"], "--data", tiny["data"], "--out", out, "--no-track"],
        ["predict", "--model", tiny["model"], "--input", tiny["images"], "--out", out],
        ["compile", REPO / "pipelines" / "supervised.py", "--output", blocker / "p.yaml"],
    ):
        assert_exit_2(run_cli(*command), str(blocker))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.skipif(os.geteuid() != 0 and not Path("/proc").exists(), reason="needs /proc")
def test_output_on_a_filesystem_that_refuses_folders(tiny, tmp_path):
    assert_exit_2(run_cli("evaluate", "--model", tiny["model"], "--data", tiny["data"], "--out", "/proc/segflow/e"))
    assert_exit_2(run_cli("compile", REPO / "pipelines" / "supervised.py", "--output", "/proc/segflow.yaml"))


# --- 6. predict never loses outputs -------------------------------------------------------------


def test_predict_refuses_inputs_that_would_share_an_output(tiny, tmp_path):
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    first = sorted(tiny["images"].iterdir())[0]
    shutil.copy(first, images / "a.png")
    Image.open(first).convert("RGB").save(images / "a.jpg")
    shutil.copy(first, images / "sub" / "a.png")
    err = assert_exit_2(run_cli("predict", "--model", tiny["model"], "--input", images, "--out", tmp_path / "p"))
    assert "a.jpg, a.png -> a.png" in err
    (images / "a.jpg").unlink()
    code, out, err = run_cli("predict", "--model", tiny["model"], "--input", images, "--out", tmp_path / "p")
    assert code == 0, err
    assert "2 images predicted" in out
    masks = sorted(str(p.relative_to(tmp_path / "p" / "masks")) for p in (tmp_path / "p" / "masks").rglob("*.png"))
    assert masks == ["a.png", "sub/a.png"]


# --- 7. --resume refuses a different run ----------------------------------------------------------


def test_resume_with_other_settings_is_refused(tiny, tmp_path):
    from segflow.storage import checkpoint_dir
    from segflow.train.config import TrainConfig

    out = tmp_path / "m"
    base = {"data": str(tiny["data"]), "out": str(out), "input_size": 64, "batch_size": 4, "epochs": 1}
    run_train(TrainConfig(**base))
    shutil.rmtree(out)  # as if it had been killed after its first epoch's checkpoint
    other = tmp_path / "other"
    shutil.copytree(tiny["data"], other)  # same content, another path: the same dataset
    same = ["--data", tiny["data"], "--out", out, "--epochs", "2", "--resume", "--no-track"]
    for settings, named in (
        (["--lr", "0.01", "--input-size", "64", "--batch-size", "4"], "lr: 0.001 -> 0.01"),
        (["--input-size", "64", "--batch-size", "2"], "batch_size: 4 -> 2"),
        (["--input-size", "96", "--batch-size", "4"], "input_size: 64 -> 96"),
    ):
        err = assert_exit_2(run_cli("train", *same, *settings), named)
        assert "--overwrite" in err
    data = synthesize_other(tmp_path)
    err = assert_exit_2(
        run_cli("train", "--data", data, "--out", out, "--input-size", "64", "--batch-size", "4", "--resume")
    )
    assert "dataset_fingerprint" in err
    summary = run_train(TrainConfig(**{**base, "data": str(other), "epochs": 2, "resume": True}))
    assert summary.epochs_run == 2 and checkpoint_dir(str(out)).exists()


def synthesize_other(tmp_path: Path) -> Path:
    from segflow.data.synth import synthesize

    raw = synthesize(tmp_path / "raw2", "target", num_images=8, size=64, seed=99)
    run_import(raw, tmp_path / "ds2")
    return tmp_path / "ds2"


# --- 8. a silent endpoint fails in bounded time ----------------------------------------------------


def test_silent_s3_endpoint_fails_with_a_clear_error(tmp_path, monkeypatch):
    """A server that accepts connections and never answers. The timeouts are shortened for the
    test; RESULTS.md measures the default (about a minute)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):  # the accept timeout: look at the stop flag again
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("SEGFLOW_S3_READ_TIMEOUT", "1")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        s3_lib.client.cache_clear()
        err = assert_exit_2(run_cli("data", "import", "s3://bucket/raw", tmp_path / "out", "--no-track"))
        assert "did not answer in time" in err and "SEGFLOW_S3_READ_TIMEOUT" in err
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
        s3_lib.client.cache_clear()
