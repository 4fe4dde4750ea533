"""The MLflow model registry: register a trained model (weights + job spec + tokenizer info),
move aliases, and reload a version as a ready tvr method.

A registered version is an MLflow "models from code" pyfunc (``registry_model.py``: no pickled
object) whose artifacts are ``weights.pt`` (the method's consolidated state dict, or only its trained parameters when the backbone is a frozen pretrained
reference — VoP's tiny checkpoints) and ``job.yaml`` (the resolved job spec). Its ``predict``
embeds text queries; ``load_method`` rebuilds the full method for evaluation and search.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from tvr_platform.config import JobCfg, job_to_yaml, load_stored_job
from tvr_platform.redaction import redact_text

WEIGHTS, JOB_SPEC = "weights.pt", "job.yaml"


MODEL_CODE = Path(__file__).with_name("registry_model.py")
"""The models-from-code file logged as the pyfunc model (see :mod:`tvr_platform.registry_model`)."""


def trained_state_dict(method: torch.nn.Module, state: dict[str, torch.Tensor],
                       job: JobCfg) -> dict[str, torch.Tensor]:
    """Keep every weight, unless the backbone is frozen and loadable from its pretrained
    reference: then only trained parameters and buffers are stored (tiny VoP checkpoints)."""
    frozen_backbone = job.model.backbone.pretrained and not any(
        p.requires_grad for n, p in method.named_parameters() if n.startswith("backbone."))
    if not frozen_backbone:
        return state
    keep = {n for n, p in method.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in method.named_buffers() if not n.startswith("backbone.")}
    return {k: v for k, v in state.items() if k in keep}


def build_from_artifacts(job_file: Path, weights_file: Path, job: JobCfg | None = None
                         ) -> tuple[JobCfg, torch.nn.Module]:
    """The method a registered version holds. Its ``job.yaml`` is someone else's file: loaded with
    :func:`load_stored_job` (no resolvers; the places it names are never followed) unless the
    caller passes the ``job`` it already loaded that way; weights with ``weights_only=True``."""
    from tvr.backbone import ClipBackbone
    from tvr.methods import build_method

    job = job or load_stored_job(job_file, report=None)
    torch.manual_seed(job.run.seed)
    method = build_method(job.model.method, job.method_cfg, ClipBackbone(job.model.backbone))
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    missing, unexpected = method.load_state_dict(state, strict=False)
    if unexpected or (missing and not job.model.backbone.pretrained):
        raise RuntimeError(f"{weights_file}: weights do not match {job.model.method} "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return job, method.eval()


def signature():
    """pyfunc signature: a ``text`` column of queries -> float32 embeddings (N, D)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                          outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1))]))


SHOWN = ("t2v_R1", "t2v_R5", "t2v_R10", "v2t_R1")


def version_description(job: JobCfg, metrics: dict[str, float], run_id: str, epoch: int | None = None) -> str:
    """The registered version's description, generated from its run: which epoch (chosen on
    validation), its validation and test scores."""
    from tvr_platform.runs import describe, validation_words

    def shown(prefix: str) -> str:
        return ", ".join(f"{k} {metrics[prefix + k]:.1f}" for k in SHOWN if prefix + k in metrics)

    plain = ", ".join(f"{k} {v:.1f}" for k, v in metrics.items() if k in SHOWN)
    text = f"{describe(job)} Trained in MLflow run {run_id}."
    if epoch is not None:
        text += (f" Weights of epoch {epoch} of {job.train.epochs}, the best by validation "
                 f"{job.train.select_metric} ({validation_words(job)}).")
    if shown("val/"):
        text += f" Validation: {shown('val/')}."
    if shown("test/") or plain:
        text += f" Split `{job.data.test_split}`: {shown('test/') or plain}."
    return text


def metric_tag(key: str) -> str:
    """Version tag of a recorded metric: ``val/t2v_R1`` -> ``val.t2v_R1``, ``t2v_R1`` -> ``metric.t2v_R1``."""
    return key.replace("/", ".") if "/" in key else f"metric.{key}"


def register_model(job: JobCfg, weights_path: Path, run_id: str, *, name: str, metrics: dict[str, float],
                   tags: dict[str, str] | None = None, alias: str | None = None, epoch: int | None = None) -> str:
    """Log the model to ``run_id``, register it as a new version of ``name``, tag it, and (if
    given) point ``alias`` at it. Returns the version number.

    ``metrics``: ``val/<k>`` (the selected epoch's validation scores), ``test/<k>`` (its test
    scores), plain keys for anything else; recorded on the logged model and as version tags
    (:func:`metric_tag`). ``epoch``: the selected epoch (1-based), tag ``selected_epoch``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(job.tracking_uri)
    client = MlflowClient(job.tracking_uri)
    from tvr.backbone import ClipBackbone
    from tvr.methods import build_method

    method = build_method(job.model.method, job.method_cfg, ClipBackbone(job.model.backbone))
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        w, j = Path(tmp) / WEIGHTS, Path(tmp) / JOB_SPEC
        torch.save(trained_state_dict(method, state, job), w)
        j.write_text(redact_text(job_to_yaml(job)))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE),  # models from code: no pickle
                artifacts={"weights": str(w), "job": str(j)},
                pip_requirements=["tvr", "torch", "open_clip_torch"],
                registered_model_name=name, signature=signature(),
            )
            if metrics and getattr(info, "model_id", None):  # shown on the model (version) page
                # named as the version tags (val.t2v_R1, ...): never the run's own val/... histories
                mlflow.log_metrics({metric_tag(k): float(v) for k, v in metrics.items()}, model_id=info.model_id)
    version = str(info.registered_model_version)
    client.update_model_version(name, version, description=version_description(job, metrics, run_id, epoch))
    all_tags = {"method": job.model.method, "backbone": job.model.backbone.name,
                "tokenizer": f"open_clip:{job.model.backbone.name}",
                "context_length": str(method.backbone.context_length),
                "dataset": redact_text(job.dataset_uri), **{metric_tag(k): f"{v:.4f}" for k, v in metrics.items()},
                **({"selected_epoch": str(epoch), "selected_by": f"val.{job.train.select_metric}"}
                   if epoch is not None else {}),
                **(tags or {})}
    for k, v in all_tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def promote(tracking_uri: str, name: str, version: str, *, metric: str = "t2v_R1", mode: str = "max",
            challenger: str = "challenger", champion: str = "champion", chance: float | None = None,
            force: bool = False) -> dict[str, Any]:
    """Point ``challenger`` at ``version``; move ``champion`` too only if it beats ``chance`` (the
    metric's value for random scores, when given) and the current champion on ``metric`` -- the
    *validation* value (version tag ``val.<metric>``; ``metric.<metric>`` for versions without one),
    recorded on the same data (dataset, manifest hash, eval split) -- or ``force``. The returned
    ``reason`` says why champion moved or stayed."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    new = client.get_model_version(name, version)
    client.set_registered_model_alias(name, challenger, version)
    key = f"val.{metric}" if f"val.{metric}" in new.tags else f"metric.{metric}"
    score = float(new.tags[key])
    try:
        current = client.get_model_version_by_alias(name, champion)
    except MlflowException:
        current = None
    cur_score = float(current.tags.get(key, "nan")) if current else None
    same_eval = current is None or (current.tags.get("dataset") == new.tags.get("dataset") and all(
        current.tags[k] == new.tags[k] for k in ("data_manifest_hash", "eval_split")
        if k in current.tags and k in new.tags))
    better = current is None or (same_eval and (score > cur_score if mode == "max" else score < cur_score))
    beats_chance = chance is None or (score > chance if mode == "max" else score < chance)
    if force:
        reason = "forced"
    elif not beats_chance:
        reason = f"{metric} {score:.4g} does not beat chance ({chance:.4g}); --force to promote anyway"
    elif not better:
        reason = (f"{metric} {score:.4g} does not beat the champion's {cur_score:.4g}" if same_eval
                  else "the champion was evaluated on another data set; --force to replace it")
    else:
        reason = "no champion yet" if current is None else f"beats the champion's {cur_score:.4g}"
    moved = force or (better and beats_chance)
    if moved:
        client.set_registered_model_alias(name, champion, version)
    return {"version": version, "score": score, "champion_score": cur_score, "promoted": bool(moved),
            "chance": chance, "reason": reason}


def download_model(model_uri: str, tracking_uri: str) -> tuple[Path, Path]:
    """models:/name@alias or models:/name/version -> local (job.yaml, weights.pt)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    found = {p.name: p for p in local.rglob("*") if p.name in (WEIGHTS, JOB_SPEC)}
    if set(found) != {WEIGHTS, JOB_SPEC}:
        raise FileNotFoundError(f"{model_uri}: not a tvr model (no {WEIGHTS} + {JOB_SPEC} artifacts)")
    return found[JOB_SPEC], found[WEIGHTS]
