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

The regime the papers work in: every variant starts from a *pre-trained* backbone (``backbone=
"auto"``: ``tvr pretrain`` with ``PRETRAIN_BUDGET`` once, into the benchmark's work dir; or a
checkpoint path / ``models:/`` URI; ``"none"`` = random init), fine-tuned on video with its paper's
learning-rate split (``LR_SPLITS``; VoP keeps the backbone frozen, as in its paper), plus one
random-init meanP row as the reference the pre-training must beat. The video set has mixed captions
(``data.synth.captions=mixed``): each query is tagged static or temporal, and every metric is also
reported per type, with *twin accuracy*: the share of temporal queries whose clip scores above its
time-reversed twin (50 % for any permutation-invariant pooling of frames, which scores both twins
alike; ties count one half).
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
    "data.synth.captions=mixed", "data.num_frames=4", "data.batch_size=16", "data.eval_batch_size=16",
    "data.decode_concurrency=1", "data.decode_num_cpus=0.5", "train.num_workers=0", "train.cpus_per_worker=1",
    "train.epochs=8", "train.lr=3e-4", "train.backbone_lr=3e-4", "train.warmup_steps=2", "train.weight_decay=0.05",
]
"""The small default budget: runs on a 2-core CPU box (tvr-tiny, 72 train / 24 test clips = 36 / 12
time-reversed twin pairs, 12 frames a clip, 4 sampled, 8 epochs = 32 steps). The learning rates
here are only the fallback; each variant sets its paper's split (``LR_SPLITS``)."""

PRETRAIN_BUDGET = [
    "model.backbone.name=tvr-tiny", "data.synth.num_clips=512", "data.synth.seconds=1.0", "data.synth.size=32",
    "data.synth.captions=static", "data.synth.seed=1000", "train.epochs=12", "train.lr=1e-3",
    "train.backbone_lr=1e-3", "run.name=bench-pretrain", "tracking.experiment=bench-pretrain",
    "tracking.registered_model=tvr-backbone-bench",
]
"""``tvr pretrain`` for the benchmark (jobs/pretrain.yaml + these): 384 train / 128 held-out clips
of another seed, static captions only, one frame per clip per epoch."""

# Each paper's (head lr, backbone lr), scaled x30 for this 32-step budget (the papers fine-tune for
# thousands of steps): X-Pool and T-MASS 3e-5 / 1e-6 (ratio 30), CLIP4Clip meanP and UCoFIA (built
# on CLIP4Clip) lr 1e-4 with coef_lr 1e-3 -> backbone 1e-7 (ratio 1000); VoP trains only its
# prompts (backbone frozen); ExCae follows X-Pool's split.
LR_SPLITS: dict[str, tuple[float, float]] = {
    "meanp": (3e-3, 3e-6), "xpool": (9e-4, 3e-5), "tmass": (9e-4, 3e-5), "ucofia": (3e-3, 3e-6),
    "vop": (3e-3, 0.0), "excae": (9e-4, 3e-5),
}
RANDOM_INIT_LR = (3e-4, 3e-4)
"""The random-init reference row keeps the previous budget's lr (1e-3 collapsed training from scratch)."""


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]
    evals: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})
    """Inference settings: label suffix -> {eval.* key: value}."""


def _lr(method: str) -> tuple[str, ...]:
    head, backbone = LR_SPLITS[method]
    return (f"train.lr={head:g}", f"train.backbone_lr={backbone:g}")


VARIANTS: tuple[Variant, ...] = (
    Variant("meanP, random init", ("model.method=meanp", "model.backbone.pretrained=null",
                                   f"train.lr={RANDOM_INIT_LR[0]:g}", f"train.backbone_lr={RANDOM_INIT_LR[1]:g}")),
    Variant("meanP (CLIP4Clip)", ("model.method=meanp", *_lr("meanp"))),
    Variant("X-Pool", ("model.method=xpool", *_lr("xpool"))),
    Variant("T-MASS", ("model.method=tmass", "model.tmass.num_frames=${data.num_frames}", *_lr("tmass"))),
    Variant("UCoFIA", ("model.method=ucofia", *_lr("ucofia")),
            {" (no SK)": {"sinkhorn_iters": 0}, " + SK": {"sinkhorn_iters": 4}}),
    Variant("VoP-P", ("model.method=vop", "model.vop.variant=P", "model.vop.num_frames=${data.num_frames}", *_lr("vop"))),
    Variant("VoP-C", ("model.method=vop", "model.vop.variant=C", "model.vop.num_frames=${data.num_frames}", *_lr("vop"))),
    Variant("VoP-F", ("model.method=vop", "model.vop.variant=F", "model.vop.num_frames=${data.num_frames}", *_lr("vop"))),
    Variant("VoP (full)", ("model.method=vop", "model.vop.variant=full", "model.vop.num_frames=${data.num_frames}",
                           *_lr("vop"))),
    Variant("ExCae ECS", ("model.method=excae", *_lr("excae"))),
    # ECS inside each base's video representation (model.excae.plugin=representation, the default),
    # trained with the base's own lr split, so the row differs from the base's only by ExCae
    Variant("ExCae over meanP", ("model.method=excae", "model.excae.base=meanp", *_lr("meanp"))),
    Variant("ExCae over X-Pool", ("model.method=excae", "model.excae.base=xpool", *_lr("xpool"))),
    Variant("ExCae over T-MASS", ("model.method=excae", "model.excae.base=tmass",
                                  "model.excae.base_options={num_frames: ${data.num_frames}}", *_lr("tmass"))),
    Variant("ExCae over UCoFIA", ("model.method=excae", "model.excae.base=ucofia", *_lr("ucofia")),
            {" (no SK)": {"sinkhorn_iters": 0}, " + SK": {"sinkhorn_iters": 4}}),
    Variant("ExCae over VoP (full)", ("model.method=excae", "model.excae.base=vop",
                                      "model.excae.base_options={variant: full, num_frames: ${data.num_frames}}",
                                      *_lr("vop"))),
)
METRICS = ("t2v_R1", "t2v_R5", "t2v_R10", "t2v_MnR", "v2t_R1", "v2t_R5")
TYPE_METRICS = ("static_t2v_R1", "static_t2v_R5", "temporal_t2v_R1", "temporal_t2v_R5", "temporal_twin_acc")
TYPE_HEADERS = ("static R1", "static R5", "temporal R1", "temporal R5", "twin acc")


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


def resolve_overrides(variant: Variant, seed: int, work_dir: Path, user: list[str],
                      backbone: str | None = None) -> list[str]:
    """BUDGET < pre-trained backbone < variant < user overrides; ``${data.num_frames}`` in a variant
    is filled from the budget and user overrides (methods with their own frame count must match the
    data's). The video set lives in the benchmark's own folder, one per caption mode."""
    merged = [*BUDGET, *user]
    frames = next((o.split("=", 1)[1] for o in reversed(merged) if o.startswith("data.num_frames=")), "8")
    mode = next((o.split("=", 1)[1] for o in reversed(merged) if o.startswith("data.synth.captions=")), "events")
    own = [o.replace("${data.num_frames}", frames) for o in variant.overrides]
    start = [f"model.backbone.pretrained={backbone}"] if backbone else []
    return [*BUDGET, f"data.root={work_dir / 'datasets' / f'synthetic-{mode}'}", *start, *own, *user,
            f"run.seed={seed}", f"run.name=bench-{slug(variant.label)}-s{seed}",
            f"run.work_dir={work_dir}", "tracking.experiment=bench-methods"]


def pretrained_backbone(work_dir: Path, user: list[str], backbone: str, *, log=print) -> str | None:
    """The backbone every variant starts from, as a local open_clip checkpoint path (None = random
    init). ``auto``: pre-train once with ``PRETRAIN_BUDGET`` (+ the user's ``model.backbone.name``)
    into ``<work_dir>/pretrain`` and reuse it on later runs."""
    from tvr_platform.config import load_job
    from tvr_platform.train.trainer import resolve_pretrained

    if backbone == "none":
        return None
    if backbone != "auto":
        job = load_job(None, [*BUDGET, *user, f"model.backbone.pretrained={backbone}", f"run.work_dir={work_dir}"])
        path = resolve_pretrained(job)
        if not path or not Path(path).is_file():
            raise FileNotFoundError(f"--backbone {backbone}: not a checkpoint file or registered backbone")
        return path
    import ray

    from tvr_platform.pretrain.recipe import CHECKPOINT, load_pretrain_job, pretrain

    names = [o for o in user if o.startswith("model.backbone.name=")]
    job = load_pretrain_job(None, [*PRETRAIN_BUDGET, *names, f"run.work_dir={work_dir / 'pretrain'}"])
    ckpt = Path(job.work_dir) / "exports" / job.run.name / CHECKPOINT
    if not ckpt.exists():
        log(f"[bench] pre-training the backbone ({job.model.backbone.name}, static captions) ...")
        t0 = time.time()
        try:
            report = pretrain(job)
        finally:
            ray.shutdown()
        log(f"[bench] pre-trained in {time.time() - t0:.0f}s: held-out static t2v_R1 "
            f"{report['metrics'].get('t2v_R1', float('nan')):.1f}")
    return str(ckpt)


def caption_types(job, manifest) -> list[str]:
    """The type ("static" / "temporal") of every evaluation caption, in evaluation order, from the
    generator's ``caption_types.json`` ("untyped" for data without one)."""
    from tvr.data.synthetic import CAPTION_TYPES_FILE
    from tvr_platform.data.pipeline import dataset_storage

    st = dataset_storage(job)
    if not st.exists(CAPTION_TYPES_FILE):
        return ["untyped"] * len(manifest.captions)
    types = json.loads(st.read_text(CAPTION_TYPES_FILE))
    sentences = json.loads(st.read_text("MSRVTT_data.json"))["sentences"]
    per_video: dict[str, list[str]] = {}
    for sen in sentences:
        per_video.setdefault(sen["video_id"], []).append(sen["caption"])
    lookup = {(v, c): t for v, caps in per_video.items() for c, t in zip(caps, types.get(v, []), strict=False)}
    if job.data.eval_captions == "first":
        caps, vids = manifest.first_captions()
    else:
        caps, vids = manifest.captions, manifest.caption_video
    return [lookup.get((manifest.video_ids[v], c), "untyped") for c, v in zip(caps, vids, strict=True)]


def twin_index(video_ids: list[str]) -> list[int]:
    """Index of each clip's time-reversed twin (``video2k`` <-> ``video2k+1``), -1 if not in the split."""
    where = {v: i for i, v in enumerate(video_ids)}
    out = []
    for v in video_ids:
        n = int(v[5:]) if v.startswith("video") and v[5:].isdigit() else -1
        out.append(where.get(f"video{n ^ 1}", -1) if n >= 0 else -1)
    return out


def per_type_metrics(method, text, video, caption_video, types: list[str], twins: list[int],
                     t2v_ranks) -> dict[str, float]:
    """t2v R@1 / R@5 / MnR over the queries of each caption type (their ranks in the full
    evaluation ``t2v_ranks``, so re-normalisations such as Sinkhorn-Knopp see every query), and the
    temporal twin accuracy on the method's raw similarities."""
    import torch

    from tvr.metrics import summarize
    from tvr_platform.report.scoring import pair_scorer

    out: dict[str, float] = {}
    for kind in sorted(set(types)):
        idx = torch.tensor([j for j, t in enumerate(types) if t == kind])
        m = summarize(t2v_ranks[idx], "t2v")
        out.update({f"{kind}_t2v_{k}": m[f"t2v_{k}"] for k in ("R1", "R5", "MnR")})
    temporal = [j for j, t in enumerate(types) if t == "temporal" and twins[int(caption_video[j])] >= 0]
    if temporal:
        sims = pair_scorer(method, text, video)(torch.tensor(temporal), torch.arange(len(twins)))
        own = torch.tensor([int(caption_video[j]) for j in temporal])
        twin = torch.tensor([twins[i] for i in own.tolist()])
        rows = torch.arange(len(temporal))
        a, b = sims[rows, own], sims[rows, twin]
        out["temporal_twin_acc"] = float(((a > b).double() + 0.5 * (a == b).double()).mean() * 100)
    return out


def trainable_params(method) -> int:
    return sum(p.numel() for p in method.parameters() if p.requires_grad)


def run_one(variant: Variant, seed: int, work_dir: Path, user: list[str],
            backbone: str | None = None) -> list[dict[str, Any]]:
    """Train one (variant, seed), evaluate each inference setting; rows for results.jsonl."""
    import ray
    import torch

    from tvr.backbone import ClipBackbone
    from tvr.methods import build_method
    from tvr_platform.config import load_job
    from tvr_platform.data.pipeline import load_manifest
    from tvr_platform.recipes import embed_split, ensure_synthetic, load_eval_target, train
    from tvr_platform.report.scoring import evaluate_method

    job = load_job(None, resolve_overrides(variant, seed, work_dir, user, backbone))
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
        manifest = load_manifest(job, job.data.test_split)
        types, twins = caption_types(job, manifest), twin_index(manifest.video_ids)
        rows = []
        search = two_stage_recall(method, text, video, caption_video)
        for suffix, settings in variant.evals.items():
            with torch.no_grad():
                metrics, ranks = evaluate_method(method, text, video, caption_video, block=job.eval.block_size,
                                                 dsl=bool(settings.get("dsl", False)),
                                                 sinkhorn_iters=int(settings.get("sinkhorn_iters", 0)))
            metrics.update(per_type_metrics(method, text, video, caption_video, types, twins, ranks.t2v))
            rows.append({"variant": variant.label + suffix, "seed": seed, "method": job.model.method,
                         "backbone": job.model.backbone.pretrained or "random init",
                         "lr": job.train.lr, "backbone_lr": job.train.backbone_lr,
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


def select_variants(only: list[str] | None) -> list[Variant]:
    """``--only``: a label matching exactly (case-insensitive) selects that variant alone, else
    every label containing the substring."""
    if not only:
        return list(VARIANTS)
    chosen = []
    for o in only:
        exact = [v for v in VARIANTS if v.label.lower() == o.lower()]
        chosen += exact or [v for v in VARIANTS if o.lower() in v.label.lower()]
    variants = [v for v in VARIANTS if v in chosen]
    if not variants:
        raise ValueError(f"--only {only}: matches none of {[v.label for v in VARIANTS]}")
    return variants


def run_benchmark(seeds: list[int], work_dir: Path, user: list[str], *, only: list[str] | None = None,
                  lock: str | None = None, backbone: str = "auto", log=print) -> list[dict[str, Any]]:
    """Pre-train the backbone (``backbone="auto"``, once), then train and evaluate every selected
    variant for every seed from it (skipping finished ones)."""
    out = work_dir / "results.jsonl"
    work_dir.mkdir(parents=True, exist_ok=True)
    variants = select_variants(only)
    with maybe_lock(lock):
        start = pretrained_backbone(work_dir, user, backbone, log=log)
    for v in variants:
        for seed in seeds:
            done = {(r["variant"], r["seed"]) for r in read_results(out)}
            if all((v.label + s, seed) in done for s in v.evals):
                continue
            log(f"[bench] {v.label} seed {seed} ...")
            with maybe_lock(lock):
                rows = run_one(v, seed, work_dir, user, start)
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
    typed = [label for label in [x for x in order if x in by] + sorted(set(by) - set(order))
             if all(all(m in r["metrics"] for m in TYPE_METRICS) for r in by[label])]
    if typed:
        table += ("\nPer caption type, t2v over the queries of each type against all test clips (static: what "
                  "one frame shows; temporal: what only the video shows; twin acc: temporal queries whose clip "
                  "scores above its time-reversed twin, 50 = blind to time):\n\n"
                  "| method | " + " | ".join(TYPE_HEADERS) + " |\n|---|" + "---|" * len(TYPE_HEADERS) + "\n")
        for label in typed:
            rs = by[label]
            table += (f"| {label} | " + " | ".join(_mean_std([r["metrics"][m] for r in rs]) for m in TYPE_METRICS)
                      + " |\n")
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
