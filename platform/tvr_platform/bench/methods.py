"""The synthetic method benchmark behind ``tvr bench methods``.

Every variant below is trained with the same job (``BUDGET`` + the user's overrides: data, epochs,
batch, learning rates) for each seed, on one generated set (``data.synth.seed`` fixed, so only
``run.seed`` changes: initialisation, sampling, order). After training, the exported weights are
evaluated once per inference setting (UCoFIA with and without Sinkhorn-Knopp reuse one training:
SK is inference-only). Results go to ``<work_dir>/bench-methods/results.jsonl``, one line per
(variant, seed, inference setting); a rerun skips what is there, so an interrupted benchmark resumes.

Cost per row: trainable parameters (``requires_grad``) and their share of all parameters, and the training wall time (Ray Train fit,
including Ray Data decoding, excluding the evaluation).

Shared machines: ``lock`` (a file path) is taken with ``flock`` around each training + evaluation
and Ray is shut down before it is released, so runs of several people interleave.
"""

from __future__ import annotations

import fcntl
import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUDGET = [
    "model.backbone.name=tvr-tiny", "data.synth.num_clips=96", "data.synth.seconds=1.0", "data.synth.size=32",
    "data.num_frames=4", "data.batch_size=16", "data.eval_batch_size=16", "data.decode_concurrency=1",
    "data.decode_num_cpus=0.5", "train.num_workers=0", "train.cpus_per_worker=1", "train.epochs=15",
    "train.lr=3e-4", "train.backbone_lr=3e-4", "train.warmup_steps=2", "train.weight_decay=0.05",
]
"""The small default budget: runs on a 2-core CPU box (tvr-tiny, 72 train / 24 test clips, 15 epochs,
~40 s a run). lr 1e-3 collapsed X-Pool and T-MASS on the random-init tiny CLIP (loss at ln B, tied scores)."""


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]
    evals: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})
    """Inference settings: label suffix -> {eval.* key: value}."""


VARIANTS: tuple[Variant, ...] = (
    Variant("meanP (CLIP4Clip)", ("model.method=meanp",)),
    Variant("X-Pool", ("model.method=xpool",)),
    Variant("T-MASS", ("model.method=tmass", "model.tmass.num_frames=${data.num_frames}")),
    Variant("UCoFIA", ("model.method=ucofia",), {" (no SK)": {"sinkhorn_iters": 0}, " + SK": {"sinkhorn_iters": 4}}),
    Variant("VoP-P", ("model.method=vop", "model.vop.variant=P", "model.vop.num_frames=${data.num_frames}")),
    Variant("VoP-C", ("model.method=vop", "model.vop.variant=C", "model.vop.num_frames=${data.num_frames}")),
    Variant("VoP-F", ("model.method=vop", "model.vop.variant=F", "model.vop.num_frames=${data.num_frames}")),
    Variant("VoP (full)", ("model.method=vop", "model.vop.variant=full", "model.vop.num_frames=${data.num_frames}")),
    Variant("ExCae ECS", ("model.method=excae",)),
    # ECS inside each base's video representation (model.excae.plugin=representation, the default)
    Variant("ExCae over meanP", ("model.method=excae", "model.excae.base=meanp")),
    Variant("ExCae over X-Pool", ("model.method=excae", "model.excae.base=xpool")),
    Variant("ExCae over T-MASS", ("model.method=excae", "model.excae.base=tmass",
                                  "model.excae.base_options={num_frames: ${data.num_frames}}")),
    Variant("ExCae over UCoFIA", ("model.method=excae", "model.excae.base=ucofia"),
            {" (no SK)": {"sinkhorn_iters": 0}, " + SK": {"sinkhorn_iters": 4}}),
    Variant("ExCae over VoP (full)", ("model.method=excae", "model.excae.base=vop",
                                      "model.excae.base_options={variant: full, num_frames: ${data.num_frames}}")),
)
METRICS = ("t2v_R1", "t2v_R5", "t2v_R10", "t2v_MnR", "v2t_R1", "v2t_R5")


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


@contextmanager
def maybe_lock(path: str | None) -> Iterator[None]:
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_overrides(variant: Variant, seed: int, work_dir: Path, user: list[str]) -> list[str]:
    """BUDGET < variant < user overrides; ``${data.num_frames}`` in a variant is filled from the
    budget and user overrides (methods with their own frame count must match the data's)."""
    frames = next((o.split("=", 1)[1] for o in reversed([*BUDGET, *user]) if o.startswith("data.num_frames=")), "8")
    own = [o.replace("${data.num_frames}", frames) for o in variant.overrides]
    return [*BUDGET, *own, *user, f"run.seed={seed}", f"run.name=bench-{slug(variant.label)}-s{seed}",
            f"run.work_dir={work_dir}", "tracking.experiment=bench-methods"]


def trainable_params(method) -> int:
    return sum(p.numel() for p in method.parameters() if p.requires_grad)


def run_one(variant: Variant, seed: int, work_dir: Path, user: list[str]) -> list[dict[str, Any]]:
    """Train one (variant, seed), evaluate each inference setting; rows for results.jsonl."""
    import ray
    import torch

    from tvr.backbone import ClipBackbone
    from tvr.methods import build_method
    from tvr_platform.config import load_job
    from tvr_platform.recipes import embed_split, ensure_synthetic, load_eval_target, train
    from tvr_platform.report.scoring import evaluate_method

    job = load_job(None, resolve_overrides(variant, seed, work_dir, user))
    ensure_synthetic(job)
    built = build_method(job.model.method, job.method_cfg, ClipBackbone(job.model.backbone))
    params, total = trainable_params(built), sum(p.numel() for p in built.parameters())
    del built
    t0 = time.time()
    try:
        report = train(job, register=False)
        wall = time.time() - t0
        _, method = load_eval_target(_spec_for(job), [])
        text, video, caption_video = embed_split(job, method, job.data.test_split)
        rows = []
        search = two_stage_recall(method, text, video, caption_video)
        for suffix, settings in variant.evals.items():
            with torch.no_grad():
                metrics, _ = evaluate_method(method, text, video, caption_video, block=job.eval.block_size,
                                             dsl=bool(settings.get("dsl", False)),
                                             sinkhorn_iters=int(settings.get("sinkhorn_iters", 0)))
            rows.append({"variant": variant.label + suffix, "seed": seed, "method": job.model.method,
                         "metrics": metrics, "train_metrics": report["metrics"], "trainable_params": params,
                         "total_params": total, "wall_s": wall, "epochs": job.train.epochs,
                         **({"two_stage": search} if not settings else {})})
        return rows
    finally:
        ray.shutdown()


def two_stage_recall(method, text, video, caption_video, *, fraction: float = 0.25) -> dict[str, Any]:
    """t2v R@1 / R@5 of ``tvr search`` exhaustive vs two-stage (coarse stage keeps ``fraction`` of
    the clips, at least 5), on the evaluation features: the recall the two-stage search loses."""
    from tvr_platform.search import Searcher, VideoIndex, topk_overlap

    n_v = int(caption_video.max()) + 1
    index = VideoIndex(uri="mem://", meta={}, ids=[str(i) for i in range(n_v)], features=video)
    searcher = Searcher(method, index)
    cand = min(n_v, max(5, int(n_v * fraction)))
    k = min(5, cand)
    _, exhaustive = searcher.search_features(text, top_k=k)
    _, two = searcher.search_features(text, top_k=k, candidates=cand)
    gt = caption_video[:, None]
    out: dict[str, Any] = {"candidates": cand, "clips": n_v, "topk_kept": topk_overlap(exhaustive, two)}
    for name, rows in (("exhaustive", exhaustive), ("two_stage", two)):
        for r in (1, k):
            out[f"{name}_R{r}"] = float((rows[:, :r] == gt).any(dim=1).double().mean() * 100)
    return out


def _spec_for(job) -> str:
    """Write the resolved job next to its exports, so ``load_eval_target`` can read it back."""
    from tvr_platform.config import job_to_yaml

    path = Path(job.work_dir) / "exports" / job.run.name / "job.yaml"
    path.write_text(job_to_yaml(job))
    return str(path)


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_benchmark(seeds: list[int], work_dir: Path, user: list[str], *, only: list[str] | None = None,
                  lock: str | None = None, log=print) -> list[dict[str, Any]]:
    """Train and evaluate every selected variant for every seed (skipping finished ones)."""
    out = work_dir / "results.jsonl"
    work_dir.mkdir(parents=True, exist_ok=True)
    variants = [v for v in VARIANTS if not only or any(o.lower() in v.label.lower() for o in only)]
    if not variants:
        raise ValueError(f"--only {only}: matches none of {[v.label for v in VARIANTS]}")
    for v in variants:
        for seed in seeds:
            done = {(r["variant"], r["seed"]) for r in read_results(out)}
            if all((v.label + s, seed) in done for s in v.evals):
                continue
            log(f"[bench] {v.label} seed {seed} ...")
            with maybe_lock(lock):
                rows = run_one(v, seed, work_dir, user)
            with out.open("a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            log(f"[bench] {v.label} seed {seed}: t2v_R1 {rows[0]['metrics']['t2v_R1']:.1f}, {rows[0]['wall_s']:.0f}s")
    return read_results(out)


def _mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def _fraction(row: dict[str, Any]) -> str:
    total = row.get("total_params")
    if not total:
        return "n/a"
    return f"{100 * row['trainable_params'] / total:.3g}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Mean ± sample std over seeds per variant, in the order of ``VARIANTS``."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    order = [v.label + s for v in VARIANTS for s in v.evals]
    head = ("| method | seeds | " + " | ".join(METRICS) + " | trainable params | trainable % | train wall s |\n"
            "|---|---|" + "---|" * len(METRICS) + "---|---|---|\n")
    lines = []
    for label in [x for x in order if x in by] + sorted(set(by) - set(order)):
        rs = sorted(by[label], key=lambda r: r["seed"])
        cells = [_mean_std([r["metrics"][m] for r in rs]) for m in METRICS]
        lines.append(f"| {label} | {len(rs)} | " + " | ".join(cells)
                     + f" | {rs[0]['trainable_params']:,} | {_fraction(rs[0])} | {_mean_std([r['wall_s'] for r in rs])} |")
    table = head + "\n".join(lines) + "\n"
    searched = [label for label in [x for x in order if x in by] if all("two_stage" in r for r in by[label])]
    if searched:
        table += ("\nTwo-stage search (`tvr search --candidates C`: coarse cosine stage keeps C clips, the "
                  "method reranks them) vs exhaustive, t2v on the same test split:\n\n"
                  "| method | C / clips | R@1 exhaustive | R@1 two-stage | R@5 exhaustive | R@5 two-stage "
                  "| top-5 kept |\n|---|---|---|---|---|---|---|\n")
        for label in searched:
            ts = [r["two_stage"] for r in by[label]]
            table += (f"| {label} | {ts[0]['candidates']} / {ts[0]['clips']} | "
                      + " | ".join(_mean_std([t[k] for t in ts]) for k in
                                   ("exhaustive_R1", "two_stage_R1", "exhaustive_R5", "two_stage_R5"))
                      + f" | {_mean_std([100 * t['topk_kept'] for t in ts])}% |\n")
    return table
