"""The frame cache: ``tvr data prepare`` writes sharded Parquet; batches read from it equal the
decoded ones for the evaluation sampling (exactly for uint8, closely for JPEG); the trainer's
columns are the same; ``data.frames`` selects decode / cache / auto."""

from __future__ import annotations

import json

import pytest
import torch

from tvr_platform.cli import main
from tvr_platform.config import load_job
from tvr_platform.data.cache import CacheError, cache_uri, prepare_cache, use_cache
from tvr_platform.data.pipeline import (
    backbone_preprocess,
    load_manifest,
    model_frames,
    read_quarantine,
    synth_dataset,
    train_dataset,
    video_dataset,
)
from tvr_platform.storage import open_storage

T = 4


def _job(tmp_path, *extra):
    return load_job(None, [f"run.work_dir={tmp_path}", "run.name=c", "data.synth.num_clips=8",
                           "data.synth.seconds=1.0", "data.synth.size=48", f"data.num_frames={T}",
                           "data.decode_concurrency=1", "data.cache_rows_per_file=2", *extra])


def _by_index(ds, batch_size=3):
    """Rows by video index; the shipped uint8 frames normalised as every consumer does (model_frames)."""
    out = {}
    norm = backbone_preprocess("tvr-tiny")[1:]
    for b in ds.iter_torch_batches(batch_size=batch_size):
        assert b["frames"].dtype == torch.uint8                                  # (B, T, S, S, 3) travel
        b["frames"] = model_frames(b, norm, "cpu")                               # (B, T, 3, S, S) f32
        for i, v in enumerate(b["video_index"].tolist()):
            assert v not in out
            out[v] = {k: t[i] for k, t in b.items()}
    return out


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_cache_batches_equal_decoded_batches(tmp_path, ray_local, capsys):
    job = _job(tmp_path)
    synth_dataset(job)
    train, test = load_manifest(job, "train"), load_manifest(job, "test")
    st = open_storage(job.dataset_uri)
    st.write_bytes(f"videos/{test.video_files[1]}", b"not a video")          # undecodable eval clip
    st.write_bytes(f"videos/{train.video_files[0]}", b"")                    # empty training clip

    job_c = _job(tmp_path, "data.frames=cache")
    with pytest.raises(CacheError, match="tvr data prepare"):
        video_dataset(job_c, test)
    # `tvr data prepare` (spec omitted: overrides only), uint8 frames
    assert main(["data", "prepare", *_overrides(tmp_path)]) == 0
    assert "frames (T=4, S=32)" in capsys.readouterr().out
    cst = open_storage(cache_uri(job_c, "test"))
    meta = json.loads(cst.read_text("_meta.json"))
    assert meta["num_videos"] == test.num_videos and meta["num_valid"] == test.num_videos - 1
    assert meta["format"] == "uint8" and meta["sampling"] == "uniform"
    assert len([p for p in cst.list() if p.endswith(".parquet")]) == -(-test.num_videos // 2)   # 2 rows/file

    decoded = _by_index(video_dataset(job, test))
    cached = _by_index(video_dataset(job_c, test))
    assert sorted(cached) == sorted(decoded) == list(range(test.num_videos))
    for v in decoded:
        assert set(cached[v]) == set(decoded[v]) == {"frames", "valid", "video_index"}
        assert cached[v]["frames"].dtype == torch.float32 and cached[v]["frames"].shape == (T, 3, 32, 32)
        assert torch.equal(cached[v]["frames"], decoded[v]["frames"]), v      # bit-identical batches
    assert torch.count_nonzero(cached[1]["frames"]) == 0                        # the bad clip: zero frames

    # training from the cache: the same columns as decoding, the eval-sampled frames, bad clip skipped
    tr_dec = _by_index(train_dataset(job, train))
    tr_cache = _by_index(train_dataset(job_c, train))
    assert sorted(tr_cache) == sorted(tr_dec) == list(range(1, train.num_videos))
    eval_of_train = _by_index(video_dataset(job, train))
    for v in tr_cache:
        assert set(tr_cache[v]) == set(tr_dec[v])
        assert torch.equal(tr_cache[v]["texts"], tr_dec[v]["texts"])
        assert torch.equal(tr_cache[v]["num_texts"], tr_dec[v]["num_texts"])
        assert torch.equal(tr_cache[v]["frames"], eval_of_train[v]["frames"])
    assert any(r["action"] == "zero frames" and r["uri"].endswith(test.video_files[1])
               for r in read_quarantine(job_c, test))

    # JPEG cache, auto-detected
    job_j = _job(tmp_path, "data.frames=auto", "data.cache_format=jpeg", f"data.cache_uri={tmp_path / 'jcache'}")
    assert not use_cache(job_j, "test")                                         # auto without a cache: decode
    prepare_cache(job_j, ["test"])
    assert use_cache(job_j, "test") and json.loads(
        open_storage(cache_uri(job_j, "test")).read_text("_meta.json"))["format"] == "jpeg"
    jpeg = _by_index(video_dataset(job_j, test))
    for v in decoded:
        err = (jpeg[v]["frames"] - decoded[v]["frames"]).abs()
        assert err.mean() < 0.05, (v, float(err.mean()))                         # lossy but close
    with pytest.raises(CacheError, match="no frame cache"):
        use_cache(_job(tmp_path, "data.frames=cache", "data.num_frames=5"), "test")


def _overrides(tmp_path):
    return [f"run.work_dir={tmp_path}", "run.name=c", "data.synth.num_clips=8", "data.synth.seconds=1.0",
            "data.synth.size=48", f"data.num_frames={T}", "data.decode_concurrency=1",
            "data.cache_rows_per_file=2"]


def test_use_cache_decode_mode_never_touches_storage(tmp_path):
    job = _job(tmp_path, f"data.root={tmp_path / 'absent'}")
    assert use_cache(job, "test") is False                  # data.frames=decode (the default)
