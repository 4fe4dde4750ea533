"""``tvr captions improve | generate`` subcommands (registered by :func:`add_subcommands`).

    tvr captions improve  <spec> [key=value ...]   CSI: self-improve the captioning prompt
    tvr captions generate <spec> [key=value ...]   caption the corpus with the best prompt
"""

from __future__ import annotations

import argparse
import json


def cmd_improve(args: argparse.Namespace) -> int:
    from tvr_platform.captions.csi import run_csi
    from tvr_platform.config import load_job

    job = load_job(args.spec, args.overrides)
    out = run_csi(job)
    print(f"[tvr] CSI: {out['rounds']} round(s), stopped by {out['stop_reason']}, "
          f"best score {out['best_score']:.4f}")
    print(f"[tvr] best prompt: {out['best_prompt']}")
    print(f"[tvr] saved to {out['saved']} (MLflow run {out['run_id']})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tvr_platform.captions.corpus import generate_corpus_captions
    from tvr_platform.config import load_job

    job = load_job(args.spec, args.overrides)
    report = generate_corpus_captions(job)
    print(f"[tvr] captions: {json.dumps({k: v for k, v in report.items() if k != 'prompt'})}")
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``captions improve`` and ``captions generate`` to a ``tvr`` subparsers object."""
    parser = subparsers.add_parser("captions", help="ExCae captions: improve the prompt (CSI), caption the corpus")
    sub = parser.add_subparsers(dest="captions_command", required=True)
    for name, handler, text in (
            ("improve", cmd_improve, "CSI: self-improve the captioning prompt, log rounds to MLflow"),
            ("generate", cmd_generate, "caption every video with the best prompt (Ray Data, resumable)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("spec", help="YAML job spec")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        p.set_defaults(func=handler)
    return parser
