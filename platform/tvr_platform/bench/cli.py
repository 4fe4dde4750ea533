"""``tvr bench methods``: the synthetic method benchmark (see :mod:`tvr_platform.bench.methods`).

    tvr bench methods [overrides] --seeds 0 1 2 --lock /tmp/tvr-ray.lock --out bench-methods.md

Overrides change the shared budget for every method (e.g. ``train.epochs=10
data.synth.num_clips=96``); results resume from ``<run.work_dir>/bench-methods/results.jsonl``.
``--backbone auto`` (default) pre-trains the backbone once (``tvr pretrain``, static captions) and
starts every method from it; ``--backbone none`` is the random-init benchmark.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def cmd_bench_methods(args: argparse.Namespace) -> int:
    from tvr_platform.bench.methods import BUDGET, markdown_table, run_benchmark
    from tvr_platform.config import load_job

    work = load_job(None, [*BUDGET, *args.overrides]).work_dir / "bench-methods"
    rows = run_benchmark(args.seeds, work, args.overrides, only=args.only, lock=args.lock, backbone=args.backbone)
    table = markdown_table(rows)
    command = "tvr " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "tvr bench methods"
    budget = " ".join(BUDGET + list(args.overrides))
    text = f"{table}\nCommand: `{command}`; budget: `{budget}`; seeds {args.seeds}.\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        print(f"[tvr] table written to {args.out}")
    return 0


def add_subcommands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("methods", help="every method, same budget and seeds, on the synthetic set")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run.seed values (default 0 1 2)")
    p.add_argument("--only", nargs="+", help="variant labels (exact, case-insensitive) or substrings of them to run (default: all)")
    p.add_argument("--lock", help="flock this file around each training (shared machines)")
    p.add_argument("--backbone", default="auto",
                   help="what every method starts from: auto (tvr pretrain once, static captions; default), "
                        "a checkpoint path or models:/name@alias, or none (random init)")
    p.add_argument("--out", help="also write the Markdown table to this file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the shared budget")
    p.set_defaults(func=cmd_bench_methods)
