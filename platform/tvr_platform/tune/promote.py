"""Promote a trained run (a campaign's best trial, or any ``tvr train`` run) into the model registry.

The version holds the weights of the run's selected epoch (the best by validation) + resolved job
spec + tokenizer info and is tagged with method, backbone, dataset, eval split, data manifest hash,
selected epoch, validation (``val.<k>``) and test (``test.<k>``) values and git commit.
``challenger`` always moves to it; ``champion`` only if it beats chance on the *validation* metric
and the current champion on the same data (same dataset and manifest hash, see
``registry.promote``), or with ``force`` (``tvr registry promote --force``).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from tvr_platform.config import JobCfg, load_stored_job

MANIFEST_HASH_TAG = "data_manifest_hash"


def manifest_hash(job: JobCfg) -> str:
    """sha256 over the train, validation and test manifests (ids, files, captions): same hash, same
    data, and the same videos to compare validation scores on."""
    from tvr_platform.data.pipeline import load_splits

    h = hashlib.sha256(job.data.format.encode())
    for side, m in zip(("train", "val", "test"), load_splits(job), strict=True):
        h.update(json.dumps([side, m.split, m.video_ids, m.video_files, m.captions, m.caption_video]).encode())
    return h.hexdigest()


def trial_weights(job: JobCfg, checkpoint_path: str, work: Path) -> Path:
    """The run's exported weights: the driver's local export if on this machine, else the last
    Ray Train checkpoint in run storage (local dir or S3)."""
    from tvr_platform.train.worker import EXPORT_FILE

    local = Path(job.work_dir) / "exports" / job.run.name / EXPORT_FILE
    if local.exists():
        return local
    if not checkpoint_path:
        raise FileNotFoundError(f"run {job.run.name!r}: no exported weights and no checkpoint path to fetch")
    from ray.train import Checkpoint

    from tvr_platform.train.trainer import run_storage

    _, fs = run_storage(job)
    target = Path(Checkpoint(checkpoint_path, filesystem=fs).to_directory(str(work / "ckpt"))) / EXPORT_FILE
    if not target.exists():
        raise FileNotFoundError(f"{checkpoint_path}: checkpoint holds no {EXPORT_FILE} (the run did not finish "
                                "its last epoch, e.g. it was stopped early)")
    return target


def promote_run(tracking_uri: str, run_id: str, *, name: str = "", metric: str = "t2v_R1",
                mode: str = "max", force: bool = False, caller: JobCfg | None = None) -> dict[str, Any]:
    """Register the weights of MLflow run ``run_id`` (a trial child run or a train run) and move
    the aliases. Returns {name, version, score, champion_score, promoted}."""
    from mlflow.tracking import MlflowClient

    from tvr_platform.registry import promote, register_model
    from tvr_platform.runs import split_chance
    from tvr_platform.tune.campaign import CHECKPOINT_TAG

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        raise ValueError(f"MLflow run {run_id} is {run.info.status}: only finished runs have final weights")
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(client.download_artifacts(run_id, "config/job.yaml", tmp))
        # The run's own spec (run storage): no resolvers; the promoting job's places win.
        job = load_stored_job(spec, caller=caller, where=f"MLflow run {run_id}")
        if caller is None:
            job.tracking.uri = tracking_uri
        logged = run.data.metrics
        val = {k.removeprefix("final/val/"): v for k, v in logged.items() if k.startswith("final/val/")}
        test = {k.removeprefix("final/test/"): v for k, v in logged.items()
                if k.startswith("final/test/") and not k.startswith("final/test/num_")}
        ranked = "final/train_loss" if metric == "train_loss" else f"final/val/{metric}"
        if ranked not in logged:
            raise ValueError(f"MLflow run {run_id} has no {ranked} metric (its selected epoch's validation "
                             "score) to rank it by")
        from tvr_platform.recipes import version_metrics

        metrics = version_metrics(val, test, logged.get("final/train_loss"))
        epoch = int(logged["final/epoch"]) if "final/epoch" in logged else None
        weights = trial_weights(job, run.data.tags.get(CHECKPOINT_TAG, ""), Path(tmp))
        name = name or job.tracking.registered_model or f"tvr-{job.model.method}"
        tags = {"git_commit": run.data.tags.get("tvr.git_commit", "unknown"), "eval_split": job.data.test_split,
                MANIFEST_HASH_TAG: manifest_hash(job), "source_run": run_id}
        for key in ("tvr.tune.campaign", "tvr.tune.trial_id"):
            if key in run.data.tags:
                tags[key.removeprefix("tvr.")] = run.data.tags[key]
        version = register_model(job, weights, run_id, name=name, metrics=metrics, tags=tags, epoch=epoch)
        chance = split_chance(job, metric)
    # champion moves only above chance (an at-chance best trial is no model) unless forced
    decision = promote(tracking_uri, name, version, metric=metric, mode=mode, chance=chance, force=force)
    return {"name": name, **decision}


def promote_trial(job: JobCfg, run_id: str) -> dict[str, Any]:
    """A campaign's ``tune.promote``: register ``run_id`` under the campaign's model name."""
    return promote_run(job.tracking_uri, run_id, name=job.tracking.registered_model,
                       metric=job.tune.metric, mode=job.tune.mode, caller=job)


def best_campaign_run(tracking_uri: str, experiment: str, campaign: str) -> str:
    """The run id recorded as the best finished trial of ``campaign`` (parent run tag)."""
    from mlflow.tracking import MlflowClient

    from tvr_platform.tune.campaign import CAMPAIGN_TAG, ROLE_TAG

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{CAMPAIGN_TAG}` = '{campaign}' and tags.`{ROLE_TAG}` = 'campaign'"), max_results=1)
    best = runs[0].data.tags.get("tvr.tune.best_run_id") if runs else None
    if not best or best == "None":
        raise ValueError(f"campaign {campaign!r} in experiment {experiment!r} has no finished best trial")
    return best
