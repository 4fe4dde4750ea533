"""``tvr captions improve | generate`` subcommands (registered by :func:`add_subcommands`).

    tvr captions improve  <spec> [key=value ...]   CSI: self-improve the captioning prompt
    tvr captions generate <spec> [key=value ...]   caption the corpus with the best prompt

The paper's CSI needs a multimodal captioner and an LLM prompt engineer behind an OpenAI-compatible
endpoint (``captions.backend=openai captions.engineer=openai``; a local VLM under vLLM / SGLang /
Ollama works, docs/excae.md). The offline defaults, the ``retrieval`` captioner and the ``rules``
engineer, are stand-ins: they run the loop without a network, they do not run the paper's CSI.
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
    spend = out.get("budget") or {}
    if spend.get("prompt_tokens") or spend.get("completion_tokens"):
        print(f"[tvr] spend: {spend['prompt_tokens'] + spend['completion_tokens']} tokens, cost {spend['cost']:.4f}")
    if out["stop_reason"] == "budget":
        print("[tvr] the captions budget is spent; rerun to continue (paid replies are reused, not paid again)")
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
    stand_in = ("the offline defaults captions.backend=retrieval / captions.engineer=rules are STAND-INS "
                "that do not run the paper's CSI; use captions.backend=openai captions.engineer=openai with "
                "an OpenAI-compatible endpoint (GPT-4o, or a local VLM under vLLM / SGLang / Ollama)")
    parser = subparsers.add_parser("captions", help="ExCae captions: improve the prompt (CSI), caption the corpus",
                                   description=f"ExCae captions. Note: {stand_in}.")
    sub = parser.add_subparsers(dest="captions_command", required=True)
    for name, handler, text in (
            ("improve", cmd_improve, "CSI: self-improve the captioning prompt (stop when no new candidate "
                                     "enters the pool), log rounds to MLflow, budgeted and resumable"),
            ("generate", cmd_generate, "caption every video with the best prompt (Ray Data, concurrent, "
                                       "budgeted, resumable)")):
        p = sub.add_parser(name, help=text, description=f"{text}. Note: {stand_in}.")
        p.add_argument("spec", help="YAML job spec")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        p.set_defaults(func=handler)
    return parser
