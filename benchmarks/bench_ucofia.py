"""Time and peak memory of UCoFIA's blockwise scoring (dominated by the fine-grained patch-word Bi-ISA).

Run on demand (not a test):

    .venv/bin/python benchmarks/bench_ucofia.py                       # CPU, default grid
    .venv/bin/python benchmarks/bench_ucofia.py --sizes 256 1024 --chunks 16 64
    .venv/bin/python benchmarks/bench_ucofia.py --device cuda         # GPU (peak = max_memory_allocated)
    .venv/bin/python benchmarks/bench_ucofia.py --sizes 1024 --chunks 64 --tile-mibs 64 256  # before / after

For every (N texts x N videos, chunk_size) it scores random tvr-tiny-shaped features (D = 32, ctx
32) with ``UCoFIA.granularity_similarities`` under ``no_grad``: one call covering all N x N pairs,
tiled internally into chunk x chunk tiles. Each configuration runs in a fresh process, so on CPU
the peak is the growth of the resident set's high-water mark (``ru_maxrss``) over the process's
state just before scoring ("RSS before": that state). "unchunked" is the size of a single (N, N, T·K', L') float32 score
tensor that an untiled implementation would hold (it needs several such temporaries).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time


def _run_one(n: int, chunk: int, frames: int, topk: int, words: int, device: str, threads: int,
             queue, tile_mib: int = 0) -> None:
    import torch
    import torch.nn.functional as F

    from tvr.backbone import BackboneCfg, ClipBackbone
    from tvr.methods.ucofia import UCoFIA, UCoFIACfg

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    backbone = ClipBackbone(BackboneCfg(name="tvr-tiny"))
    model = UCoFIA(UCoFIACfg(topk=topk, max_frames=frames, chunk_size=chunk,
                                 tile_mib=tile_mib), backbone).eval().to(device)
    D, L = backbone.embed_dim, backbone.context_length
    N = frames * model.cfg.tokens_per_frame
    lengths = torch.randint(max(2, words // 2), words + 1, (n,))
    mask = (torch.arange(L)[None, :] < lengths[:, None]).float()            # (n, L)
    text = {"sentence": F.normalize(torch.randn(n, D), dim=-1),
            "words": F.normalize(torch.randn(n, L, D), dim=-1), "word_mask": mask}
    video = {"video": F.normalize(torch.randn(n, D), dim=-1),
             "frames": F.normalize(torch.randn(n, frames, D), dim=-1),
             "patches": F.normalize(torch.randn(n, N, D), dim=-1)}
    text = {k: v.to(device) for k, v in text.items()}
    video = {k: v.to(device) for k, v in video.items()}
    with torch.no_grad():                                                  # warm-up (small)
        model.granularity_similarities({k: v[:8] for k, v in text.items()},
                                       {k: v[:8] for k, v in video.items()})
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.no_grad():
        sims = model.granularity_similarities(text, video)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    assert all(torch.isfinite(s).all() for s in sims.values())
    unchunked = n * n * N * int(lengths.max()) * 4
    queue.put((seconds, peak, unchunked, base))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--frames", type=int, default=12, help="T (official 12)")
    ap.add_argument("--topk", type=int, default=3, help="K kept patches per frame (official 3, +CLS)")
    ap.add_argument("--words", type=int, default=20, help="longest caption in tokens (<= ctx 32)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tile-mibs", type=int, nargs="*", default=[64, 256],
                    help="after: tiles sized from these memory budgets (model.ucofia.tile_mib), "
                         "preallocated outputs; the --chunks rows are the fixed-size tiles before")
    ap.add_argument("--max-pairs", type=float, default=2e7,
                    help="skip (N, chunk) configurations with N*N above this (CPU time guard)")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    print(f"UCoFIA granularity_similarities, tvr-tiny features (D=32), T={args.frames}, "
          f"K'={args.topk + 1}, words<={args.words}, device={args.device}, threads={args.threads}")
    header = (f"{'N_t x N_v':>12} {'tiles':>14} {'seconds':>9} {'pairs/s':>11} {'RSS before MiB':>15} "
              f"{'peak MiB':>9} {'unchunked MiB':>14}")
    print(header)
    print("-" * len(header))
    runs = [(c, 0) for c in args.chunks] + [(64, m) for m in args.tile_mibs]
    for n in args.sizes:
        for chunk, mib in runs:
            label = f"tile_mib={mib}" if mib else f"chunk={chunk}"
            if n * n > args.max_pairs:
                print(f"{n:>5} x {n:<5} {label:>14} {'skipped (--max-pairs)':>33}")
                continue
            queue = ctx.Queue()
            proc = ctx.Process(target=_run_one, args=(n, chunk, args.frames, args.topk, args.words,
                                                      args.device, args.threads, queue, mib))
            proc.start()
            seconds, peak, unchunked, base = queue.get()
            proc.join()
            print(f"{n:>5} x {n:<5} {label:>14} {seconds:>9.2f} {n * n / seconds:>11.3g} {base / 2**20:>15.1f} "
                  f"{peak / 2**20:>9.1f} {unchunked / 2**20:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
