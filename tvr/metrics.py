"""Retrieval metrics from a text x video similarity matrix, computed in bounded-memory blocks.

Notation: S (N_t, N_v) scores, g(i) the video that text i describes (several texts may describe
one video: multi-caption evaluation).

- text -> video rank of text i:   r_i = 1 + #{j : S[i,j] > S[i,g(i)]} + #{j < g(i) : S[i,j] = S[i,g(i)]}
- video -> text rank of video v, two protocols (``v2t_rank``), with b(v) = max_{p: g(p)=v} S[p,v]
  the score of v's best true caption and m(a, v) = max_{t: g(t)=a} S[t,v] video a's best caption:
    "videos" (default; the published protocol: X-Pool / T-MASS ``v2t_metrics``, CLIP4Clip
             ``tensor_video_to_text_sim``, which max-pool each video's captions first):
             r_v = 1 + #{a ≠ v : m(a,v) > b(v)} + #{a < v : m(a,v) = b(v)}
    "texts"  (counts competing captions): r_v = 1 + #{t : S[t,v] > b(v)} + #{t < p* : S[t,v] = b(v)},
             p* the lowest-index best true caption; a video whose captions are many ranks worse.
  With one caption per video the two agree (up to how ties between videos are ordered).

Ties are broken by index (the order a stable sort would give), so results are deterministic.
R@K = 100 · mean(r ≤ K); MdR = median(r); MnR = mean(r).

DSL (dual softmax, Cheng et al. 2021 "Improving video-text retrieval by multi-stream corpus
alignment and dual softmax loss"; in the T-MASS evaluation code, ``--DSL``; X-Pool has none)
re-weights S' = S ⊙ softmax(τ·S). t2v always uses the softmax over texts (dim 0), as T-MASS.
For v2t the axis is a named choice (``dsl_v2t``): "texts" (default, T-MASS's code: one
re-weighted matrix, softmax over texts, serves both directions) or "videos" (softmax over videos,
dim 1: the direction-symmetric form). In blocks, the softmax normaliser is a log-sum-exp
accumulated in a first pass.

Memory and work: :func:`blockwise_ranks` holds at most ``keep_bytes`` of scored tiles plus one
``block`` x ``block`` tile, so a 100k x 100k evaluation runs in about a GB, and it scores each tile
once whenever the tiles it must hold fit (always without DSL when captions come in video order;
with DSL when the whole matrix fits, otherwise twice: the normalisers need every tile first).
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


DEFAULT_KEEP_BYTES = 512 * 2**20
"""Scored tiles :func:`blockwise_ranks` may hold between its passes (the whole matrix up to this)."""


class _Tiles:
    """Scores tiles through ``score``, keeping up to ``keep_bytes`` of them for a later pass.

    ``calls`` counts the tiles scored, so callers and benchmarks can check every tile is scored once.
    """

    def __init__(self, score: ScoreFn, t_slices: list[slice], v_slices: list[slice], keep_bytes: int):
        self.score, self.ts, self.vs = score, t_slices, v_slices
        self.budget = keep_bytes
        self.kept: dict[tuple[int, int], Tensor] = {}
        self.calls = 0

    def get(self, a: int, b: int, *, keep: bool) -> Tensor:
        """Tile (a, b) as float64 on CPU. ``keep``: hold it for a later ``get`` (within budget);
        otherwise a held tile is handed out and released."""
        s = self.kept.get((a, b)) if keep else self.kept.pop((a, b), None)
        if s is not None and not keep:
            self.budget += s.numel() * s.element_size()
        if s is None:
            s = self.score(self.ts[a], self.vs[b]).cpu()
            self.calls += 1
            if keep and s.numel() * s.element_size() <= self.budget:
                self.kept[(a, b)] = s
                self.budget -= s.numel() * s.element_size()
        return s.double()


V2T_RANKS = ("videos", "texts")
DSL_V2T_AXES = ("texts", "videos")


def blockwise_ranks(score: ScoreFn, text_to_video: Tensor, n_video: int, *, block: int = 4096,
                    dsl_temp: float | None = None, keep_bytes: int = DEFAULT_KEEP_BYTES,
                    stats: dict[str, int] | None = None, v2t_rank: str = "videos",
                    dsl_v2t: str = "texts") -> Ranks:
    """Ranks in both directions, computing S one (block x block) tile at a time.

    Args:
        score: returns a similarity tile for a text slice and a video slice.
        text_to_video: (N_t,) long, g(i) for each text; every video needs at least one text.
        n_video: N_v.
        block: tile side; peak memory is O(block² + keep_bytes + N_t + N_v).
        dsl_temp: if given, apply dual softmax with this inverse temperature (100 in T-MASS).
        keep_bytes: scored tiles held between passes (as ``score`` returns them).
        stats: if given, receives ``tiles`` (the number of tiles) and ``scored`` (``score`` calls).
        v2t_rank: "videos" (published protocol) or "texts" (module docstring).
        dsl_v2t: softmax axis of DSL for v2t: "texts" (T-MASS) or "videos".

    Each tile is scored once when the tiles to hold fit in ``keep_bytes``. Without DSL the first
    pass scores only the tiles holding a positive pair (i, g(i)) and holds them; the counting
    pass then scores every other tile once (with captions in video order, that is one tile per
    text strip: the whole of S is scored once at any N). With DSL, the normalisers need every
    tile before any count, so the matrix is scored once if it fits in ``keep_bytes``, else twice.
    Tiles beyond the budget are scored again; the ranks never depend on what was held.
    """
    g = text_to_video.long().cpu()
    n_t = g.shape[0]
    if n_t == 0 or n_video == 0:
        raise ValueError("blockwise_ranks: empty similarity matrix")
    if torch.bincount(g, minlength=n_video).min() == 0:
        raise ValueError("blockwise_ranks: every video needs at least one caption in text_to_video")
    if v2t_rank not in V2T_RANKS or dsl_v2t not in DSL_V2T_AXES:
        raise ValueError(f"blockwise_ranks: v2t_rank must be one of {V2T_RANKS} (got {v2t_rank!r}) and "
                         f"dsl_v2t one of {DSL_V2T_AXES} (got {dsl_v2t!r})")
    t_slices, v_slices = _slices(n_t, block), _slices(n_video, block)
    tiles = _Tiles(score, t_slices, v_slices, keep_bytes)
    every = [(a, b) for a in range(len(t_slices)) for b in range(len(v_slices))]
    # Tiles holding a positive pair (i, g(i)), and how many of them each text strip / video block has.
    col_block = g // block                                                       # (N_t,)
    pos_tiles = sorted({(a, int(b)) for a, ts in enumerate(t_slices) for b in torch.unique(col_block[ts])})
    row_left = torch.bincount(torch.tensor([a for a, _ in pos_tiles]), minlength=len(t_slices))
    col_left = torch.bincount(torch.tensor([b for _, b in pos_tiles]), minlength=len(v_slices))
    text_idx = torch.arange(n_t)

    pos = torch.empty(n_t, dtype=torch.float64)                                  # S[i, g(i)]
    if dsl_temp is not None:
        col_lse = torch.full((n_video,), -torch.inf, dtype=torch.float64)        # over texts (t2v)
        row_lse = torch.full((n_t,), -torch.inf, dtype=torch.float64)            # over videos (v2t)

    def dsl(s: Tensor, lse: Tensor) -> Tensor:
        """S ⊙ softmax(τS) elementwise, given the softmax's log normaliser (broadcast to s)."""
        return s * torch.exp(s * dsl_temp - lse)

    pos_t2v = pos
    best_score = torch.full((n_video,), -torch.inf, dtype=torch.float64)
    best_text = torch.full((n_video,), n_t, dtype=torch.long)

    def column_thresholds(b: int) -> None:
        """Best positive of each video in block b for v2t: max score, ties -> lowest text index."""
        texts = torch.nonzero(col_block == b).squeeze(1)
        gt = g[texts]
        pv = pos[texts] if dsl_temp is None else dsl(pos[texts], v2t_lse(texts, gt))
        best_score.scatter_reduce_(0, gt, pv, reduce="amax")
        is_best = pv == best_score[gt]
        best_text.scatter_reduce_(0, gt[is_best], texts[is_best], reduce="amin")

    def v2t_lse(texts: Tensor | slice, videos: Tensor | slice) -> Tensor:
        """Log normaliser of the v2t DSL softmax for (texts, videos) pairs, broadcastable."""
        return col_lse[videos] if dsl_v2t == "texts" else row_lse[texts]

    t2v = torch.ones(n_t, dtype=torch.long)
    v2t = torch.ones(n_video, dtype=torch.long)
    counted: set[tuple[int, int]] = set()
    # v2t_rank="videos" counts competing *videos*: video a beats v when any caption of a does. A
    # video whose captions lie in one text strip is counted within the tile; the few whose captions
    # span strips (at most one per strip boundary when captions come in video order) are OR-ed
    # over tiles in ``split_beats`` (n_split, N_v) and counted at the end.
    strip = torch.arange(n_t) // block
    first = torch.full((n_video,), n_t, dtype=torch.long).scatter_reduce(0, g, strip, reduce="amin")
    last = torch.full((n_video,), -1, dtype=torch.long).scatter_reduce(0, g, strip, reduce="amax")
    split = first != last                                                        # (N_v,) bool
    split_id = torch.cumsum(split.long(), 0) - 1
    split_beats = torch.zeros(int(split.sum()) if v2t_rank == "videos" else 0, n_video, dtype=torch.bool)

    def count(a: int, b: int, s: Tensor) -> None:
        """Add tile (a, b)'s strictly better (and tied-earlier) competitors to both ranks."""
        ts, vs = t_slices[a], v_slices[b]
        vid = torch.arange(vs.start, vs.stop)
        st = s if dsl_temp is None else dsl(s, col_lse[vs][None, :])
        p = pos_t2v[ts][:, None]
        t2v[ts] += ((st > p) | ((st == p) & (vid[None, :] < g[ts][:, None]))).sum(1)
        if dsl_temp is None:
            sv = s
        else:
            sv = st if dsl_v2t == "texts" else dsl(s, row_lse[ts][:, None])
        bs = best_score[vs][None, :]
        if v2t_rank == "texts":
            v2t[vs] += ((sv > bs) | ((sv == bs) & (text_idx[ts][:, None] < best_text[vs][None, :]))).sum(0)
        else:
            gt = g[ts]
            beat = (sv > bs) | ((sv == bs) & (gt[:, None] < vid[None, :]))     # (bt, bv) caption's video beats v
            groups, inv = torch.unique(gt, return_inverse=True)
            hit = torch.zeros(groups.numel(), beat.shape[1], dtype=torch.int32).index_add_(0, inv, beat.int()) > 0
            sp = split[groups]                                                  # (U,) spans strips
            v2t[vs] += hit[~sp].sum(0)
            if sp.any():
                split_beats[split_id[groups[sp]], vs] |= hit[sp]
        counted.add((a, b))

    # Pass 1 (positive tiles; with DSL every tile): positive scores, and with DSL the normalisers.
    # Without DSL a held tile is counted as soon as its strip's and its block's thresholds are known.
    positive = set(pos_tiles)
    for a, b in (every if dsl_temp is not None else pos_tiles):
        ts, vs = t_slices[a], v_slices[b]
        s = tiles.get(a, b, keep=True)                                           # (bt, bv)
        if (a, b) in positive:
            gi = g[ts]
            rows = torch.nonzero(col_block[ts] == b).squeeze(1)
            pos[ts.start + rows] = s[rows, gi[rows] - vs.start]
        if dsl_temp is not None:
            st = s * dsl_temp
            col_lse[vs] = torch.logaddexp(col_lse[vs], torch.logsumexp(st, dim=0))
            row_lse[ts] = torch.logaddexp(row_lse[ts], torch.logsumexp(st, dim=1))
            continue
        row_left[a] -= 1
        col_left[b] -= 1
        if col_left[b] == 0:
            column_thresholds(b)
        for ka, kb in [k for k in tiles.kept if row_left[k[0]] == 0 and col_left[k[1]] == 0]:
            count(ka, kb, tiles.get(ka, kb, keep=False))
    if dsl_temp is not None:
        pos_t2v = dsl(pos, col_lse[g])
        for b in range(len(v_slices)):
            column_thresholds(b)

    # Pass 2: every tile not yet counted (held tiles are handed out and released).
    for a, b in every:
        if (a, b) not in counted:
            count(a, b, tiles.get(a, b, keep=False))
    v2t += split_beats.sum(0)
    if stats is not None:
        stats.update(tiles=len(every), scored=tiles.calls)
    return Ranks(t2v=t2v, v2t=v2t)


def ranks_from_matrix(sims: Tensor, text_to_video: Tensor | None = None, *, block: int = 4096,
                      dsl_temp: float | None = None, v2t_rank: str = "videos", dsl_v2t: str = "texts") -> Ranks:
    """Ranks for a materialised (N_t, N_v) matrix; ``text_to_video`` defaults to the diagonal."""
    n_t, n_v = sims.shape
    g = torch.arange(n_t) if text_to_video is None else text_to_video
    return blockwise_ranks(lambda ts, vs: sims[ts, vs], g, n_v, block=block, dsl_temp=dsl_temp,
                           v2t_rank=v2t_rank, dsl_v2t=dsl_v2t)


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
