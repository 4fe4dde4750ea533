"""The trainer-facing data API: manifests, tokens, caption picking, and the Ray Data pipelines over
a local directory and over the local S3 server (columns, dtypes, shapes, values, bad input)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tvr.data.frames import decode_frames, normalize
from tvr_platform.config import load_job
from tvr_platform.data.pipeline import (
    backbone_preprocess,
    load_manifest,
    model_frames,
    pick_captions,
    read_quarantine,
    synth_dataset,
    tokenize_captions,
    train_dataset,
    video_dataset,
    write_quarantine,
)
from tvr_platform.storage import StorageError, open_storage

T = 4


def _job(tmp_path, *extra):
    return load_job(None, [f"run.work_dir={tmp_path}", "run.name=t", "data.synth.num_clips=8",
                           "data.synth.seconds=1.0", "data.synth.size=48", f"data.num_frames={T}",
                           "data.decode_concurrency=1", *extra])


def test_backbone_preprocess_matches_the_built_backbone():
    from tvr.backbone import BackboneCfg, ClipBackbone

    size, mean, std = backbone_preprocess("tvr-tiny")
    bb = ClipBackbone(BackboneCfg(name="tvr-tiny"))
    assert size == bb.image_size == 32
    assert (mean, std) == tuple(tuple(x) for x in bb.image_mean_std)
    assert backbone_preprocess("ViT-B-32")[0] == 224 and backbone_preprocess("ViT-L-14-336")[0] == 336
    with pytest.raises(ValueError, match="not an open_clip model"):
        backbone_preprocess("no-such-model")


def _splitmix_ref(seed, epoch, v, k):
    m = (1 << 64) - 1
    x = (v * 0x9E3779B97F4A7C15 + ((seed * 1_000_003 + epoch) & m)) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return (x ^ (x >> 31)) % max(k, 1)


def test_pick_captions_is_deterministic_per_clip_and_epoch():
    g = torch.Generator().manual_seed(0)
    B, K, L = 64, 5, 7
    texts = torch.randint(1, 100, (B, K, L), generator=g)
    num = torch.randint(1, K + 1, (B,), generator=g)
    vid = torch.randperm(1000, generator=g)[:B]
    out = pick_captions(texts, num, vid, epoch=3, seed=11)                # (B, L)
    assert out.shape == (B, L)
    for b in range(B):
        k = _splitmix_ref(11, 3, int(vid[b]), int(num[b]))
        assert k < int(num[b]) and torch.equal(out[b], texts[b, k])
    perm = torch.randperm(B, generator=g)                                 # batch order does not matter
    assert torch.equal(pick_captions(texts[perm], num[perm], vid[perm], 3, 11), out[perm])
    other = pick_captions(texts, num, vid, epoch=4, seed=11)
    assert not torch.equal(other, out)


def test_manifest_tokens_and_synth_on_a_local_dir(tmp_path):
    job = _job(tmp_path)
    res = synth_dataset(job)
    assert (tmp_path / "storage" / "datasets" / "synthetic" / "videos" / "video0.mp4").exists()
    train, test = load_manifest(job, "train"), load_manifest(job, "test")
    assert train.video_ids == res.splits["train"] and test.video_ids == res.splits["test"]
    texts, cv = tokenize_captions(job, test)
    assert texts.dtype == torch.int64 and texts.shape == (test.num_captions, 32)
    assert cv.tolist() == test.caption_video
    job_first = _job(tmp_path, "data.eval_captions=first")
    t1, cv1 = tokenize_captions(job_first, test)
    assert t1.shape[0] == test.num_videos and cv1.tolist() == list(range(test.num_videos))
    from tvr.backbone import get_tokenizer

    assert torch.equal(t1[0], get_tokenizer("tvr-tiny")([test.captions[0]])[0])
    with pytest.raises(StorageError, match="does not exist"):
        load_manifest(_job(tmp_path, f"data.root={tmp_path / 'absent'}"), "train")


def _rows(ds, batch_size=3, norm=None):
    """Rows of ``ds``; the shipped uint8 frames are turned into the model's input by model_frames
    (the one normalisation every consumer uses) with ``norm``, default tvr-tiny's mean/std."""
    norm = norm or backbone_preprocess("tvr-tiny")[1:]
    rows = []
    for b in ds.iter_torch_batches(batch_size=batch_size):
        assert b["frames"].dtype == torch.uint8 and b["frames"].shape[-1] == 3       # (B, T, S, S, 3)
        b["frames"] = model_frames(b, norm, "cpu")                                    # (B, T, 3, S, S)
        n = len(b["video_index"])
        rows += [{k: v[i] for k, v in b.items()} for i in range(n)]
    return rows


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_and_eval_datasets_from_a_local_dir(tmp_path, ray_local):
    job = _job(tmp_path)
    synth_dataset(job)
    st = open_storage(job.dataset_uri)
    train = load_manifest(job, "train")
    ds = train_dataset(job, train, epoch_seed=2)
    first, second = _rows(ds), _rows(ds)
    assert set(first[0]) == {"frames", "valid", "texts", "num_texts", "video_index"}
    assert sorted(int(r["video_index"]) for r in first) == list(range(train.num_videos))
    from tvr.backbone import get_tokenizer

    tok = get_tokenizer("tvr-tiny")
    size, mean, std = backbone_preprocess("tvr-tiny")
    per = train.captions_per_video()
    for r in first:
        i = int(r["video_index"])
        assert r["frames"].dtype == torch.float32 and r["frames"].shape == (T, 3, 32, 32)
        assert r["texts"].dtype == torch.int64 and r["texts"].shape == (3, 32) and int(r["num_texts"]) == 3
        assert torch.equal(r["texts"], tok([train.captions[j] for j in per[i]]))
        # first pass: offsets drawn from default_rng([run.seed, epoch_seed, pass 0, video_index])
        data = st.read_bytes(f"videos/{train.video_files[i]}")
        ref = decode_frames(data, T, size=32, mode="random", rng=np.random.default_rng([0, 2, 0, i]))
        np.testing.assert_allclose(r["frames"].numpy(), normalize(ref.frames, mean, std), atol=1e-6)
    # a second pass: same clips, fresh offsets (pass index 1)
    f1 = {int(r["video_index"]): r["frames"] for r in first}
    f2 = {int(r["video_index"]): r["frames"] for r in second}
    assert f1.keys() == f2.keys() and any(not torch.equal(f1[k], f2[k]) for k in f1)

    test = load_manifest(job, "test")
    rows = _rows(video_dataset(job, test))
    assert set(rows[0]) == {"frames", "valid", "video_index"}
    assert sorted(int(r["video_index"]) for r in rows) == list(range(test.num_videos))
    for r in rows:
        data = st.read_bytes(f"videos/{test.video_files[int(r['video_index'])]}")
        ref = decode_frames(data, T, size=32, mode="uniform")
        np.testing.assert_allclose(r["frames"].numpy(), normalize(ref.frames, mean, std), atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_s3_pipeline_with_bad_videos_is_quarantined(tmp_path, s3_bucket, ray_local):
    endpoint, bucket = s3_bucket
    job = _job(tmp_path, f"storage.uri=s3://{bucket}/tvr", f"storage.endpoint_url={endpoint}",
               "data.num_frames=20")   # clips have 12 frames: every clip is padded
    res = synth_dataset(job)
    st = open_storage(job.dataset_uri, endpoint_url=endpoint)
    assert st.url() == f"s3://{bucket}/tvr/datasets/synthetic" and st.exists("MSRVTT_data.json")
    train, test = load_manifest(job, "train"), load_manifest(job, "test")
    bad_train = train.video_files[1]
    st.write_bytes(f"videos/{bad_train}", b"this is not an mp4")              # corrupt
    st.delete(f"videos/{test.video_files[0]}")                                 # missing
    st.write_bytes(f"videos/{train.video_files[2]}", b"")                      # zero-length

    rows = _rows(train_dataset(job, train))
    assert sorted(int(r["video_index"]) for r in rows) == [i for i in range(train.num_videos) if i not in (1, 2)]
    assert all(r["frames"].shape == (20, 3, 32, 32) for r in rows)
    # padding repeats the last frame
    r0 = rows[0]["frames"]
    assert torch.equal(r0[-1], r0[-2])
    ev = {int(r["video_index"]): r["frames"] for r in _rows(video_dataset(job, test))}
    assert sorted(ev) == list(range(test.num_videos))
    assert torch.count_nonzero(ev[0]) == 0 and torch.count_nonzero(ev[1]) > 0

    run_dir = f"s3://{bucket}/runs/t"
    n = write_quarantine(job, run_dir, train, test)
    recs = [json.loads(x) for x in open_storage(run_dir, endpoint_url=endpoint).read_text("quarantine.jsonl").splitlines()]
    assert n == len(recs) == len(read_quarantine(job, train, test))
    by = {(r["uri"].rsplit("/", 1)[-1], r["action"]) for r in recs}
    assert (bad_train, "skipped") in by and (train.video_files[2], "skipped") in by
    assert (test.video_files[0], "zero frames") in by
    assert any(r["action"].startswith("padded") for r in recs)
    missing = next(r for r in recs if r["uri"].endswith(test.video_files[0]))
    assert missing["reason"] == "missing video file" and missing["split"] == "test"
    assert missing["uri"] == st.url(f"videos/{test.video_files[0]}")
    assert res.splits["test"] == test.video_ids
