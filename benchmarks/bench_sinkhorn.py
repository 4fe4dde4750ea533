"""Sinkhorn-Knopp speed and fp32 robustness: tvr's SK vs the official linear-space loop and the
straightforward log-space loop tvr used before.

Run on demand (not a test):

    .venv/bin/python benchmarks/bench_sinkhorn.py                     # 1000² test, 9,000-row bank
    .venv/bin/python benchmarks/bench_sinkhorn.py --rows 1000 9000 --videos 1000 --threads 2

For each bank of ``rows`` texts x ``videos`` videos (random cosines in [-0.3, 0.5], τ = 0.01 as
CLIP's 1/logit_scale) it times the video potentials log b after ``--iters`` updates (the bank form
of UCoFIA's evaluation), fp32, as the best of ``--repeat`` runs of process CPU time (one torch
thread by default, so a busy shared box inflates the figures less than wall time):

- official: K = exp((S - max S)/τ); b = 1/colsum K; repeat a = 1/(K b), b = 1/(Kᵀ a) (the loop of
  UCoFiA's ``sinkhorn_knopp``, written here from its equations);
- log-space: ``sinkhorn_log_potentials_reference`` (logsumexp over the kernel at every update);
- tvr: ``sinkhorn_log_potentials`` (kernel exponentiated once with per-row shifts, mat-vecs,
  log-space redo of sums that could underflow).

"max |Δ log b|" compares each fp32 result with the float64 log-space one. The last rows repeat the
timing with every text's scores offset by a random 0..300 nats (S/τ spread over ~380), where the
official fp32 loop's kernel underflows to whole zero rows (non-finite potentials) and tvr does not.
"""

from __future__ import annotations

import argparse
import time

import torch

from tvr.sinkhorn import sinkhorn_log_potentials, sinkhorn_log_potentials_reference


def official_log_b(S: torch.Tensor, tau: float, n_iter: int) -> torch.Tensor:
    K = torch.exp((S - S.max()) / tau)                                           # (N_t, N_v)
    b = 1.0 / K.sum(0)
    for _ in range(n_iter):
        a = 1.0 / (K @ b)
        b = 1.0 / (K.t() @ a)
    return torch.log(b) - S.max() / tau                                          # potentials of exp(S/τ)


def _best(fn, repeat: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 9000])
    ap.add_argument("--videos", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--tau", type=float, default=0.01)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"SK video potentials, {args.iters} iterations, tau={args.tau}, fp32, {args.threads} threads, "
          "CPU time in ms")
    head = (f"{'bank':>12} {'spread':>7} {'official ms':>12} {'log-space ms':>13} {'tvr ms':>7} "
            f"{'tvr / official':>15} {'log-space / tvr':>16} {'max |Δ log b| official':>23} {'tvr':>9}")
    print(head)
    print("-" * len(head))
    g = torch.Generator().manual_seed(0)
    for wide in (False, True):
        for n in args.rows:
            S = torch.rand(n, args.videos, generator=g) * 0.8 - 0.3
            if wide:                                        # texts offset by up to 300 nats
                S = S - torch.rand(n, 1, generator=g) * 300 * args.tau
            L = S / args.tau
            exact = sinkhorn_log_potentials_reference(L.double(), args.iters)[1]
            t_off, b_off = _best(lambda S=S: official_log_b(S, args.tau, args.iters), args.repeat)
            t_log, _ = _best(lambda S=S: sinkhorn_log_potentials_reference(S / args.tau, args.iters)[1], args.repeat)
            t_new, b_new = _best(lambda S=S: sinkhorn_log_potentials(S / args.tau, args.iters)[1], args.repeat)

            def err(b, exact=exact):
                d = (b.double() - exact).abs().max()
                return f"{float(d):.1e}" if torch.isfinite(d) else "non-finite"

            print(f"{n:>5} x {args.videos:<5} {'380' if wide else '80':>7} {1e3 * t_off:>12.1f} {1e3 * t_log:>13.1f} "
                  f"{1e3 * t_new:>7.1f} {t_new / t_off:>14.2f}x {t_log / t_new:>15.2f}x {err(b_off):>23} "
                  f"{err(b_new):>9}", flush=True)


if __name__ == "__main__":
    main()
