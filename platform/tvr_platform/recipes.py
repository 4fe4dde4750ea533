"""Top-to-bottom recipes behind the CLI: quickstart, train, eval.

Each reads like a script: load the job, prepare data, run, log, print where to look.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from tvr_platform.config import JobCfg, load_job, load_stored_job


def print_table(title: str, rows: dict[str, Any]) -> None:
    if not rows:
        print(f"\n{title}: no metrics recorded")
        return
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


def train(job: JobCfg, *, register: bool | None = None, force: bool = False) -> dict[str, Any]:
    """Train ``job`` (resuming its run when it has the same identity), log the final metrics,
    register when asked; a run that is already complete is reported, not retrained or re-registered."""
    from tvr_platform import logs
    from tvr_platform.registry import promote, register_model
    from tvr_platform.runs import (
        COMPLETE_TAG,
        REGISTERED_TAG,
        check_resume,
        completed_report,
        is_complete,
        split_chance,
    )
    from tvr_platform.train.trainer import run_training

    if (job.model.backbone.pretrained or "").startswith("models:/"):
        # A registered backbone (`tvr pretrain`): the driver builds the method too (registration,
        # evaluation), so resolve it to its local checkpoint once, here, for driver and workers.
        from tvr_platform.train.trainer import resolve_pretrained

        job.model.backbone.pretrained = resolve_pretrained(job)
    existing = check_resume(job)  # raises RunMismatch (one line) before any Ray work
    logs.attach(job.work_dir)
    if existing is not None and is_complete(job, existing):
        return completed_report(job, existing)
    t0 = time.time()
    result = run_training(job)
    wall = time.time() - t0
    metrics, val = final_metrics(result)
    tracker = result.tracker
    # final/val/* (the selected epoch's validation scores: what Tune ranks and promotion compares),
    # final/test/* (logged by the workers: that epoch's weights on the test split, once), and
    # <split>/* (the names `tvr eval` logs too)
    loss = (result.val_metrics or {}).get("train_loss")
    tracker.log_metrics({f"final/val/{k}": v for k, v in val.items()} | {"final/wall_s": wall}
                        | ({"final/train_loss": loss} if loss is not None else {})
                        | {f"{job.data.test_split}/{k}": v for k, v in metrics.items()})
    epoch = (result.selected_epoch if result.selected_epoch is not None else job.train.epochs - 1) + 1
    report = {"run": job.run.name, "method": job.model.method, "metrics": metrics, "val_metrics": val,
              "selected_epoch": epoch, "wall_s": wall, "checkpoint": result.checkpoint_path}
    name = job.tracking.registered_model
    if (register is None and name) or register:
        if result.weights_path is None:
            raise RuntimeError("training finished without exported weights; nothing to register")
        name = name or f"tvr-{job.model.method}"
        with logs.captured():  # MLflow prints "Successfully registered model ..." itself
            version = register_model(job, result.weights_path, tracker.run_id, name=name,
                                     metrics=version_metrics(val, metrics, loss), epoch=epoch,
                                     tags={"git_commit": tracker.client.get_run(tracker.run_id).data.tags.get(
                                         "tvr.git_commit", "unknown")})
        decision = promote(job.tracking_uri, name, version, champion=job.tracking.alias,
                           metric=job.train.select_metric, mode=job.train.select_mode,
                           chance=split_chance(job, job.train.select_metric), force=force)
        report["registered"] = {"name": name, "version": version, **decision}
        tracker.set_tags({REGISTERED_TAG: f"{name}/{version}"})
    tracker.log_dict(report, "report/train.json")
    log_learning_curves(job, tracker)
    tracker.set_tags({COMPLETE_TAG: "true"})
    tracker.terminate("FINISHED")
    report["mlflow"] = tracker.url()
    return report


def final_metrics(result) -> tuple[dict[str, float], dict[str, float]]:
    """(test, validation) scores of a run's selected epoch, in METRIC_ORDER's names."""
    test = {k: v for k, v in (result.test_metrics or {}).items() if k in METRIC_ORDER}
    val = {k: v for k, v in (result.val_metrics or {}).items() if k in METRIC_ORDER}
    return test, val


def version_metrics(val: dict[str, float], test: dict[str, float], train_loss: float | None = None
                    ) -> dict[str, float]:
    """The metrics a registered version records: ``val/<k>`` (compared at promotion), ``test/<k>``
    and the selected epoch's ``train_loss``."""
    return ({f"val/{k}": v for k, v in val.items()} | {f"test/{k}": v for k, v in test.items()}
            | ({"train_loss": train_loss} if train_loss is not None else {}))


def log_learning_curves(job: JobCfg, tracker) -> None:
    """plots/learning_curves.png on the training run: per-epoch training loss and R@1 by step."""
    from tvr_platform.report.plots import learning_curves

    history = {name: [(m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, name)]
               for name in ("train_loss", "val/t2v_R1")}
    out = Path(job.work_dir) / "reports" / job.run.name / "learning_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    learning_curves(history, f"{job.run.name}: {job.model.method} on {job.model.backbone.name}", out)
    tracker.log_artifact(out, "plots")


def check_model_uri(model_uri: str, tracking_uri: str) -> None:
    """``models:/name@alias`` or ``models:/name/version`` must name a registered version: else one
    line (a ConfigError) naming what exists. Reads only: a missing SQLite store is not created."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tvr_platform.config import ConfigError

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).exists():
        raise ConfigError(f"{model_uri}: no MLflow store at {tracking_uri} (nothing trained or registered from "
                          "this run.work_dir yet; set run.work_dir=... or tracking.uri=...)")
    ref = model_uri[len("models:/"):]
    name, _, alias = ref.partition("@")
    version = None
    if not alias:
        name, _, version = ref.rpartition("/")
    client = MlflowClient(tracking_uri)
    try:
        if alias:
            client.get_model_version_by_alias(name, alias)
        else:
            client.get_model_version(name, version)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=20))
        raise ConfigError(f"{model_uri}: no such registered model version in {tracking_uri} "
                          f"(registered models: {', '.join(known) or 'none'})") from None


def load_eval_target(target: str, overrides: list[str], tracking_uri: str | None = None
                     ) -> tuple[JobCfg, torch.nn.Module]:
    """A registered model (models:/name@alias) or a job spec's exported weights -> (job, method)."""
    from tvr_platform.registry import build_from_artifacts, download_model

    if target.startswith("models:/"):
        base = load_job(None, overrides)
        check_model_uri(target, tracking_uri or base.tracking_uri)
        job_file, weights = download_model(target, tracking_uri or base.tracking_uri)
        # The registry's spec: no resolvers; this command's data root / storage / tracking win.
        job = load_stored_job(job_file, overrides, caller=base, where=target)
        job, method = build_from_artifacts(job_file, weights, job)
        return job, method.eval()
    job = load_job(target, overrides)
    weights = Path(job.work_dir) / "exports" / job.run.name / "model.pt"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: no exported weights for run {job.run.name!r}; train it first")
    from tvr.backbone import ClipBackbone
    from tvr.methods import build_method

    method = build_method(job.model.method, job.method_cfg, ClipBackbone(job.model.backbone))
    method.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return job, method.eval()


def embed_split(job: JobCfg, method: torch.nn.Module, split: str):
    """Embed every video and caption of ``split`` -> (text, video, caption_video).

    Videos: Ray Data batch inference (decode actors, then :class:`~tvr_platform.evaluation.EmbedVideos`
    actors: one GPU each when the cluster has GPUs, else one CPU actor). Captions: in the driver,
    on its first GPU when it has one."""
    from tvr_platform.data.pipeline import frame_norm, load_manifest, tokenize_captions, video_dataset
    from tvr_platform.evaluation import embed_texts, embed_videos_ray, eval_device
    from tvr_platform.train.step import RetrievalStep
    from tvr_platform.train.trainer import init_ray

    manifest = load_manifest(job, split)
    init_ray(job)
    method.cpu()
    video = embed_videos_ray(method, video_dataset(job, manifest), num_videos=len(manifest.video_ids),
                             batch_size=job.data.eval_batch_size, job=job, norm=frame_norm(job))
    device = eval_device()                                   # a GPU of this host when there is one
    model = RetrievalStep(method, gather=lambda x: x).to(device)
    try:
        texts, caption_video = tokenize_captions(job, manifest)
        text = embed_texts(model, texts, job.data.eval_batch_size, device)
    finally:
        method.cpu()                                         # features come back on CPU, so does the model
    return text, video, caption_video


def embed_captions(job: JobCfg, method: torch.nn.Module, split: str):
    """Every caption of ``split`` embedded (the SK bank of the official UCoFIA evaluation)."""
    from dataclasses import replace

    from tvr_platform.data.pipeline import load_manifest, tokenize_captions
    from tvr_platform.evaluation import embed_texts
    from tvr_platform.train.step import RetrievalStep

    all_captions = replace(job, data=replace(job.data, eval_captions="all"))
    texts, _ = tokenize_captions(all_captions, load_manifest(job, split))
    return embed_texts(RetrievalStep(method, gather=lambda x: x), texts, job.data.eval_batch_size, "cpu")


PROTOCOLS = {"first": "one caption per clip (first; MSR-VTT 1k-A)",
             "all": "all captions (multi-caption: MSVD, VATEX, MSR-VTT full)"}


def protocol_name(job: JobCfg) -> str:
    """The evaluation protocol a report's numbers follow, in words."""
    words = PROTOCOLS.get(job.data.eval_captions, job.data.eval_captions)
    if job.data.format in ("didemo", "activitynet"):
        words += f"; {job.data.format} captions are paragraphs (paragraph-to-video retrieval)"
    return f"{words}; v2t rank over {job.eval.v2t_rank}" + (f", DSL v2t over {job.eval.dsl_v2t}" if job.eval.dsl else "")


def sinkhorn_override(target: str, overrides: list[str], iters: int) -> str:
    """``tvr eval --sinkhorn N``: the method's own SK key where it has one (UCoFIA), else eval.sinkhorn_iters."""
    if target.startswith("models:/"):
        method = next((o.split("=", 1)[1] for o in overrides if o.startswith("model.method=")), None)
        if method is None:
            from tvr_platform.registry import download_model

            job_file, _ = download_model(target, load_job(None, overrides).tracking_uri)
            method = load_job(job_file, stored=True).model.method
    else:
        method = load_job(target, overrides).model.method
    from tvr.methods import get_spec

    has_own = "sinkhorn_iters" in {f.name for f in fields(get_spec(method).config_cls)}
    return f"model.{method}.sinkhorn_iters={iters}" if has_own else f"eval.sinkhorn_iters={iters}"


def eval_report(job: JobCfg, method: torch.nn.Module, text, video, caption_video, meta: dict[str, Any],
                *, sample: int = 24, bank_text=None) -> dict[str, Any]:
    """Metrics (with the job's DSL / Sinkhorn-Knopp settings) + curves, similarity sample, gap."""
    from tvr_platform.evaluation import own_sinkhorn
    from tvr_platform.report import build_report, global_embeddings, modality_gap, sample_similarity
    from tvr_platform.report.scoring import evaluate_method, pair_scorer

    iters = getattr(job.method_cfg, "sinkhorn_iters", job.eval.sinkhorn_iters or None) if own_sinkhorn(method) \
        else job.eval.sinkhorn_iters
    from tvr_platform.evaluation import eval_device, score_block

    device = eval_device()                                   # tiles scored on a GPU when there is one
    try:
        _, ranks = evaluate_method(method.to(device), text, video, caption_video,
                                   block=score_block(job.eval.block_size, device, text, video),
                                   dsl=job.eval.dsl, sinkhorn_iters=iters, v2t_rank=job.eval.v2t_rank,
                                   dsl_v2t=job.eval.dsl_v2t, bank_text=bank_text, device=device)
    finally:
        method.cpu()
    sim = sample_similarity(pair_scorer(method, text, video), caption_video, sample)
    try:
        gap = modality_gap(*global_embeddings(text, video), seed=job.run.seed)
    except (KeyError, ValueError) as err:  # a method without one global embedding per side
        gap = {"error": str(err)}
    report = build_report(ranks, meta, similarity=sim, gap=gap)
    if "error" in gap:
        report.pop("modality_gap")
        report["meta"]["modality_gap_skipped"] = gap["error"]
    return report


def eval_run_name(target: str, job: JobCfg, tracking_uri: str) -> tuple[str, dict[str, str]]:
    """``eval-<model>-v<version>-<split>`` for a registered model (the alias resolved to its version),
    ``eval-<run.name>-<split>`` for a spec's exported weights; plus the tags linking the run to it."""
    split = job.data.test_split
    if not target.startswith("models:/"):
        return f"eval-{job.run.name}-{split}", {"tvr.eval_of_run": job.run.name}
    from tvr_platform.search.index import pin_model_version

    pinned = pin_model_version(target, tracking_uri)
    name, version = pinned[len("models:/"):].rsplit("/", 1)
    from mlflow.tracking import MlflowClient

    mv = MlflowClient(tracking_uri).get_model_version(name, version)
    return f"eval-{name}-v{version}-{split}", {"tvr.model_uri": target, "tvr.model_name": name,
                                                 "tvr.model_version": version, "tvr.model_run_id": mv.run_id or ""}


def evaluate_model(target: str, overrides: list[str], tracking_uri: str | None = None) -> dict[str, Any]:
    """Evaluate a registered model (models:/name@alias) or a job spec's exported weights: JSON report
    + PNG plots under a new ``<work_dir>/reports/<eval run name>-<UTC time>/``, logged to a new MLflow
    run named ``eval-<model>-v<version>-<split>``, linked to the model version (tags both ways), with
    the metric names of training runs (``<split>/t2v_R1``, ...)."""
    from tvr_platform import logs
    from tvr_platform.evaluation import own_sinkhorn, sinkhorn_form
    from tvr_platform.report import write_plots
    from tvr_platform.tracking import start_run

    job, method = load_eval_target(target, overrides, tracking_uri)
    logs.attach(job.work_dir)
    split = job.data.test_split
    run_name, link = eval_run_name(target, job, tracking_uri or job.tracking_uri)
    tracker = start_run(job, run_name=f"{run_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    tracker.client.set_tag(tracker.run_id, "mlflow.runName", run_name)
    tracker.set_tags({**link, "tvr.eval_split": split})
    try:
        text, video, caption_video = embed_split(job, method, split)
        own = own_sinkhorn(method)
        own_iters = getattr(job.method_cfg, "sinkhorn_iters", job.eval.sinkhorn_iters or None) if own else None
        bank_text = None
        if own and own_iters and job.eval.sinkhorn_bank == "train":
            bank_text = embed_captions(job, method, job.data.train_split)
        meta = {"target": target, "method": job.model.method, "backbone": job.model.backbone.name,
                "split": split, "dataset": job.dataset_uri, "num_videos": int(caption_video.max()) + 1,
                "num_texts": int(caption_video.numel()), "dsl": job.eval.dsl,
                "sinkhorn_iters": own_iters if own else job.eval.sinkhorn_iters,
                "sinkhorn": sinkhorn_form(method, sinkhorn_iters=job.eval.sinkhorn_iters, own_iters=own_iters,
                                          bank=bank_text is not None),
                "protocol": protocol_name(job), "model": link.get("tvr.model_name"),
                "model_version": link.get("tvr.model_version")}
        full = eval_report(job, method, text, video, caption_video, meta, bank_text=bank_text)
        out_dir = Path(job.work_dir) / "reports" / f"{run_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        base, i = out_dir, 2
        while out_dir.exists():  # never overwrite an earlier report (two evals within a second)
            out_dir, i = base.with_name(f"{base.name}.{i}"), i + 1
        out_dir.mkdir(parents=True)
        out = out_dir / "eval.json"
        out.write_text(json.dumps(full, indent=1))
        plots = write_plots(full, out_dir)
        tracker.log_metrics({f"{split}/{k}": v for k, v in full["metrics"].items()})
        tracker.log_artifact(out, "report")
        for p in plots:
            tracker.log_artifact(p, "report/plots")
        if link.get("tvr.model_version"):
            from mlflow.tracking import MlflowClient

            MlflowClient(tracker.tracking_uri).set_model_version_tag(
                link["tvr.model_name"], link["tvr.model_version"], f"eval_run.{split}", tracker.run_id)
    except BaseException:
        tracker.terminate("FAILED")
        raise
    tracker.terminate()
    report = {**meta, "metrics": full["metrics"], "report_file": str(out), "run_name": run_name,
              "plots": [str(p) for p in plots], "mlflow": tracker.url()}
    if "modality_gap" in full:
        report["modality_gap"] = full["modality_gap"]["gap"]
    return report
