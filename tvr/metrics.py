"""Retrieval metrics from a text x video similarity matrix, computed in bounded-memory blocks.

Notation: S (N_t, N_v) scores, g(i) the video that text i describes (several texts may describe
one video: multi-caption evaluation).

- text -> video rank of text i:   r_i = 1 + #{j : S[i,j] > S[i,g(i)]} + #{j < g(i) : S[i,j] = S[i,g(i)]}
- video -> text rank of video v:  r_v = min over its captions p of
                                  1 + #{t : S[t,v] > S[p,v]} + #{t < p : S[t,v] = S[p,v]}
  (the best-ranked positive, the usual "all captions" v2t protocol; with one caption per video
  it is the standard protocol).

Ties are broken by index (the order a stable sort would give), so results are deterministic.
R@K = 100 · mean(r ≤ K); MdR = median(r); MnR = mean(r).

DSL (dual softmax, Cheng et al. 2021, as in the T-MASS / X-Pool evaluation code) re-weights
S' = S ⊙ softmax(τ·S) with the softmax over texts (dim 0) for t2v and over videos (dim 1) for
v2t. In blocks, the softmax normaliser is a log-sum-exp accumulated in a first pass.

Memory: :func:`blockwise_ranks` never holds more than ``block`` x ``block`` scores, so a
100k x 100k evaluation runs in a few hundred MB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ScoreFn = Callable[[slice, slice], Tensor]
"""score(text_slice, video_slice) -> (len(text_slice), len(video_slice)) similarity block."""

KS = (1, 5, 10)


@dataclass
class Ranks:
    t2v: Tensor  # (N_t,) long, 1-based
    v2t: Tensor  # (N_v,) long, 1-based


def _slices(n: int, block: int) -> list[slice]:
    return [slice(i, min(i + block, n)) for i in range(0, n, block)]


def _dsl_normalisers(score: ScoreFn, n_t: int, n_v: int, block: int, temp: float) -> tuple[Tensor, Tensor]:
    """Per-video log-sum-exp over texts (t2v) and per-text log-sum-exp over videos (v2t)."""
    col = torch.full((n_v,), -torch.inf, dtype=torch.float64)
    row = torch.full((n_t,), -torch.inf, dtype=torch.float64)
    for ts in _slices(n_t, block):
        for vs in _slices(n_v, block):
            s = score(ts, vs).double() * temp
            col[vs] = torch.logaddexp(col[vs], torch.logsumexp(s, dim=0))
            row[ts] = torch.logaddexp(row[ts], torch.logsumexp(s, dim=1))
    return col, row


def blockwise_ranks(score: ScoreFn, text_to_video: Tensor, n_video: int, *, block: int = 4096,
                    dsl_temp: float | None = None) -> Ranks:
    """Ranks in both directions, computing S one (block x block) tile at a time.

    Args:
        score: returns a similarity tile for a text slice and a video slice.
        text_to_video: (N_t,) long, g(i) for each text; every video needs at least one text.
        n_video: N_v.
        block: tile side; peak memory is O(block² + N_t + N_v).
        dsl_temp: if given, apply dual softmax with this inverse temperature (100 in T-MASS).
    """
    g = text_to_video.long().cpu()
    n_t = g.shape[0]
    if n_t == 0 or n_video == 0:
        raise ValueError("blockwise_ranks: empty similarity matrix")
    if torch.bincount(g, minlength=n_video).min() == 0:
        raise ValueError("blockwise_ranks: every video needs at least one caption in text_to_video")
    if dsl_temp is not None:
        col_lse, row_lse = _dsl_normalisers(score, n_t, n_video, block, dsl_temp)

    def tile(ts: slice, vs: slice, direction: str) -> Tensor:
        s = score(ts, vs).double().cpu()
        if dsl_temp is None:
            return s
        lse = col_lse[vs][None, :] if direction == "t2v" else row_lse[ts][:, None]
        return s * torch.exp(s * dsl_temp - lse)

    # Pass 0: positive scores S[i, g(i)] in each direction's (possibly renormalised) form.
    pos_t2v = torch.empty(n_t, dtype=torch.float64)
    pos_v2t = torch.empty(n_t, dtype=torch.float64)
    for ts in _slices(n_t, block):
        gi = g[ts]
        for vs in _slices(n_video, block):
            inside = (gi >= vs.start) & (gi < vs.stop)
            if not inside.any():
                continue
            rows = torch.nonzero(inside).squeeze(1)
            cols = gi[rows] - vs.start
            for direction, out in (("t2v", pos_t2v), ("v2t", pos_v2t)):
                out[ts.start + rows] = tile(ts, vs, direction)[rows, cols]

    # Best positive per video for v2t: max score, ties -> lowest text index.
    text_idx = torch.arange(n_t)
    best_score = torch.full((n_video,), -torch.inf, dtype=torch.float64)
    best_score.scatter_reduce_(0, g, pos_v2t, reduce="amax")
    is_best = pos_v2t == best_score[g]
    best_text = torch.full((n_video,), n_t, dtype=torch.long)
    best_text.scatter_reduce_(0, g[is_best], text_idx[is_best], reduce="amin")

    # Pass 1: count strictly better (and tied-earlier) competitors.
    t2v = torch.ones(n_t, dtype=torch.long)
    v2t = torch.ones(n_video, dtype=torch.long)
    for ts in _slices(n_t, block):
        for vs in _slices(n_video, block):
            vid = torch.arange(vs.start, vs.stop)
            s = tile(ts, vs, "t2v")                                              # (bt, bv)
            p = pos_t2v[ts][:, None]
            t2v[ts] += ((s > p) | ((s == p) & (vid[None, :] < g[ts][:, None]))).sum(1)
            s = tile(ts, vs, "v2t") if dsl_temp is not None else s
            b = best_score[vs][None, :]
            v2t[vs] += ((s > b) | ((s == b) & (text_idx[ts][:, None] < best_text[vs][None, :]))).sum(0)
    return Ranks(t2v=t2v, v2t=v2t)


def ranks_from_matrix(sims: Tensor, text_to_video: Tensor | None = None, *, block: int = 4096,
                      dsl_temp: float | None = None) -> Ranks:
    """Ranks for a materialised (N_t, N_v) matrix; ``text_to_video`` defaults to the diagonal."""
    n_t, n_v = sims.shape
    g = torch.arange(n_t) if text_to_video is None else text_to_video
    return blockwise_ranks(lambda ts, vs: sims[ts, vs], g, n_v, block=block, dsl_temp=dsl_temp)


def summarize(ranks: Tensor, prefix: str) -> dict[str, float]:
    r = ranks.double()
    out = {f"{prefix}_R{k}": float((r <= k).double().mean() * 100) for k in KS}
    out[f"{prefix}_MdR"] = float(torch.quantile(r, 0.5))
    out[f"{prefix}_MnR"] = float(r.mean())
    return out


def retrieval_metrics(ranks: Ranks) -> dict[str, float]:
    """{'t2v_R1', 't2v_R5', 't2v_R10', 't2v_MdR', 't2v_MnR', and the same for v2t}."""
    return {**summarize(ranks.t2v, "t2v"), **summarize(ranks.v2t, "v2t")}


def dual_softmax(sims: Tensor, temp: float = 100.0, dim: int = 0) -> Tensor:
    """S ⊙ softmax(temp · S, dim) on a full matrix (dim=0: over texts, the t2v form)."""
    return sims * torch.softmax(sims * temp, dim=dim)
