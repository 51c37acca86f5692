"""Storage against a real S3 endpoint (moto's server over HTTP on 127.0.0.1) and the local disk."""

from __future__ import annotations

import http.client
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import run_import

from segflow.data import manifest as manifest_lib
from segflow.errors import SegflowError
from segflow.storage import s3 as s3_lib
from segflow.storage import staged_output


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"alpha",
        "sub/b.bin": os.urandom(1000),
        "sub/deeper/c.json": b'{"x": 1}',
        "big.bin": os.urandom(17 * 1024 * 1024),  # three 8 MiB parts: a multipart upload
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_publish_and_download_round_trip_with_multipart(s3, tmp_path):
    files = make_tree(tmp_path / "src")
    uri = f"s3://{s3}/artifacts/one"
    s3_lib.publish_dir(tmp_path / "src", uri)
    keys = s3_lib.list_keys(s3, "artifacts/one")
    assert sorted(keys) == sorted([f"artifacts/one/{r}" for r in files] + [f"artifacts/one/{s3_lib.MARKER}"])
    assert s3_lib.list_keys(s3, "artifacts") == keys, "the staging prefix was not cleaned up"
    head = s3_lib.client().head_object(Bucket=s3, Key="artifacts/one/big.bin")
    assert "-" in head["ETag"], "big.bin should have gone up in parts"
    out = s3_lib.download(uri, tmp_path / "back")
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data
    assert not (out / s3_lib.MARKER).exists()


def test_download_detects_a_changed_object(s3, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.txt").write_text("original")
    uri = f"s3://{s3}/x"
    s3_lib.publish_dir(tmp_path / "src", uri)
    s3_lib.client().put_object(Bucket=s3, Key="x/w.txt", Body=b"tampered")
    with pytest.raises(SegflowError, match="checksum mismatch"):
        s3_lib.download(uri, tmp_path / "back")


def test_existing_prefix_is_refused_then_replaced_with_overwrite(s3, tmp_path):
    uri = f"s3://{s3}/out"
    for name, content in (("old", {"keep.txt": "1", "stale.txt": "2"}), ("new", {"keep.txt": "3"})):
        (tmp_path / name).mkdir()
        for rel, text in content.items():
            (tmp_path / name / rel).write_text(text)
    s3_lib.publish_dir(tmp_path / "old", uri)
    with pytest.raises(SegflowError, match="--overwrite"):
        s3_lib.check_free(uri, overwrite=False)
    s3_lib.publish_dir(tmp_path / "new", uri, overwrite=True)
    assert s3_lib.list_keys(s3, "out") == ["out/_SEGFLOW_COMPLETE.json", "out/keep.txt"]
    assert (s3_lib.download(uri, tmp_path / "back") / "keep.txt").read_text() == "3"


def test_plain_user_folder_without_marker_is_raw_input_only(s3, tmp_path):
    client = s3_lib.client()
    for i in range(3):
        client.put_object(Bucket=s3, Key=f"photos/img{i}.png", Body=b"x" * (i + 1))
    out = s3_lib.download(f"s3://{s3}/photos", tmp_path / "p", sealed=False)
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img1.png", "img2.png"]
    with pytest.raises(SegflowError, match="no completion marker"):
        s3_lib.download(f"s3://{s3}/photos", tmp_path / "q")


def test_clear_errors_for_missing_bucket_prefix_and_credentials(s3, tmp_path, monkeypatch):
    with pytest.raises(SegflowError, match="bucket does not exist"):
        s3_lib.check_free("s3://no-such-bucket-here/x", overwrite=False)
    with pytest.raises(SegflowError, match="does not exist"):
        s3_lib.download(f"s3://{s3}/nothing/here", tmp_path / "n")
    with pytest.raises(SegflowError, match="names no bucket"):
        s3_lib.split_uri("s3:///key")


def test_import_from_and_to_s3(s3, css_dataset, tmp_path):
    s3_lib.publish_dir(css_dataset, f"s3://{s3}/raw/css")
    report = run_import(f"s3://{s3}/raw/css", f"s3://{s3}/datasets/css")
    back = s3_lib.download(f"s3://{s3}/datasets/css", tmp_path / "back")
    manifest = manifest_lib.read(back)
    assert manifest["fingerprint"] == report.fingerprint
    local = run_import(css_dataset, tmp_path / "local")
    assert local.fingerprint == report.fingerprint, "same content, same fingerprint, wherever it lives"


def test_failed_import_to_s3_leaves_nothing(s3, css_dataset):
    sorted((css_dataset / "images").iterdir())[0].write_bytes(b"")
    with pytest.raises(SegflowError, match="0 bytes"):
        run_import(css_dataset, f"s3://{s3}/datasets/bad")
    assert s3_lib.list_keys(s3, "") == []


class _FlakyProxy(BaseHTTPRequestHandler):
    """Forwards to the S3 server, but answers every third request with 503 SlowDown."""

    upstream = ""
    count = 0
    failed = 0
    lock = threading.Lock()

    def _handle(self):
        with _FlakyProxy.lock:
            _FlakyProxy.count += 1
            fail = _FlakyProxy.count % 3 == 0
            _FlakyProxy.failed += fail
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if fail:
            payload = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        target = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        reply = conn.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for key, value in reply.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def log_message(self, *args):
        pass


def test_transient_errors_are_retried(s3, s3_endpoint, tmp_path, monkeypatch):
    """A real HTTP fault: one request in three gets 503; transfers still complete and verify."""
    _FlakyProxy.upstream = s3_endpoint
    _FlakyProxy.count = _FlakyProxy.failed = 0
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        s3_lib.client.cache_clear()
        src = tmp_path / "src"
        src.mkdir()
        for i in range(6):
            (src / f"f{i}.txt").write_text(f"file {i}")
        s3_lib.publish_dir(src, f"s3://{s3}/flaky")
        back = s3_lib.download(f"s3://{s3}/flaky", tmp_path / "back")
        assert sorted(p.read_text() for p in back.iterdir()) == [f"file {i}" for i in range(6)]
        assert _FlakyProxy.failed >= 3
    finally:
        proxy.shutdown()
        s3_lib.client.cache_clear()


def test_local_staged_output_is_all_or_nothing(tmp_path):
    out = tmp_path / "artifact"
    with pytest.raises(RuntimeError), staged_output(out) as stage:
        (stage / "half.txt").write_text("half")
        raise RuntimeError("crash mid-way")
    assert list(tmp_path.iterdir()) == []
    with staged_output(out) as stage:
        (stage / "v1.txt").write_text("1")
    with pytest.raises(SegflowError, match="--overwrite"), staged_output(out):
        pass
    with pytest.raises(RuntimeError), staged_output(out, overwrite=True) as stage:
        (stage / "v2.txt").write_text("2")
        raise RuntimeError("crash")
    assert [p.name for p in out.iterdir()] == ["v1.txt"]
    with staged_output(out, overwrite=True) as stage:
        (stage / "v2.txt").write_text("2")
    assert [p.name for p in out.iterdir()] == ["v2.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
