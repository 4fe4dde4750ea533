"""Top-to-bottom recipes behind the CLI: quickstart, train, eval.

Each reads like a script: load the job, prepare data, run, log, print where to look.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tvr_platform.config import JobCfg, load_job


def print_table(title: str, rows: dict[str, Any]) -> None:
    width = max(len(k) for k in rows)
    print(f"\n{title}\n" + "-" * (width + 14))
    for k, v in rows.items():
        print(f"{k:<{width}}  {v:>10.2f}" if isinstance(v, float) else f"{k:<{width}}  {v!s:>10}")


METRIC_ORDER = [f"{d}_{m}" for d in ("t2v", "v2t") for m in ("R1", "R5", "R10", "MdR", "MnR")]


def ensure_synthetic(job: JobCfg) -> None:
    """Generate the synthetic MSR-VTT-format set at ``job.dataset_uri`` unless it is there."""
    from tvr_platform.data.pipeline import dataset_storage, synth_dataset

    if not dataset_storage(job).exists("MSRVTT_data.json"):
        synth_dataset(job)


def train(job: JobCfg, *, register: bool | None = None) -> dict[str, Any]:
    from tvr_platform.registry import promote, register_model
    from tvr_platform.train.trainer import run_training

    t0 = time.time()
    result = run_training(job)
    wall = time.time() - t0
    metrics = {k: v for k, v in result.metrics.items() if k in METRIC_ORDER}
    tracker = result.tracker
    tracker.log_metrics({f"final/{k}": v for k, v in metrics.items()} | {"final/wall_s": wall})
    report = {"run": job.run.name, "method": job.model.method, "metrics": metrics, "wall_s": wall,
              "checkpoint": result.checkpoint_path}
    name = job.tracking.registered_model
    if (register is None and name) or register:
        if result.weights_path is None:
            raise RuntimeError("training finished without exported weights; nothing to register")
        name = name or f"tvr-{job.model.method}"
        version = register_model(job, result.weights_path, tracker.run_id, name=name, metrics=metrics,
                                 tags={"git_commit": tracker.client.get_run(tracker.run_id).data.tags.get(
                                     "tvr.git_commit", "unknown")})
        decision = promote(job.tracking_uri, name, version, champion=job.tracking.alias)
        report["registered"] = {"name": name, "version": version, **decision}
    tracker.log_dict(report, "report/train.json")
    tracker.terminate("FINISHED")
    report["mlflow"] = tracker.url()
    return report


def evaluate_model(target: str, overrides: list[str], tracking_uri: str | None = None) -> dict[str, Any]:
    """Evaluate a registered model (models:/name@alias) or a job spec's exported weights."""
    from tvr_platform.data.pipeline import load_manifest, tokenize_captions, video_dataset
    from tvr_platform.evaluation import embed_texts, embed_videos, evaluate, order_by_index
    from tvr_platform.registry import build_from_artifacts, download_model
    from tvr_platform.tracking import start_run
    from tvr_platform.train.step import RetrievalStep
    from tvr_platform.train.trainer import init_ray

    if target.startswith("models:/"):
        base = load_job(None, overrides)
        job_file, weights = download_model(target, tracking_uri or base.tracking_uri)
        job, method = build_from_artifacts(job_file, weights)
        if overrides:  # e.g. a different split, eval flags or data root for the same model
            job = load_job(job_file, overrides)
    else:
        job = load_job(target, overrides)
        weights = Path(job.work_dir) / "exports" / job.run.name / "model.pt"
        if not weights.exists():
            raise FileNotFoundError(f"{weights}: no exported weights for run {job.run.name!r}; train it first")
        from tvr.backbone import ClipBackbone
        from tvr.methods import build_method

        method = build_method(job.model.method, job.method_cfg, ClipBackbone(job.model.backbone))
        method.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    method.eval()
    model = RetrievalStep(method, gather=lambda x: x)
    manifest = load_manifest(job, job.data.test_split)
    init_ray(job)
    video, index = embed_videos(model, video_dataset(job, manifest).iter_torch_batches(
        batch_size=job.data.eval_batch_size), "cpu")
    video = order_by_index(video, index, len(manifest.video_ids))
    texts, caption_video = tokenize_captions(job, manifest)
    text = embed_texts(model, texts, job.data.eval_batch_size, "cpu")
    metrics, ranks = evaluate(model, text, video, caption_video, block=job.eval.block_size,
                              dsl=job.eval.dsl, sinkhorn_iters=job.eval.sinkhorn_iters)
    report = {"target": target, "method": job.model.method, "split": job.data.test_split,
              "num_videos": len(manifest.video_ids), "num_texts": int(texts.shape[0]),
              "dsl": job.eval.dsl, "sinkhorn_iters": job.eval.sinkhorn_iters, "metrics": metrics}
    tracker = start_run(job, run_name=f"eval-{job.run.name}-{int(time.time())}")
    tracker.log_metrics(metrics)
    tracker.log_dict(report, "report/eval.json")
    tracker.terminate()
    out = Path(job.work_dir) / "reports" / f"eval-{job.run.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    report["report_file"] = str(out)
    return report
