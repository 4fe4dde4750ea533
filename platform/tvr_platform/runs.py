"""Run identity: a rerun of ``run.name`` resumes that run only when it is the same model.

A run's *identity* is what its checkpoints' shapes and meaning depend on: ``model.method``, the
backbone (name, pretrained reference), ``data.num_frames`` and the chosen method's own section. The
first start of a run logs them as MLflow params; a later ``tvr train`` / ``tvr quickstart`` with the
same ``run.name`` compares them before any Ray work and stops with one line naming the existing run
and the two ways on (resume with its spec, or a new ``run.name`` / ``--new``) when they differ —
instead of loading a T-MASS checkpoint into a meanP model. A run that finished all its epochs is
tagged ``tvr.complete``; rerunning it trains and registers nothing.
"""

from __future__ import annotations

from typing import Any

from tvr_platform.config import ConfigError, JobCfg, flatten
from tvr_platform.tracking import RUN_NAME_TAG

COMPLETE_TAG = "tvr.complete"          # "true" once every epoch ran and the final report was logged
REGISTERED_TAG = "tvr.registered"      # "name/version" registered from this run


IDENTITY_KEYS = ("model.method", "model.backbone.name", "model.backbone.pretrained", "data.num_frames",
                 "data.val_split", "data.val_fraction", "data.val_seed", "train.select_metric", "train.select_mode")
"""What a checkpoint's shapes and meaning depend on: the model, and the validation set and metric
its best epoch was chosen on."""


class RunMismatch(ConfigError):
    """``run.name`` names an existing run whose identity differs from this spec."""


def identity(job: JobCfg) -> dict[str, str]:
    """The params that must match for a resume, as MLflow stores them (strings)."""
    section = f"model.{job.model.method}."
    return {k: str(v) for k, v in flatten(job).items() if k in IDENTITY_KEYS or k.startswith(section)}


def find_run(job: JobCfg, name: str | None = None) -> Any | None:
    """The latest MLflow run named ``name`` (default run.name) in the job's experiment, or None.
    Reads only: nothing is created when the store or experiment does not exist yet."""
    from mlflow.tracking import MlflowClient

    if not _store_exists(job.tracking_uri):
        return None
    client = MlflowClient(job.tracking_uri)
    exp = client.get_experiment_by_name(job.tracking.experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name or job.run.name}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def _store_exists(tracking_uri: str) -> bool:
    from pathlib import Path

    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).exists()
    return True


def differences(job: JobCfg, run: Any) -> dict[str, tuple[str, str]]:
    """key -> (existing run's value, this spec's value) for every identity key that differs."""
    params = run.data.params
    mine = identity(job)
    theirs = {k: v for k, v in params.items()
              if k in IDENTITY_KEYS or k.startswith(f"model.{params.get('model.method')}.")}
    keys = sorted(set(mine) | set(theirs))
    return {k: (theirs.get(k, "-"), mine.get(k, "-")) for k in keys if theirs.get(k) != mine.get(k)}


def check_resume(job: JobCfg) -> Any | None:
    """Before a (re)start of ``run.name``: the existing run when it has the same identity (None when
    there is none); raise :class:`RunMismatch` with one line when it is a different model."""
    run = find_run(job)
    if run is None:
        return None
    diff = differences(job, run)
    if diff:
        shown = ", ".join(f"{k}={old} (this spec: {new})" for k, (old, new) in list(diff.items())[:4])
        raise RunMismatch(
            f"run.name={job.run.name} already exists as a different model ({shown}; MLflow run "
            f"{run.info.run_id}, {run.info.status}). Resume it with its spec "
            f"({', '.join(f'{k}={old}' for k, (old, _) in list(diff.items())[:2])}), or start a new run "
            f"with run.name={next_free_name(job)} or --new")
    return run


def completed_report(job: JobCfg, run: Any) -> dict[str, Any]:
    """What ``recipes.train`` returns for a run that is already complete (read from MLflow)."""
    from tvr_platform.tracking import Tracker

    metrics = {k.removeprefix("final/test/"): v for k, v in run.data.metrics.items() if k.startswith("final/test/")}
    val = {k.removeprefix("final/val/"): v for k, v in run.data.metrics.items() if k.startswith("final/val/")}
    report: dict[str, Any] = {"run": job.run.name, "method": job.model.method, "metrics": metrics,
                              "val_metrics": val, "selected_epoch": run.data.metrics.get("final/epoch"),
                              "already_complete": True,
                              "mlflow": Tracker(job.tracking_uri, run.info.run_id).url()}
    registered = run.data.tags.get(REGISTERED_TAG)
    if registered:
        name, version = registered.rsplit("/", 1)
        report["registered"] = {"name": name, "version": version}
    return report


def is_complete(job: JobCfg, run: Any) -> bool:
    """The run ran all of this spec's epochs (a larger train.epochs continues it instead)."""
    return (run.data.tags.get(COMPLETE_TAG) == "true"
            and run.data.params.get("train.epochs") == str(job.train.epochs))


def next_free_name(job: JobCfg) -> str:
    """``<run.name>-2``, ``-3``, ...: the first name that neither an MLflow run of the experiment nor
    a local run folder (checkpoints) carries."""
    from pathlib import Path

    base = job.run.name
    for i in range(2, 10_000):
        name = f"{base}-{i}"
        local = "://" not in job.storage_uri and (Path(job.storage_uri) / "runs" / name).exists()
        if not local and find_run(job, name) is None:
            return name
    raise ConfigError(f"run.name={base}: no free '-N' suffix below 10000; pick a run.name")


# -- what a run says about itself (MLflow conventions) --------------------------------------------

def applicable_params(job: JobCfg, params: dict[str, Any]) -> dict[str, Any]:
    """The flattened config less the sections this job does not use: ``tune.*`` without a search
    space, ``captions.*`` unless ExCae or generated captions are involved, ``data.synth.*`` for a
    real data set (``data.root`` set); other methods' sections are already left out by flatten."""
    drop = []
    if not job.tune.search_space:
        drop.append("tune.")
    if job.model.method != "excae" and not job.data.aux_captions:
        drop.append("captions.")
    if job.data.root:
        drop.append("data.synth.")
    return {k: v for k, v in params.items() if not k.startswith(tuple(drop))}


def describe(job: JobCfg) -> str:
    """``mlflow.note.content``: what the run is, in one paragraph (Markdown)."""
    data = job.data.root or "the generated synthetic set"
    return (f"**{job.model.method}** on `{job.model.backbone.name}`"
            f"{f' (pretrained `{job.model.backbone.pretrained}`)' if job.model.backbone.pretrained else ''}, "
            f"{job.data.num_frames} frames per clip, data `{data}` ({job.data.format} format; train split "
            f"`{job.data.train_split}`, validation {validation_words(job)}, test split `{job.data.test_split}`), "
            f"{job.train.epochs} epochs (the best by validation {job.train.select_metric} kept), "
            f"{max(job.train.num_workers, 1)} x {job.data.batch_size} clips per step, {job.train.strategy}"
            f"{f' ZeRO-{job.train.zero_stage}' if job.train.strategy == 'deepspeed' else ''}. Run `{job.run.name}`.")


def validation_words(job: JobCfg) -> str:
    """Where the validation set comes from, in words."""
    d = job.data
    return (f"split `{d.val_split}`" if d.val_split else
            f"{d.val_fraction:.0%} of `{d.train_split}` held out (seed {d.val_seed})")


def source_tags(job: JobCfg, argv: list[str] | None = None) -> dict[str, str]:
    """MLflow's own source tags: what ran (``mlflow.source.name``), where from (LOCAL, or JOB for a
    submitted Ray job), the git commit (``TVR_GIT_COMMIT`` from ``tvr submit`` on a cluster, where the
    shipped code has no .git), the user and a generated description."""
    import getpass
    import os
    import sys

    from tvr_platform.tracking import RAY_JOB_ENV, git_commit

    argv = sys.argv if argv is None else argv
    command = "tvr " + next((a for a in argv[1:] if not a.startswith("-")), "") if argv else "tvr"
    commit = os.environ.get("TVR_GIT_COMMIT") or git_commit()
    try:
        user = os.environ.get("TVR_SUBMITTED_BY") or getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    tags = {"mlflow.source.name": command.strip(), "mlflow.source.type": "JOB" if os.environ.get(RAY_JOB_ENV)
            else "LOCAL", "mlflow.user": user, "mlflow.note.content": describe(job),
            "tvr.dataset": job.data.root or "synthetic"}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def manifest_digest(manifest: Any) -> str:
    """A short digest that changes with any video id, file or caption of the split."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps([manifest.video_ids, manifest.video_files, manifest.captions,
                                   manifest.caption_video]).encode())
    return h.hexdigest()[:16]


def log_dataset_inputs(tracker: Any, job: JobCfg, manifests: dict[str, Any]) -> None:
    """``log_input`` of each split (context train / validation / test) as an MLflow dataset named
    after the data set and split (a held-out validation set: ``<split>-held-out``), its source the
    dataset URI, its digest that of the manifest."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # "can be interpreted in multiple ways" for local paths
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(job.dataset_uri)  # local path or s3:// (an artifact source; no fetch)
    kind = job.data.format if job.data.root else "synthetic"
    inputs = []
    for context, m in manifests.items():
        held_out = context == "validation" and not job.data.val_split
        ds = MetaDataset(source=source, name=f"{kind}-{m.split}{'-held-out' if held_out else ''}",
                         digest=manifest_digest(m))
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    tracker.client.log_inputs(tracker.run_id, datasets=inputs)


def chance_level(metric: str, num_videos: int, num_texts: int | None = None) -> float | None:
    """The expected value of ``metric`` (``t2v_R5``, ``v2t_MnR``, ...; recalls in %) for random
    scores on a split of ``num_videos`` clips and ``num_texts`` captions (default: one per clip).
    t2v: each caption has one true clip among N, so R@K = K/N and the mean rank is (N+1)/2. v2t:
    each clip has c = T/N true captions among T, so R@K = 1 - prod_{i<K} (T-c-i)/(T-i) and the first
    true caption's mean rank is (T+1)/(c+1). MdR: taken as the mean rank (close for uniform ranks).
    None for an unknown metric."""
    direction, _, name = metric.partition("_")
    n, t = num_videos, num_texts or num_videos
    if direction not in ("t2v", "v2t") or n < 1:
        return None
    if name.startswith("R") and name[1:].isdigit():
        k = int(name[1:])
        if direction == "t2v":
            return 100.0 * min(k / n, 1.0)
        c, miss = max(t / n, 1.0), 1.0
        for i in range(min(k, t)):
            miss *= max(t - c - i, 0.0) / (t - i)
        return 100.0 * (1.0 - miss)
    if name in ("MdR", "MnR"):
        if direction == "t2v":
            return (n + 1) / 2
        c = max(t / n, 1.0)
        return (t + 1) / (c + 1)
    return None


def split_chance(job: JobCfg, metric: str, split: str = "val") -> float | None:
    """:func:`chance_level` on the job's validation (``split='val'``) or test set (its manifest;
    captions per data.eval_captions)."""
    from tvr_platform.data.pipeline import load_splits

    _, val, test = load_splits(job)
    m = val if split == "val" else test
    texts = len(m.video_ids) if job.data.eval_captions == "first" else len(m.captions)
    return chance_level(metric, len(m.video_ids), texts)
