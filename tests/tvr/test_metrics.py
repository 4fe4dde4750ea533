"""Blockwise ranks (tvr.metrics) against brute force on the full float64 matrix, for every tile
size, caption layout, DSL on/off and memory budget; and the work: each tile scored once."""

from __future__ import annotations

import pytest
import torch

from tvr.metrics import blockwise_ranks, dual_softmax, ranks_from_matrix


def _brute(sims: torch.Tensor, g: torch.Tensor, dsl_temp: float | None, v2t_rank: str = "videos",
           dsl_v2t: str = "texts") -> tuple[list[int], list[int]]:
    """Ranks by full comparisons / stable argsorts in float64.

    t2v per text; v2t "videos": max-pool each video's captions into an (N_v, N_v) matrix and rank
    the true video by a stable argsort (X-Pool / T-MASS ``v2t_metrics``); "texts": best rank of any
    positive text among all texts."""
    s = sims.double()
    st = s if dsl_temp is None else dual_softmax(s, dsl_temp, dim=0)
    sv = st if dsl_temp is None or dsl_v2t == "texts" else dual_softmax(s, dsl_temp, dim=1)
    n_t, n_v = s.shape
    j = torch.arange(n_v)
    p = st[torch.arange(n_t), g][:, None]
    t2v = 1 + (st > p).sum(1) + ((st == p) & (j[None, :] < g[:, None])).sum(1)
    v2t = []
    if v2t_rank == "videos":
        pooled = torch.stack([sv[g == a].amax(dim=0) for a in range(n_v)])     # (N_v caption groups, N_v)
        for v in range(n_v):
            order = torch.sort(-pooled[:, v], stable=True).indices.tolist()   # ties -> lower video first
            v2t.append(1 + order.index(v))
        return t2v.tolist(), v2t
    for v in range(n_v):
        order = torch.sort(-sv[:, v], stable=True).indices.tolist()            # ties -> lower text first
        v2t.append(1 + min(order.index(t) for t in range(n_t) if g[t] == v))
    return t2v.tolist(), v2t


def _case(layout: str, n_v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if layout == "diagonal":
        g = torch.arange(n_v)
    else:                                           # 1..3 captions per video
        g = torch.repeat_interleave(torch.arange(n_v), torch.randint(1, 4, (n_v,), generator=gen))
        if layout == "shuffled":
            g = g[torch.randperm(g.numel(), generator=gen)]
    sims = (torch.randn(g.numel(), n_v, generator=gen) * 0.3).round(decimals=1)   # many exact ties
    return sims, g


@pytest.mark.parametrize("layout", ["diagonal", "sorted", "shuffled"])
@pytest.mark.parametrize(("dsl_temp", "dsl_v2t"), [(None, "texts"), (100.0, "texts"), (100.0, "videos")])
@pytest.mark.parametrize("v2t_rank", ["videos", "texts"])
def test_blockwise_ranks_equal_brute_force_for_every_block_and_budget(layout, dsl_temp, dsl_v2t, v2t_rank):
    sims, g = _case(layout, 23, seed=len(layout))
    if dsl_temp is not None:                        # DSL on rounded scores: ties of equal raw pairs only
        sims = sims + torch.randn(sims.shape, generator=torch.Generator().manual_seed(1)) * 1e-3
    ref = _brute(sims, g, dsl_temp, v2t_rank, dsl_v2t)
    for block in (1, 4, 7, 23, 64):
        for keep in (0, 300, 1 << 30):
            kw = {"dsl_temp": dsl_temp, "v2t_rank": v2t_rank, "dsl_v2t": dsl_v2t}
            r = ranks_from_matrix(sims, g, block=block, **kw) if keep == 1 << 30 else \
                blockwise_ranks(lambda ts, vs: sims[ts, vs], g, sims.shape[1], block=block, keep_bytes=keep, **kw)
            assert (r.t2v.tolist(), r.v2t.tolist()) == ref, (block, keep)


def test_v2t_protocols_on_a_hand_computed_case():
    """Video 0 has three captions; video 1 one. For query video 1 the three captions of video 0
    all beat its true caption: the published protocol counts one competing video (rank 2), the
    text-counting form three competing captions (rank 4)."""
    sims = torch.tensor([[0.9, 0.8],
                         [0.5, 0.7],
                         [0.4, 0.6],
                         [0.1, 0.3]])                                            # texts x videos
    g = torch.tensor([0, 0, 0, 1])
    assert ranks_from_matrix(sims, g).v2t.tolist() == [1, 2]
    assert ranks_from_matrix(sims, g, v2t_rank="texts").v2t.tolist() == [1, 4]
    with pytest.raises(ValueError, match="v2t_rank must be one of"):
        ranks_from_matrix(sims, g, v2t_rank="captions")


def _count_calls(sims, g, block, dsl_temp, keep):
    calls = []

    def score(ts, vs):
        calls.append((ts.start, vs.start))
        return sims[ts, vs]

    stats: dict[str, int] = {}
    blockwise_ranks(score, g, sims.shape[1], block=block, dsl_temp=dsl_temp, keep_bytes=keep, stats=stats)
    assert stats["scored"] == len(calls)
    return stats["tiles"], calls


def test_each_tile_is_scored_once():
    sims, g = _case("sorted", 61, seed=3)                                       # ~120 texts, 61 videos
    n_tiles = -(-sims.shape[0] // 8) * -(-61 // 8)
    # Without DSL, captions in video order: only one strip's positive tiles are held at a time.
    tiles, calls = _count_calls(sims, g, 8, None, keep=3 * 8 * 8 * 4)
    assert tiles == n_tiles and len(calls) == n_tiles and len(set(calls)) == n_tiles
    # DSL: once when the matrix fits in the budget, twice (normalisers, then counts) when nothing fits.
    _, calls = _count_calls(sims, g, 8, 100.0, keep=sims.numel() * 4)
    assert len(calls) == n_tiles and len(set(calls)) == n_tiles
    _, calls = _count_calls(sims, g, 8, 100.0, keep=0)
    assert len(calls) == 2 * n_tiles
    # No budget and no DSL: the positive tiles are scored again in the counting pass, nothing else.
    sims, g = _case("diagonal", 40, seed=4)
    _, calls = _count_calls(sims, g, 8, None, keep=0)
    assert len(calls) == 25 + 5 and len(set(calls)) == 25


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="every video needs at least one caption"):
        ranks_from_matrix(torch.zeros(2, 3), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="empty"):
        ranks_from_matrix(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
