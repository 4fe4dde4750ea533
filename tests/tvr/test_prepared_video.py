"""``prepare_video`` (X-Pool, T-MASS): the frames' keys / values and unit frames computed once per
evaluation or index give the scores of the straightforward per-chunk computation (to 1e-6), in
the method, in ``evaluate`` (same ranks) and in the search engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.methods.tmass import TMass, TMassCfg, token_keys
from tvr.methods.xpool import XPool, XPoolCfg, pair_cosine
from tvr_platform.evaluation import VideoBlocks, evaluate
from tvr_platform.search import Searcher, VideoIndex
from tvr_platform.train.step import RetrievalStep

D = 32  # tvr-tiny width


def _method(kind: str, heads: int = 2):
    torch.manual_seed(0)
    bb = ClipBackbone(BackboneCfg(name="tvr-tiny"))
    m = (XPool(XPoolCfg(num_heads=heads, sim_chunk=3), bb) if kind == "xpool" else
         TMass(TMassCfg(num_heads=heads, sim_chunk=3, num_frames=5, num_samples=4), bb)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                                       # off the identity init
        for name, p in m.named_parameters():
            if not name.startswith("backbone."):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def _feats(m, n_t: int, n_v: int):
    g = torch.Generator().manual_seed(5)
    text = {"text": torch.randn(n_t, D, generator=g)}
    if isinstance(m, TMass):
        text["key"] = token_keys(torch.arange(1, n_t + 1)[:, None])
    return text, {"frames": torch.randn(n_v, 5, D, generator=g)}


@pytest.mark.parametrize("kind", ["xpool", "tmass"])
@torch.no_grad()
def test_prepared_tiles_score_like_the_per_chunk_computation(kind):
    m = _method(kind)
    text, video = _feats(m, 11, 13)
    plain = m.similarity(text, video)                                        # (11, 13)
    if kind == "xpool":                                                      # keys / values per chunk
        ref = torch.cat([pair_cosine(tc, m.pool(tc, video["frames"])) for tc in text["text"].split(3)])
        assert torch.allclose(plain, ref, atol=1e-6, rtol=0)
    prepared = m.prepare_video(video)
    assert {"frames_k", "frames_v"} <= set(prepared) and prepared["frames_k"].shape == (13, 5, D)
    for vs in (slice(0, 13), slice(0, 4), slice(4, 13), slice(12, 13)):     # tiles of the prepared rows
        tile = m.similarity(text, {k: v[vs] for k, v in prepared.items()})
        assert torch.allclose(tile, plain[:, vs], atol=1e-6, rtol=0)


@torch.no_grad()
def test_evaluate_prepares_each_video_block_once_and_ranks_unchanged():
    m = _method("xpool")
    text, video = _feats(m, 17, 17)
    step = RetrievalStep(m, gather=lambda x: x)
    calls = []

    def counting(mode, **kw):
        calls.append(mode)
        return step(mode, **kw)

    def unprepared(mode, **kw):
        return kw["video_feats"] if mode == "prepare_video" else step(mode, **kw)

    for dsl in (False, True):
        calls.clear()
        got, r1 = evaluate(counting, text, video, torch.arange(17), block=5, dsl=dsl)
        ref, r2 = evaluate(unprepared, text, video, torch.arange(17), block=5, dsl=dsl)
        assert calls.count("prepare_video") == 4                             # 4 video blocks, once each
        assert got == ref and torch.equal(r1.t2v, r2.t2v) and torch.equal(r1.v2t, r2.v2t)
    blocks = VideoBlocks(counting, video, "cpu", keep_bytes=0)               # nothing held: prepared again
    calls.clear()
    blocks(slice(0, 5)), blocks(slice(0, 5))
    assert calls.count("prepare_video") == 2


@pytest.mark.parametrize("kind", ["xpool", "tmass"])
@torch.no_grad()
def test_search_prepares_the_index_once_with_the_same_scores(kind):
    m = _method(kind)
    text, video = _feats(m, 3, 23)
    index = VideoIndex(uri="mem://", meta={}, ids=[f"v{i}" for i in range(23)], features=video)
    fast, slow = Searcher(m, index, chunk=7), Searcher(m, index, chunk=7, prepare_bytes=0)
    assert "frames_k" in fast.video_features() and "frames_k" not in slow.video_features()
    assert torch.allclose(fast.full_scores(text), slow.full_scores(text), atol=1e-6, rtol=0)
    rows = torch.tensor([3, 9, 22])
    assert torch.allclose(fast.full_scores(text, rows), slow.full_scores(text)[:, rows], atol=1e-6, rtol=0)
    assert torch.equal(F.normalize(fast.video_features()["frames"], dim=-1), F.normalize(video["frames"], dim=-1))
