"""Device choice and tile sizing of `tvr eval` / `tvr index build`: a GPU when there is one, tiles
sized to its free memory; on CPU the requested tile is used unchanged."""

from __future__ import annotations

from types import SimpleNamespace

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
