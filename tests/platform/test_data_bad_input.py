"""Every bad-input case of the data path, through the decode UDF that Ray Data runs (called
directly here: the rules are the UDF's), the quarantine report, and S3 retries on injected
transient failures (throttling, 5xx, connection reset) for both the boto3 and the pyarrow reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from media import audio_only_mp4
from tvr.data.frames import decode_frames, normalize
from tvr.data.synthetic import encode_mp4, render_frames, sample_spec
from tvr_platform.config import load_job
from tvr_platform.data.decode import DecodeClips
from tvr_platform.data.pipeline import load_manifest, model_frames, quarantine_uri, write_quarantine
from tvr_platform.storage import StorageError, open_storage

T, S = 6, 16


def _good(num_frames=24, seed=0) -> bytes:
    spec = sample_spec(np.random.default_rng(seed), "v", num_frames=num_frames, size=32, fps=12)
    return encode_mp4(render_frames(spec), 12, keyint=6)


def _undecodable() -> bytes:
    """A well-formed MP4 container whose H.264 payload is all zeros: demuxes, never decodes."""
    data = bytearray(_good())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4:at], "big")
    data[at + 4:at - 4 + size] = bytes(size - 8)
    return bytes(data)


BAD = {
    "corrupt.mp4": lambda: bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)),
    "truncated.mp4": lambda: _good()[:300],
    "empty.mp4": lambda: b"",
    "audio.mp4": audio_only_mp4,
    "undecodable.mp4": _undecodable,
}


@pytest.fixture
def videos(tmp_path):
    st = open_storage(str(tmp_path / "videos")).check(writable=True)
    st.write_bytes("good.mp4", _good())
    st.write_bytes("short.mp4", _good(num_frames=4, seed=3))               # 4 frames < T
    for name, make in BAD.items():
        st.write_bytes(name, make())
    return st


def _batch(files):
    n = len(files)
    return {"file": np.array(files, dtype=object), "video_index": np.arange(n, dtype=np.int64),
            "epoch_seed": np.zeros(n, np.int64), "seg_start": np.full(n, np.nan), "seg_end": np.full(n, np.nan)}


FILES = ["good.mp4", "short.mp4", *BAD, "missing.mp4"]


def _udf(videos, quarantine, *, train, raw=False):
    return DecodeClips(videos=videos, num_frames=T, size=S, train=train, seed=0,
                       split="train" if train else "test", quarantine=quarantine, raw=raw)


def _records(q):
    return [json.loads(line) for rel in q.list() for line in q.read_text(rel).splitlines()]


@pytest.mark.parametrize("train", [True, False])
def test_each_bad_video_is_skipped_or_zeroed_counted_and_quarantined(tmp_path, videos, train):
    q = open_storage(str(tmp_path / "q"))
    out = _udf(videos, q, train=train)(_batch(FILES))
    kept = out["video_index"].tolist()
    if train:                                   # training skips what cannot be decoded
        assert kept == [0, 1]
    else:                                       # evaluation keeps every row, zero frames for the bad ones
        assert kept == list(range(len(FILES)))
        assert all(np.count_nonzero(out["frames"][i]) == 0 for i in range(2, len(FILES)))
    # uint8 rows travel; the model's input (normalised on its device) is zeros for the bad ones
    assert out["frames"].shape == (len(kept), T, S, S, 3) and out["frames"].dtype == np.uint8
    assert out["valid"].tolist() == [True, True] + [False] * (len(kept) - 2)
    x = model_frames(out, ((0.5,) * 3, (0.25,) * 3), "cpu").numpy()             # (B, T, 3, S, S)
    # the good clip is exactly the reference decode; the short one is padded with its last frame
    ref = decode_frames(videos.read_bytes("good.mp4"), T, size=S, mode="uniform")
    if not train:
        np.testing.assert_allclose(x[0], normalize(ref.frames, (0.5,) * 3, (0.25,) * 3), atol=1e-6)
        assert all(np.count_nonzero(x[i]) == 0 for i in range(2, len(FILES)))
    short = out["frames"][1]
    assert all(np.array_equal(short[k], short[3]) for k in range(4, T)) and not np.array_equal(short[0], short[3])

    recs = _records(q)
    by = {r["uri"].rsplit("/", 1)[-1]: r for r in recs}
    assert set(by) == {"short.mp4", *BAD, "missing.mp4"}                    # every case counted once
    bad_action = "skipped" if train else "zero frames"
    for name in [*BAD, "missing.mp4"]:
        assert by[name]["action"] == bad_action and by[name]["uri"] == videos.url(name)
    assert by["short.mp4"]["action"] == "padded with the last frame"
    assert "4 frame(s) < data.num_frames=6" in by["short.mp4"]["reason"]
    assert by["missing.mp4"]["reason"] == "missing video file"
    assert "empty file" in by["empty.mp4"]["reason"]
    assert "no video stream" in by["audio.mp4"]["reason"] and "audio" in by["audio.mp4"]["reason"]
    assert "DecodeError" in by["corrupt.mp4"]["reason"] and "DecodeError" in by["truncated.mp4"]["reason"]
    assert "DecodeError" in by["undecodable.mp4"]["reason"]


def test_raw_mode_keeps_every_row_with_a_valid_flag(tmp_path, videos):
    out = _udf(videos, None, train=False, raw=True)(_batch(FILES))
    assert out["frames"].shape == (len(FILES), T, S, S, 3) and out["frames"].dtype == np.uint8
    assert out["valid"].tolist() == [True, True] + [False] * (len(FILES) - 2)
    ref = decode_frames(videos.read_bytes("good.mp4"), T, size=S, mode="uniform")
    assert np.array_equal(out["frames"][0], ref.frames)


def test_quarantine_report_merges_caption_and_video_records(tmp_path, videos):
    from tvr.data.synthetic import synthesize

    job = load_job(None, [f"run.work_dir={tmp_path}", "run.name=q", f"data.num_frames={T}"])
    root = open_storage(job.dataset_uri).check(writable=True)
    synthesize(root, num_clips=4, seconds=0.5, size=32)
    data = json.loads(root.read_text("MSRVTT_data.json"))
    train_ids = load_manifest(job, "train").video_ids
    for s in data["sentences"]:                        # an empty and a non-UTF-8 caption
        if s["video_id"] == train_ids[0]:
            s["caption"] = ""
    blob = json.dumps(data).encode().replace(b'"caption": ""', b'"caption": "caf\xe9"', 1)
    root.write_bytes("MSRVTT_data.json", blob)
    manifest = load_manifest(job, "train")
    assert train_ids[0] not in manifest.video_ids                               # no usable caption left
    q = open_storage(quarantine_uri(job, "train"))
    _udf(videos, q, train=True)(_batch(FILES))
    n = write_quarantine(job, str(tmp_path / "run"), manifest)
    lines = [json.loads(x) for x in (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()]
    unique_caption_records = {(r["uri"], r["reason"]) for r in manifest.quarantine}   # 2 empty ones: 1 record
    assert n == len(lines) == len(unique_caption_records) + 7                        # + 7 video records
    reasons = {r["reason"] for r in lines if r["action"] == "dropped"}
    assert {"caption is not valid UTF-8", "empty caption", "video has no usable caption; dropped"} <= reasons


def test_missing_bucket_fails_up_front_when_the_manifest_is_loaded(tmp_path, s3_server):
    job = load_job(None, [f"run.work_dir={tmp_path}", "storage.uri=s3://no-such-bucket-tvr7/x",
                          f"storage.endpoint_url={s3_server}"])
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-tvr7' does not exist"):
        load_manifest(job, "train")


# -- retries on injected transient failures -------------------------------------------------------

def test_boto3_reads_retry_throttling_5xx_and_connection_resets(s3_bucket):
    from botocore.awsrequest import AWSResponse
    from botocore.exceptions import ConnectionClosedError

    endpoint, bucket = s3_bucket
    st = open_storage(f"s3://{bucket}/p", endpoint_url=endpoint)
    st.write_bytes("clip.mp4", b"payload")
    faults = ["slowdown", "503", "reset"]
    seen = []

    def inject(request, **_):
        seen.append(request.url)
        if not faults:
            return None                                          # let the real request through
        kind = faults.pop(0)
        if kind == "reset":
            raise ConnectionClosedError(endpoint_url=request.url)
        code, status = ("SlowDown", 503) if kind == "slowdown" else ("ServiceUnavailable", 503)
        body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()

        class Raw:
            def stream(self, **_):
                yield body

        return AWSResponse(request.url, status, {}, Raw())

    st.client.meta.events.register("before-send.s3.GetObject", inject)
    assert st.read_bytes("clip.mp4") == b"payload"
    assert len(seen) == 4 and not faults                           # three faults, then success


def test_pyarrow_reads_in_the_decode_udf_retry_transient_errors(tmp_path, videos):
    udf = _udf(videos, None, train=False)
    real_fs = udf.fs
    calls = []

    class Flaky:
        def open_input_file(self, path):
            calls.append(path)
            if len(calls) == 1:
                raise OSError("AWS Error SLOW_DOWN during GetObject operation: 503 Slow Down")
            if len(calls) == 2:
                raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, "
                              "Failure when receiving data from the peer (Connection reset by peer)")
            return real_fs.open_input_file(path)

    udf.fs = Flaky()
    out = udf(_batch(["good.mp4"]))
    assert len(calls) == 3 and np.count_nonzero(out["frames"][0]) > 0
    calls.clear()
    udf.fs = real_fs
    out = udf(_batch(["missing.mp4"]))                            # not transient: no retry, zero frames
    assert np.count_nonzero(out["frames"]) == 0
