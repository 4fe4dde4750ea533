"""Storage over a local directory and over a real S3-protocol server (moto on 127.0.0.1)."""

from __future__ import annotations

import logging
import socket

import pytest

from tvr_platform.storage import (
    Storage,
    StorageError,
    StorageNotFound,
    is_transient,
    open_storage,
    retry_call,
)


def _roundtrip(st: Storage, tmp_path):
    st.check(writable=True)
    assert st.write_bytes("a/b.bin", b"\x00\x01payload").endswith("a/b.bin")
    st.write_bytes("a/c/d.txt", "héllo".encode())
    st.write_bytes("top.json", b"{}")
    assert st.read_bytes("a/b.bin") == b"\x00\x01payload"
    assert st.read_text("a/c/d.txt") == "héllo"
    assert st.exists("a/b.bin") and not st.exists("a/nope.bin")
    assert st.list() == ["a/b.bin", "a/c/d.txt", "top.json"]
    assert st.list("a") == ["a/b.bin", "a/c/d.txt"] == st.list("a/")
    assert st.list("a/c") == ["a/c/d.txt"] and st.list("zzz") == []
    with pytest.raises(StorageNotFound) as info:
        st.read_bytes("a/missing.bin")
    assert st.url("a/missing.bin") in str(info.value)
    # directories up and down
    src = tmp_path / "up"
    (src / "x").mkdir(parents=True)
    (src / "x" / "1.txt").write_text("one")
    (src / "2.txt").write_text("two")
    uris = st.upload_dir(src, "dir")
    assert len(uris) == 2 and st.list("dir") == ["dir/2.txt", "dir/x/1.txt"]
    got = st.download_file("dir/x/1.txt", tmp_path / "down" / "1.txt")
    assert got.read_text() == "one"
    child = st.child("dir")
    assert child.read_text("x/1.txt") == "one" and child.list() == ["2.txt", "x/1.txt"]
    # pyarrow view of the same objects (what Ray Data reads through)
    fs, root = st.pyarrow_filesystem()
    assert root == st.arrow_path()
    with fs.open_input_file(f"{root}/a/b.bin") as f:
        assert f.readall() == b"\x00\x01payload"
    st.delete("dir")
    assert st.list("dir") == []


def test_local_directory_roundtrip(tmp_path):
    st = open_storage(str(tmp_path / "root"))
    _roundtrip(st, tmp_path)
    assert open_storage(f"file://{tmp_path / 'root'}").read_bytes("top.json") == b"{}"


def test_s3_roundtrip_on_the_local_server(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    st = open_storage(f"s3://{bucket}/some/prefix", endpoint_url=endpoint)
    _roundtrip(st, tmp_path)
    assert st.url("a/b.bin") == f"s3://{bucket}/some/prefix/a/b.bin"
    # a second Storage from a StorageCfg-like object sees the same data; Storage pickles
    import pickle

    cfg = type("Cfg", (), {"uri": f"s3://{bucket}/some/prefix", "endpoint_url": endpoint, "region": "us-east-1"})
    again = pickle.loads(pickle.dumps(Storage.from_cfg(cfg)))
    assert again.read_bytes("top.json") == b"{}"


def test_missing_bucket_is_one_clear_error(s3_server):
    st = open_storage("s3://no-such-bucket-tvr/x", endpoint_url=s3_server)
    with pytest.raises(StorageError) as info:
        st.check()
    msg = str(info.value)
    assert "s3://no-such-bucket-tvr/x" in msg and "does not exist" in msg and "create it" in msg


def test_local_check_errors(tmp_path):
    with pytest.raises(StorageNotFound, match="does not exist"):
        open_storage(str(tmp_path / "absent")).check()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        open_storage(str(tmp_path / "file")).check()
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError, match="empty"):
        open_storage("")


def test_bad_credentials_error_names_uri_and_fix_without_secrets(s3_bucket, monkeypatch, caplog):
    from moto.core.authorization import enable_iam_authentication

    endpoint, bucket = s3_bucket
    secret, key_id = "TOPSECRETvalue123456", "AKIDTVRBADKEY0001"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG, logger="tvr_platform")
    st = open_storage(f"s3://{bucket}/p", endpoint_url=endpoint)
    with enable_iam_authentication(), pytest.raises(StorageError) as info:
        st.check()
    msg = str(info.value)
    assert f"s3://{bucket}/p" in msg and "credentials" in msg and "AWS_ACCESS_KEY_ID" in msg
    assert secret not in msg and key_id not in msg
    assert secret not in caplog.text and key_id not in caplog.text


def test_unreachable_endpoint_is_one_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    st = Storage("s3://bucket/x", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1)
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        st.check()


def test_retry_call_retries_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("Connection reset by peer")
        return "ok"

    assert retry_call(flaky, what="t", base_delay=0.001) == "ok" and len(calls) == 3
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        retry_call(missing, what="t", base_delay=0.001)
    assert len(calls) == 1
    assert is_transient(OSError("AWS Error SLOW_DOWN during GetObject operation: 503 Slow Down"))
    assert not is_transient(ValueError("bad value"))
