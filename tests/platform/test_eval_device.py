"""Device choice and tile sizing of `tvr eval` / `tvr index build`: a GPU when there is one, tiles
sized to its free memory; on CPU the requested tile is used unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tvr_platform.evaluation import eval_device, pair_bytes, score_block


def _feats(n: int, *shape: int):
    return {"x": torch.zeros(n, *shape)}


def test_eval_device_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_device() == torch.device("cuda", 0)
    assert eval_device(use_gpu=False) == torch.device("cpu")


def test_cpu_tiles_are_the_requested_block():
    text, video = _feats(5, 512), _feats(7, 12, 512)
    assert score_block(1024, torch.device("cpu"), text, video) == 1024
    assert score_block(7, torch.device("cpu"), text, video) == 7


def test_gpu_tiles_fit_the_free_memory():
    text, video = _feats(5, 512), _feats(7, 12, 512)          # video: T x D = 6144 per clip
    per = pair_bytes(text, video)
    assert per == 16 * 12 * 512
    cuda = torch.device("cuda", 0)
    free = 80 * 2**30
    b = score_block(1024, cuda, text, video, free_bytes=free)
    assert b % 128 == 0 and b * b * per <= 0.5 * free < (b + 128) ** 2 * per
    assert score_block(1024, cuda, text, video, free_bytes=2**20) == 128            # floor
    assert score_block(1024, cuda, _feats(1, 4), _feats(1, 4), free_bytes=2**40) == 8192   # cap


def test_index_embedding_asks_for_a_gpu_when_the_cluster_has_one(monkeypatch):
    import ray

    from tvr_platform.search.index import embed_gpus

    job = SimpleNamespace(train=SimpleNamespace(use_gpu=False))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert embed_gpus(job) == 0
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 8.0})
    assert embed_gpus(job) == 1
    job.train.use_gpu = True
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert embed_gpus(job) == 1


def _job(use_gpu=False, cpus=0.5, eval_batch=8):
    return SimpleNamespace(train=SimpleNamespace(use_gpu=use_gpu, cpus_per_worker=cpus),
                           data=SimpleNamespace(eval_batch_size=eval_batch))


def test_eval_embedding_actors_take_gpus_when_the_cluster_has_them(monkeypatch):
    import ray

    from tvr_platform.evaluation import embed_actor_options

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert embed_actor_options(_job(), 100) == {"num_gpus": 0, "num_cpus": 0.5, "concurrency": 1}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    assert embed_actor_options(_job(cpus=4), 1000) == {"num_gpus": 1, "num_cpus": 1.0, "concurrency": 8}
    assert embed_actor_options(_job(), 20)["concurrency"] == 3          # 3 batches of 8: no idle GPU actors
    assert embed_actor_options(_job(), 0)["concurrency"] == 1
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})  # GPUs asked for, none there yet
    assert embed_actor_options(_job(use_gpu=True), 100) == {"num_gpus": 1, "num_cpus": 0.5, "concurrency": 1}
    # the map_batches call of tvr eval receives exactly these options
    from tvr_platform import evaluation

    seen = {}

    class FakeDataset:
        def map_batches(self, fn, **kw):
            seen.update(kw)
            return self

        def iter_batches(self, **kw):
            return iter([{"video_index": np.array([1, 0]), "feat.x": np.ones((2, 3), np.float32)}])

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    out = evaluation.embed_videos_ray(torch.nn.Linear(1, 1), FakeDataset(), num_videos=2, batch_size=8, job=_job())
    assert out["x"].shape == (2, 3)
    assert (seen["num_gpus"], seen["concurrency"], seen["batch_size"]) == (1, 1, 8)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_data_embedding_scores_equal_the_driver_path(tmp_path, ray_local):
    """`tvr eval`'s videos embedded by Ray Data actors give the features and scores the driver
    loop gave (meanP: one vector per clip; X-Pool: per-frame features), to 1e-6 on CPU."""
    from tiny import tiny_overrides
    from tvr.backbone import ClipBackbone
    from tvr.methods import build_method
    from tvr_platform.config import load_job
    from tvr_platform.data.pipeline import frame_norm, load_manifest, video_dataset
    from tvr_platform.evaluation import embed_videos, order_by_index
    from tvr_platform.recipes import embed_split, ensure_synthetic
    from tvr_platform.report.scoring import evaluate_method
    from tvr_platform.train.step import RetrievalStep

    for name in ("meanp", "xpool"):
        job = load_job(None, tiny_overrides(tmp_path, **{"model.method": name, "data.eval_batch_size": 3}))
        ensure_synthetic(job)
        torch.manual_seed(0)
        method = build_method(name, job.method_cfg, ClipBackbone(job.model.backbone)).eval()
        manifest = load_manifest(job, job.data.test_split)
        # the previous path: the driver iterates the decoded batches and embeds them itself
        old, index = embed_videos(RetrievalStep(method, gather=lambda x: x), video_dataset(job, manifest)
                                  .iter_torch_batches(batch_size=job.data.eval_batch_size), "cpu", frame_norm(job))
        old = order_by_index(old, index, len(manifest.video_ids))
        text, new, caption_video = embed_split(job, method, job.data.test_split)
        assert new.keys() == old.keys()
        for k in old:
            assert new[k].shape == old[k].shape and new[k].dtype == old[k].dtype
            torch.testing.assert_close(new[k], old[k], atol=1e-6, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(method.similarity(text, new), method.similarity(text, old), atol=1e-6, rtol=0)
        scores = [evaluate_method(method, text, v, caption_video, block=4, dsl=False)[0] for v in (old, new)]
        assert scores[0].keys() == scores[1].keys()
        for k in scores[0]:
            assert abs(scores[0][k] - scores[1][k]) <= 1e-6, (name, k, scores)
