"""Latency and memory per text query of ``tvr search`` for 10k and 100k indexed clips.

Run on demand (not a test):

    .venv/bin/python benchmarks/bench_search.py                                # default grid
    .venv/bin/python benchmarks/bench_search.py --sizes 10000 --methods xpool --backbone tvr-small

For each (method, N) a fresh process builds the method on a random-init backbone (default
ViT-B-32: D = 512, the papers' backbone; no weights are downloaded), fills a ``VideoIndex`` with N
clips of *random* features of the shapes that method's ``encode_video`` returns (per-frame
features for X-Pool, frame + patch tokens for UCoFIA), and times ``Searcher.search`` (query
tokenisation + text encoding + scoring + top-k) over ``--queries`` queries after one warm-up.

- memory per query: growth of the resident set's high-water mark during the queries over the
  resident set just before them (Linux: VmHWM reset through /proc/self/clear_refs);
- index: the bytes of the stored features;
- two-stage rows keep ``--candidates`` clips from the coarse stage (cosine of global embeddings)
  and rerank them with the method's similarity; "top-10 kept" is the fraction of the exhaustive
  top 10 that the two-stage search returns. On random features it is a pessimistic floor (the
  coarse and fine scores share only the global term); `tvr bench methods` reports the recall kept
  by the same two-stage search on trained models.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

FINE_GRAINED = ("ucofia",)
"""Methods whose exhaustive search is timed only up to --exhaustive-max clips."""
QUERIES = ["a red circle moves to the left", "a small blue square appears", "two shapes bounce around",
           "a green triangle slides down", "the yellow star grows", "a purple disk moves up and right"]


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _run_one(method_name: str, n: int, candidates: int | None, args, queue) -> None:
    import torch

    from tvr.backbone import BackboneCfg, ClipBackbone
    from tvr.methods import METHODS, build_method
    from tvr_platform.search import Searcher, VideoIndex

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    extra = {"num_frames": args.frames} if method_name in ("tmass",) else {}
    method = build_method(method_name, METHODS[method_name].config_cls(**extra),
                          ClipBackbone(BackboneCfg(name=args.backbone))).eval()
    size = method.backbone.image_size
    with torch.no_grad():   # feature shapes from one real clip, then random rows of those shapes
        probe = method.encode_video(torch.zeros(1, args.frames, 3, size, size))
    g = torch.Generator().manual_seed(1)
    feats = {}
    for k, v in probe.items():
        x = torch.randn((n, *v.shape[1:]), generator=g)
        if x.ndim >= 2:
            x.div_(x.norm(dim=-1, keepdim=True))          # in place: the index is the memory bill
        feats[k] = x
    index = VideoIndex(uri="mem://", meta={}, ids=[f"video{i}" for i in range(n)], features=feats)
    searcher = Searcher(method, index, chunk=args.chunk)
    searcher.search(QUERIES[0], 10, candidates)                      # warm-up (+ coarse embeddings)
    before = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    for i in range(args.queries):
        searcher.search(QUERIES[i % len(QUERIES)], 10, candidates)
    ms = 1000 * (time.perf_counter() - t0) / args.queries
    peak = _rss_kb("VmHWM")
    kept = None
    if candidates is not None:
        text = searcher.encode_queries(QUERIES)
        from tvr_platform.search import topk_overlap

        kept = topk_overlap(searcher.search_features(text, 10)[1], searcher.search_features(text, 10, candidates)[1])
    queue.put({"ms": ms, "mem_mb": max(peak - before, 0) / 1024,
               "index_mb": sum(v.numel() * v.element_size() for v in feats.values()) / 2 ** 20, "kept": kept})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--methods", nargs="+", default=["meanp", "xpool", "ucofia"])
    p.add_argument("--backbone", default="ViT-B-32")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--candidates", type=int, default=1000, help="two-stage candidates")
    p.add_argument("--two-stage", nargs="*", default=["xpool", "tmass", "ucofia"],
                   help="methods also timed with the two-stage search")
    p.add_argument("--two-stage-only", action="store_true", help="skip the exhaustive rows")
    p.add_argument("--exhaustive-max", type=int, default=10_000,
                   help="largest N at which the fine-grained (UCoFIA) exhaustive search is timed")
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP spinning on a busy box)")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    print(f"backbone {args.backbone}, T = {args.frames} frames, {args.threads} threads, random features\n")
    print("| method | clips | search | candidates | ms / query | memory / query MB | index MB | top-10 kept |")
    print("|---|---|---|---|---|---|---|---|")
    for m in args.methods:
        for n in args.sizes:
            exhaustive = m not in FINE_GRAINED or n <= args.exhaustive_max
            modes = ([None] if exhaustive and not args.two_stage_only else []) + \
                ([args.candidates] if m in args.two_stage else [])
            for cand in modes:
                q = ctx.Queue()
                proc = ctx.Process(target=_run_one, args=(m, n, cand, args, q))
                proc.start()
                proc.join()
                if proc.exitcode != 0:
                    print(f"| {m} | {n:,} | {'exhaustive' if cand is None else 'two-stage'} | {cand or '-'} | "
                          f"failed (exit {proc.exitcode}) | | | |")
                    continue
                r = q.get()
                kept = "-" if r["kept"] is None else f"{100 * r['kept']:.0f}%"
                print(f"| {m} | {n:,} | {'exhaustive' if cand is None else 'two-stage'} | {cand or 'all'} | "
                      f"{r['ms']:.1f} | {r['mem_mb']:.0f} | {r['index_mb']:.0f} | {kept} |", flush=True)


if __name__ == "__main__":
    main()
