"""Latency and memory per text query of ``tvr search`` for 10k and 100k indexed clips, and the
FAISS first stage's recall of the exact top 10 at 100k and 1M synthetic clips.

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
- variant "before": the earlier exhaustive path (the method's similarity over every chunk, the
  frames' keys / values and meanP's normalisation recomputed per query, a full sort); "after":
  ``Searcher.search`` (prepared frame tensors, ``topk``; meanP from the FAISS first stage via
  ``global_first_stage=True``);
- two-stage rows keep ``--candidates`` clips from the coarse stage (cosine of global embeddings)
  and rerank them with the method's similarity; "top-10 kept" is the fraction of the exhaustive
  top 10 that the two-stage search returns. On random features it is a pessimistic floor (the
  coarse and fine scores share only the global term); `tvr bench methods` reports the recall kept
  by the same two-stage search on trained models.

The recall table builds each first-stage index (flat, IVF, HNSW up to ``--hnsw-max``) in a fresh
process over N clustered synthetic unit embeddings (2,048 random centres, noise 0.02 per
coordinate, norm ~0.45; the 1M x 512 float32 matrix is 2 GB, the index another 2 GB) and compares the top 10
of ``--recall-queries`` queries (indexed clips perturbed by 0.01 per coordinate) with the exact top 10.
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


def _run_one(method_name: str, n: int, candidates: int | None, variant: str, args, queue) -> None:
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
    if variant == "before":          # the earlier exhaustive path: similarity per chunk, full sort
        searcher = Searcher(method, index, chunk=args.chunk, prepare_bytes=0)

        def search(q: str) -> None:
            full = searcher.full_scores(searcher.encode_queries([q]))
            torch.sort(-full[0], stable=True)
    else:
        searcher = Searcher(method, index, chunk=args.chunk, global_first_stage=True)

        def search(q: str) -> None:
            searcher.search(q, 10, candidates)
    search(QUERIES[0])                                               # warm-up (+ prepared / FAISS index)
    before = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    for i in range(args.queries):
        search(QUERIES[i % len(QUERIES)])
    ms = 1000 * (time.perf_counter() - t0) / args.queries
    peak = _rss_kb("VmHWM")
    kept = None
    if candidates is not None and variant == "after":
        text = searcher.encode_queries(QUERIES)
        from tvr_platform.search import topk_overlap

        kept = topk_overlap(searcher.search_features(text, 10)[1], searcher.search_features(text, 10, candidates)[1])
    queue.put({"ms": ms, "mem_mb": max(peak - before, 0) / 1024,
               "index_mb": sum(v.numel() * v.element_size() for v in feats.values()) / 2 ** 20, "kept": kept})


def _clustered(n: int, d: int, seed: int, clusters: int = 2048):
    """(n, d) unit rows around random cluster centres (embedding-like structure), generated in slices."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=-1)
    x = torch.empty(n, d)
    for s in range(0, n, 65_536):
        m = min(65_536, n - s)
        x[s:s + m] = centres[torch.randint(0, clusters, (m,), generator=g)] + \
            0.02 * torch.randn(m, d, generator=g)
        x[s:s + m] = torch.nn.functional.normalize(x[s:s + m], dim=-1)
    return x


def _recall_one(n: int, kind: str, args, queue) -> None:
    import torch

    from tvr_platform.search.first_stage import FirstStage

    torch.set_num_threads(args.threads)
    x = _clustered(n, args.dim, 0)
    g = torch.Generator().manual_seed(1)
    q = x[torch.randint(0, n, (args.recall_queries,), generator=g)] + 0.01 * torch.randn(
        args.recall_queries, args.dim, generator=g)                     # queries near indexed clips
    qu = torch.nn.functional.normalize(q, dim=-1)
    cand = torch.cat([torch.topk(qu @ x[s:s + 262_144].t(), 10).indices + s
                      for s in range(0, n, 262_144)], dim=1)            # each slice's top 10 (Q, C)
    exact = cand.gather(1, torch.topk((qu[:, None, :] * x[cand]).sum(-1), 10).indices)   # (Q, 10)
    before = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    stage = FirstStage(x, kind=kind, nprobe=args.nprobe)
    build = time.perf_counter() - t0
    build_mb = max(_rss_kb("VmHWM") - before, 0) / 1024
    stage.search(q[:1], 10)
    t0 = time.perf_counter()
    _, rows = stage.search(q, 10)
    ms = 1000 * (time.perf_counter() - t0) / len(q)
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, rows)) / exact.numel()
    queue.put({"build_s": build, "build_mb": build_mb, "ms": ms, "recall": hits})


def recall_table(args, ctx) -> None:
    print(f"\nfirst stage (FAISS) vs exact top 10: {args.recall_queries} queries, D = {args.dim}, clustered "
          f"synthetic unit embeddings, IVF nprobe = {args.nprobe}, {args.threads} threads\n")
    print("| clips | index | build s | build memory MB | ms / query | recall@10 vs exact |")
    print("|---|---|---|---|---|---|")
    for n in args.recall_sizes:
        for kind in ("flat", "ivf", "hnsw"):
            if kind == "hnsw" and n > args.hnsw_max:
                continue
            q = ctx.Queue()
            proc = ctx.Process(target=_recall_one, args=(n, kind, args, q))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                print(f"| {n:,} | {kind} | failed (exit {proc.exitcode}) | | | |", flush=True)
                continue
            r = q.get()
            print(f"| {n:,} | {kind} | {r['build_s']:.1f} | {r['build_mb']:.0f} | {r['ms']:.2f} | "
                  f"{100 * r['recall']:.1f}% |", flush=True)


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
    p.add_argument("--before", nargs="*", default=["meanp", "xpool", "tmass"],
                   help="methods whose exhaustive search is also timed the earlier way (before)")
    p.add_argument("--recall-sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                   help="clips for the first-stage recall table (none: skip it)")
    p.add_argument("--recall-queries", type=int, default=100)
    p.add_argument("--dim", type=int, default=512, help="embedding width of the recall table")
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--hnsw-max", type=int, default=100_000, help="largest N given an HNSW row (build time)")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    print(f"backbone {args.backbone}, T = {args.frames} frames, {args.threads} threads, random features\n")
    print("| method | clips | search | candidates | variant | ms / query | memory / query MB | index MB | top-10 kept |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in args.methods:
        for n in args.sizes:
            exhaustive = m not in FINE_GRAINED or n <= args.exhaustive_max
            modes = ([(None, "before")] if exhaustive and not args.two_stage_only and m in args.before else []) + \
                ([(None, "after")] if exhaustive and not args.two_stage_only else []) + \
                ([(args.candidates, "after")] if m in args.two_stage else [])
            for cand, variant in modes:
                q = ctx.Queue()
                proc = ctx.Process(target=_run_one, args=(m, n, cand, variant, args, q))
                proc.start()
                proc.join()
                search = "exhaustive" if cand is None else "two-stage"
                if proc.exitcode != 0:
                    print(f"| {m} | {n:,} | {search} | {cand or '-'} | {variant} | failed (exit {proc.exitcode}) "
                          "| | | |")
                    continue
                r = q.get()
                kept = "-" if r["kept"] is None else f"{100 * r['kept']:.0f}%"
                print(f"| {m} | {n:,} | {search} | {cand or 'all'} | {variant} | "
                      f"{r['ms']:.1f} | {r['mem_mb']:.0f} | {r['index_mb']:.0f} | {kept} |", flush=True)
    if args.recall_sizes:
        recall_table(args, ctx)


if __name__ == "__main__":
    main()
