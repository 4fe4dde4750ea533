"""``tvr pretrain``: CLIP-style image-text contrastive pre-training, then an open_clip checkpoint
registered in MLflow as a backbone.

For a batch of B (frame, caption) pairs with image features f(I_i) and text features g(T_j),

    s_ij = cos(f(I_i), g(T_j)),    L = ½ [CE(s·e^τ, diag) + CE(sᵀ·e^τ, diag)]

(Radford et al. 2021, CLIP). That is exactly the loss of tvr's meanP method on clips of T = 1
frame (the mean of one frame's feature is that feature), so pre-training *is* a ``tvr train`` job
with ``model.method=meanp`` and ``data.num_frames=1`` on a generated set with static captions
(``data.synth.captions=static``: shapes, colours, size, background, what any one frame shows): the
same Ray Data decoding, Ray Train workers, DeepSpeed / DDP strategies, checkpoints, resume and
MLflow run as every other job. No model math lives here; the training frame is a random one of the
clip each epoch (the trainer's segment sampling with one segment).

After training, the backbone's weights (``backbone.clip.*`` of the exported method) are written in
open_clip's checkpoint format (``{"epoch", "name", "state_dict"}``, as open_clip's own training
saves it, loadable with ``open_clip.create_model(name, pretrained=<file>)``), checked by loading
them back strictly, logged to the run as ``backbone/open_clip_model.pt`` and registered as a new
version of ``tracking.registered_model`` (default ``tvr-backbone-<model>``); ``champion`` moves to
it if its held-out static t2v R@1 is better. Any job then starts from it with
``model.backbone.pretrained=models:/tvr-backbone-tvr-tiny@champion`` (or the file's path).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from tvr_platform.config import ConfigError, JobCfg, join_uri, load_job

REPO_JOBS = Path(__file__).resolve().parents[3] / "jobs"
CHECKPOINT = "open_clip_model.pt"
ARTIFACT_DIR = "backbone"
PREFIX = "backbone.clip."


def load_pretrain_job(spec: str | None, overrides: list[str]) -> JobCfg:
    """``jobs/pretrain.yaml`` (or ``spec``) + overrides; the data defaults to its own folder
    (``<storage>/datasets/synthetic-<captions>-<seed>``), never the benchmark's or quickstart's set."""
    job = load_job(spec or REPO_JOBS / "pretrain.yaml", overrides)
    if job.model.method != "meanp" or job.data.num_frames != 1:
        raise ConfigError(f"model.method={job.model.method}, data.num_frames={job.data.num_frames}: image-text "
                          "pre-training is meanP on one frame per clip; set model.method=meanp data.num_frames=1")
    if not job.data.root:
        job.data.root = join_uri(job.storage_uri, "datasets", f"synthetic-{job.data.synth.captions}-{job.data.synth.seed}")
    return job


def export_open_clip(method_weights: Path, model_name: str, epochs: int, out: Path) -> Path:
    """A tvr method state dict (``backbone.clip.*`` + heads) -> open_clip checkpoint of the CLIP alone."""
    state = torch.load(method_weights, map_location="cpu", weights_only=True)
    clip = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not clip:
        raise RuntimeError(f"{method_weights}: no {PREFIX}* weights to export")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epochs, "name": model_name, "state_dict": clip}, out)
    return out


def check_loads(model_name: str, checkpoint: Path) -> None:
    """open_clip builds the model from the file with strict loading (every key, every shape)."""
    from tvr.backbone import create_clip

    create_clip(model_name, str(checkpoint))


def register_backbone(job: JobCfg, checkpoint: Path, run_id: str, metrics: dict[str, float]) -> dict[str, Any]:
    """Log the checkpoint to the run and register it as a model version (source: the run's
    ``backbone/`` artifact folder); ``champion`` moves only if static t2v R@1 improves."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tvr_platform.registry import promote

    client = MlflowClient(job.tracking_uri)
    client.log_artifact(run_id, str(checkpoint), ARTIFACT_DIR)
    name = job.tracking.registered_model or f"tvr-backbone-{job.model.backbone.name}"
    try:
        client.create_registered_model(name, description="tvr pretrain: open_clip backbone checkpoints")
    except MlflowException:
        pass                                                           # already registered
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}"
    version = str(client.create_model_version(name, source=source, run_id=run_id).version)
    tags = {"kind": "backbone", "format": "open_clip", "backbone": job.model.backbone.name,
            "checkpoint": CHECKPOINT, "dataset": job.dataset_uri,
            **{f"metric.{k}": f"{v:.4f}" for k, v in metrics.items()}}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    decision = promote(job.tracking_uri, name, version, champion=job.tracking.alias)
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}", **decision}


def pretrain(job: JobCfg, *, register: bool = True) -> dict[str, Any]:
    """Generate the static set if missing, train (Ray Data + Ray Train), export + register."""
    from tvr_platform import logs
    from tvr_platform.recipes import ensure_synthetic
    from tvr_platform.train.trainer import run_training

    logs.attach(job.work_dir)           # Ray / MLflow output to <work_dir>/logs, as `tvr train`
    ensure_synthetic(job)
    result = run_training(job)
    tracker = result.tracker
    try:
        if result.weights_path is None:
            raise RuntimeError("pre-training finished without exported weights")
        checkpoint = export_open_clip(result.weights_path, job.model.backbone.name, job.train.epochs,
                                      result.weights_path.parent / CHECKPOINT)
        check_loads(job.model.backbone.name, checkpoint)
        # test: the selected (best on validation) epoch's weights, scored once by the workers
        # (final/test/*); final/val/*: that epoch's validation scores
        from tvr_platform.recipes import final_metrics

        metrics, val = final_metrics(result)
        tracker.log_metrics({f"final/val/{k}": v for k, v in val.items()})
        report: dict[str, Any] = {"run": job.run.name, "checkpoint": str(checkpoint), "metrics": metrics}
        if register:
            report["registered"] = register_backbone(job, checkpoint, tracker.run_id, metrics)
        tracker.log_dict(report, "report/pretrain.json")
    except Exception:
        tracker.terminate("FAILED")
        raise
    tracker.terminate("FINISHED")
    report["mlflow"] = tracker.url()
    return report


def resolve_backbone_ref(ref: str, work_dir: Path, tracking_uri: str) -> str:
    """``models:/name@alias`` or ``models:/name/version`` of a registered backbone -> the local
    path of its open_clip checkpoint (downloaded once per version into the work dir's cache). Only
    the checkpoint file is read, with ``torch.load(weights_only=True)`` (no code runs)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    body = ref.removeprefix("models:/")
    client = MlflowClient(tracking_uri)
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = body.rsplit("/", 1)
            mv = client.get_model_version(name, version)
    except (MlflowException, ValueError):
        raise FileNotFoundError(f"model.backbone.pretrained={ref}: no such registered model version in "
                                f"{tracking_uri}; run `tvr pretrain` or name a checkpoint file") from None
    if mv.tags.get("kind") != "backbone":
        raise FileNotFoundError(f"model.backbone.pretrained={ref}: version {mv.version} of {name} is not a "
                                "backbone checkpoint (registered by `tvr pretrain`)")
    target = work_dir / "cache" / "checkpoints" / f"{name}__v{mv.version}" / CHECKPOINT
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source}/{CHECKPOINT}",
                                                           dst_path=tmp, tracking_uri=tracking_uri))
            target.write_bytes(got.read_bytes())
    return str(target)
