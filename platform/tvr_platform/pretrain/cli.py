"""``tvr pretrain [spec] [overrides]``: image-text pre-training of a backbone (see :mod:`.recipe`)."""

from __future__ import annotations

import argparse


def cmd_pretrain(args: argparse.Namespace) -> int:
    from tvr_platform.pretrain.recipe import load_pretrain_job, pretrain
    from tvr_platform.recipes import print_table

    job = load_pretrain_job(args.spec, args.overrides)
    report = pretrain(job)
    print_table(f"{job.run.name}: held-out static captions ({job.data.test_split})", report["metrics"])
    reg = report["registered"]
    print(f"[tvr] open_clip checkpoint: {report['checkpoint']}")
    print(f"[tvr] registered {reg['uri']} (alias champion: {'moved' if reg['promoted'] else 'kept'}); "
          f"use it with model.backbone.pretrained=models:/{reg['name']}@champion")
    print(f"[tvr] MLflow: {report['mlflow']}")
    return 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("pretrain", help="image-text contrastive pre-training of a backbone (static captions)")
    p.add_argument("spec", nargs="?", help="YAML job spec (default jobs/pretrain.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=cmd_pretrain)
