"""Multi-caption datasets: one caption per clip per epoch in training; evaluation with the first
caption per clip (1k-A style) or all captions (v2t with several positives), against brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tvr.data.annotations import read_manifest
from tvr.metrics import ranks_from_matrix, retrieval_metrics
from tvr_platform.config import load_job
from tvr_platform.data.pipeline import pick_captions, tokenize_captions

FIX = Path(__file__).parents[1] / "fixtures" / "annotations"


def test_training_draws_one_caption_per_clip_per_epoch_and_covers_all_of_them():
    K, L = 4, 5
    num = torch.tensor([1, 2, 3, 4, 4, 2])                                  # captions per clip
    texts = torch.zeros(len(num), K, L, dtype=torch.long)
    for b, k in enumerate(num.tolist()):
        for j in range(k):
            texts[b, j] = 10 * b + j + 1                                     # caption j of clip b
    vid = torch.arange(len(num)) + 100
    seen = [set() for _ in num]
    for epoch in range(64):
        out = pick_captions(texts, num, vid, epoch=epoch, seed=7)           # (B, L)
        assert out.shape == (len(num), L)
        for b in range(len(num)):
            j = int(out[b, 0]) - 10 * b - 1
            assert 0 <= j < int(num[b]) and torch.all(out[b] == out[b, 0])  # a real caption, never padding
            seen[b].add(j)
    assert [len(s) for s in seen] == num.tolist()


def _brute_force(sims: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 ranks by sorting: t2v for every text, v2t = best rank of any positive text."""
    n_t, n_v = sims.shape
    t2v = np.array([1 + sum(sims[i, j] > sims[i, g[i]] or (sims[i, j] == sims[i, g[i]] and j < g[i])
                            for j in range(n_v)) for i in range(n_t)])
    v2t = []
    for v in range(n_v):
        order = sorted(range(n_t), key=lambda t: (-sims[t, v], t))
        v2t.append(1 + min(order.index(t) for t in range(n_t) if g[t] == v))
    return t2v, np.array(v2t)


def test_eval_first_and_all_captions_protocols(tmp_path):
    manifest = read_manifest(FIX / "charades", "charades", "train")         # 3 + 1 captions
    job_all = load_job(None, [f"run.work_dir={tmp_path}"])
    job_first = load_job(None, [f"run.work_dir={tmp_path}", "data.eval_captions=first"])
    t_all, g_all = tokenize_captions(job_all, manifest)
    t_first, g_first = tokenize_captions(job_first, manifest)
    assert g_all.tolist() == [0, 0, 0, 1] and t_all.shape[0] == 4
    assert g_first.tolist() == [0, 1] and torch.equal(t_first, t_all[[0, 3]])

    rng = np.random.default_rng(0)
    g = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4])                         # several positives per video
    sims = rng.normal(size=(len(g), 5)).round(1)                           # rounding makes ties
    ranks = ranks_from_matrix(torch.from_numpy(sims).float(), torch.from_numpy(g), v2t_rank="texts")
    ref_t2v, ref_v2t = _brute_force(sims.astype(np.float32).astype(np.float64), g)
    assert ranks.t2v.tolist() == ref_t2v.tolist() and ranks.v2t.tolist() == ref_v2t.tolist()
    m = retrieval_metrics(ranks)
    assert m["v2t_R1"] == 100 * float(np.mean(ref_v2t <= 1))
    first = np.array([np.flatnonzero(g == v)[0] for v in range(5)])          # 1 caption per video
    r1 = ranks_from_matrix(torch.from_numpy(sims[first]).float())
    assert r1.t2v.tolist() == _brute_force(sims[first].astype(np.float32).astype(np.float64), np.arange(5))[0].tolist()
