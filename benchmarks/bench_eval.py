"""Evaluation cost: tiles scored and wall time of ``tvr.metrics.blockwise_ranks``, before / after.

Run on demand (not a test):

    .venv/bin/python benchmarks/bench_eval.py                         # N = 1000, 5000; meanP + X-Pool
    .venv/bin/python benchmarks/bench_eval.py --sizes 1000 --methods xpool --block 1024

"before" is the earlier three-pass algorithm (kept below as ``legacy_ranks``): it scored each
tile holding a positive twice in its first pass (once per direction) and every tile again in the
second (twice each with DSL, after a normaliser pass). "after" is ``blockwise_ranks``: each tile
scored once (with DSL: once while the matrix fits ``keep_bytes``). Both run on the same random
tvr-tiny-shaped features (D = 32, T = 12 frames; captions 1:1 with videos, as MSR-VTT 1k-A) with
the method's own ``similarity`` as the tile scorer, ``block`` = 1024 (the evaluation default), and
the ranks are checked identical. Times are one run each on CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tvr.metrics import Ranks, ScoreFn, _slices, blockwise_ranks


def legacy_ranks(score: ScoreFn, g: torch.Tensor, n_video: int, *, block: int,
                 dsl_temp: float | None) -> tuple[Ranks, int]:
    """The earlier blockwise_ranks (normalisers, positives per direction, counts) -> (ranks, calls)."""
    calls = 0

    def raw(ts, vs):
        nonlocal calls
        calls += 1
        return score(ts, vs).double().cpu()

    n_t = g.shape[0]
    if dsl_temp is not None:
        col = torch.full((n_video,), -torch.inf, dtype=torch.float64)
        row = torch.full((n_t,), -torch.inf, dtype=torch.float64)
        for ts in _slices(n_t, block):
            for vs in _slices(n_video, block):
                s = raw(ts, vs) * dsl_temp
                col[vs] = torch.logaddexp(col[vs], torch.logsumexp(s, dim=0))
                row[ts] = torch.logaddexp(row[ts], torch.logsumexp(s, dim=1))

    def tile(ts, vs, direction):
        s = raw(ts, vs)
        if dsl_temp is None:
            return s
        lse = col[vs][None, :] if direction == "t2v" else row[ts][:, None]
        return s * torch.exp(s * dsl_temp - lse)

    pos_t2v, pos_v2t = torch.empty(n_t, dtype=torch.float64), torch.empty(n_t, dtype=torch.float64)
    for ts in _slices(n_t, block):
        gi = g[ts]
        for vs in _slices(n_video, block):
            inside = (gi >= vs.start) & (gi < vs.stop)
            if not inside.any():
                continue
            rows = torch.nonzero(inside).squeeze(1)
            for direction, out in (("t2v", pos_t2v), ("v2t", pos_v2t)):
                out[ts.start + rows] = tile(ts, vs, direction)[rows, gi[rows] - vs.start]
    text_idx = torch.arange(n_t)
    best = torch.full((n_video,), -torch.inf, dtype=torch.float64).scatter_reduce_(0, g, pos_v2t, reduce="amax")
    is_best = pos_v2t == best[g]
    best_text = torch.full((n_video,), n_t, dtype=torch.long).scatter_reduce_(
        0, g[is_best], text_idx[is_best], reduce="amin")
    t2v, v2t = torch.ones(n_t, dtype=torch.long), torch.ones(n_video, dtype=torch.long)
    for ts in _slices(n_t, block):
        for vs in _slices(n_video, block):
            vid = torch.arange(vs.start, vs.stop)
            s = tile(ts, vs, "t2v")
            p = pos_t2v[ts][:, None]
            t2v[ts] += ((s > p) | ((s == p) & (vid[None, :] < g[ts][:, None]))).sum(1)
            s = tile(ts, vs, "v2t") if dsl_temp is not None else s
            b = best[vs][None, :]
            v2t[vs] += ((s > b) | ((s == b) & (text_idx[ts][:, None] < best_text[vs][None, :]))).sum(0)
    return Ranks(t2v=t2v, v2t=v2t), calls


def _scorer(method: str, n: int) -> ScoreFn:
    from tvr.backbone import BackboneCfg, ClipBackbone
    from tvr.methods.xpool import XPool, XPoolCfg

    torch.manual_seed(0)
    d, frames = 32, 12
    text = F.normalize(torch.randn(n, d), dim=-1)
    vids = torch.randn(n, frames, d) + 2 * text[:, None, :]                # positives score higher
    if method == "meanp":
        video = F.normalize(vids.mean(1), dim=-1)
        return lambda ts, vs: text[ts] @ video[vs].t()
    model = XPool(XPoolCfg(), ClipBackbone(BackboneCfg(name="tvr-tiny"))).eval()
    return lambda ts, vs: model.similarity({"text": text[ts]}, {"frames": vids[vs]})


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--methods", nargs="+", default=["meanp", "xpool"], choices=["meanp", "xpool"])
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"blockwise_ranks, block={args.block}, threads={args.threads}, CPU")
    head = (f"{'method':>7} {'N':>6} {'DSL':>4} {'tiles':>6} {'scored before':>14} {'scored after':>13} "
            f"{'s before':>9} {'s after':>8} {'speed-up':>9}")
    print(head)
    print("-" * len(head))
    for method in args.methods:
        for n in args.sizes:
            score, g = _scorer(method, n), torch.arange(n)
            for dsl in (None, 100.0):
                t0 = time.perf_counter()
                old, old_calls = legacy_ranks(score, g, n, block=args.block, dsl_temp=dsl)
                t1 = time.perf_counter()
                stats: dict[str, int] = {}
                new = blockwise_ranks(score, g, n, block=args.block, dsl_temp=dsl, stats=stats)
                t2 = time.perf_counter()
                assert torch.equal(old.t2v, new.t2v) and torch.equal(old.v2t, new.v2t), "ranks differ"
                print(f"{method:>7} {n:>6} {'yes' if dsl else 'no':>4} {stats['tiles']:>6} {old_calls:>14} "
                      f"{stats['scored']:>13} {t1 - t0:>9.2f} {t2 - t1:>8.2f} {(t1 - t0) / (t2 - t1):>8.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
