"""``tvr data prepare <spec> [overrides] [--split S ...]``: write the frame cache of a job's data.

Decodes every clip of the job's train and test splits (or the ``--split`` ones) once, with the
evaluation sampling, and writes them as sharded Parquet next to the dataset
(:mod:`tvr_platform.data.cache`). Train / evaluate with ``data.frames=cache`` (or ``auto``).
"""

from __future__ import annotations

import argparse
import json


def cmd_prepare(args: argparse.Namespace) -> int:
    from tvr_platform.config import load_job
    from tvr_platform.data.cache import cache_uri, prepare_cache
    from tvr_platform.train.trainer import init_ray

    job = load_job(args.spec, args.overrides)
    init_ray(job)
    metas = prepare_cache(job, args.split or None)
    for split, meta in metas.items():
        print(f"[tvr] {split}: {meta['num_valid']}/{meta['num_videos']} clips decodable, "
              f"{meta['format']} frames (T={meta['num_frames']}, S={meta['size']}) -> {cache_uri(job, split)}")
    print(json.dumps({s: m["num_videos"] for s, m in metas.items()}))
    return 0


def add_prepare(data_subparsers) -> None:
    """Register ``prepare`` under the ``tvr data`` group."""
    p = data_subparsers.add_parser("prepare", help="decode once: write sampled frames as sharded Parquet")
    p.add_argument("spec", nargs="?", help="YAML job spec (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--split", action="append", metavar="S", help="split to prepare (repeatable); "
                   "default: data.train_split and data.test_split")
    p.set_defaults(func=cmd_prepare)
