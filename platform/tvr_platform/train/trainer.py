"""``run_training(job)``: build the Ray Train ``TorchTrainer`` for a job spec and run it.

Resuming: Ray Train V2 resumes a run whose ``RunConfig(storage_path, name)`` already holds
checkpoints, so rerunning the same ``run.name`` continues from its latest checkpoint; the same
MLflow run is reopened (found by its ``tvr.run_name`` tag).

Splits: train (less the held-out validation videos), validation (every epoch, ``val/*``) and test
(once, after training, on the epoch selected by validation: ``final/test/*``), see
:func:`tvr_platform.data.pipeline.load_splits`. The validation set is recorded with the run
(``<storage>/runs/<run>/validation.json`` and the MLflow artifact ``data/validation.json``: source,
seed, digest, video ids; an MLflow dataset input with context ``validation``). The returned weights
are the selected epoch's (its checkpoint keeps them, see :mod:`tvr_platform.train.worker`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvr_platform.cluster.launch import job_env_var_names
from tvr_platform.config import JobCfg, job_to_dict, job_to_yaml
from tvr_platform.tracking import Tracker, start_run
from tvr_platform.train.worker import EXPORT_FILE, STATE_FILE

WORKER_ENV = {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
              "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class TrainingResult:
    metrics: dict[str, Any]
    """The latest epoch's report (its validation scores, train_loss, epoch, best_epoch)."""
    checkpoint_path: str
    """The selected epoch's checkpoint (it holds the exported weights)."""
    weights_path: Path | None
    tracker: Tracker | None
    val_metrics: dict[str, Any] | None = None
    """The selected epoch's validation scores (with ``epoch``)."""
    test_metrics: dict[str, Any] | None = None
    """Test scores of the selected epoch's weights, evaluated once after training."""
    selected_epoch: int | None = None
    """The epoch (0-based) selected by validation train.select_metric."""


def init_ray(job: JobCfg) -> None:
    """Connect to ``cluster.address`` or start a local Ray (no dashboard, quiet workers)."""
    import ray
    from ray.data import DataContext

    from tvr_platform import logs

    logs.attach(job.work_dir)  # without -v: Ray's own logs to <work_dir>/logs/, not the terminal
    # One line per epoch from the trainer is enough; Ray Data's per-operator bars interleave badly.
    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        logs.route_ray_worker_logs()
        return
    env = {**WORKER_ENV, **job.cluster.env_vars}
    if os.environ.get("DS_ACCELERATOR"):
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    # In a submitted job (tvr submit / RayJob) the job's runtime_env already carries cluster.env_vars
    # to every worker, and Ray rejects a ray.init runtime_env naming the same variables.
    shipped = job_env_var_names()
    env = {k: v for k, v in env.items() if k not in shipped}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    if job.cluster.address:
        ray.init(address=job.cluster.address, **kwargs)
    else:
        ray.init(num_cpus=job.cluster.num_cpus, include_dashboard=False, **kwargs)
    logs.route_ray_worker_logs()


def run_storage(job: JobCfg, folder: str = "runs"):
    """(storage_path, pyarrow filesystem or None) of ``folder`` under the job's storage: Ray Train's
    run directories (``runs``) or Tune's campaign experiments (``tune``)."""
    from tvr_platform.storage import open_storage

    if job.storage_uri.startswith("s3://"):
        store = open_storage(job.storage_uri, endpoint_url=job.storage.endpoint_url, region=job.storage.region)
        fs, path = store.pyarrow_filesystem()
        return f"{path.rstrip('/')}/{folder}", fs
    path = Path(job.storage_uri) / folder
    path.mkdir(parents=True, exist_ok=True)
    return str(path), None


def run_training(job: JobCfg, *, callbacks: list | None = None, tracker: Tracker | None = None,
                 extra_config: dict[str, Any] | None = None) -> TrainingResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tvr_platform.data.pipeline import eval_shards, load_splits, train_dataset, video_dataset
    from tvr_platform.train.shards import EvalShardsConfig
    from tvr_platform.train.worker import SCORE_KEY, train_loop_per_worker

    train_manifest, val_manifest, test_manifest = load_splits(job)
    global_batch = job.data.batch_size * max(1, job.train.num_workers)
    if len(train_manifest.video_ids) < global_batch:
        raise ValueError(
            f"split {job.data.train_split!r} has {len(train_manifest.video_ids)} training clips (validation held "
            f"out), fewer than one "
            f"global batch (data.batch_size={job.data.batch_size} x train.num_workers={job.train.num_workers} "
            f"= {global_batch}): zero training steps; lower data.batch_size or add clips")
    init_ray(job)
    check_cpu_budget(job)  # before an MLflow run exists: a refused job leaves nothing RUNNING
    if tracker is None:
        from tvr_platform.runs import log_dataset_inputs

        tracker = start_run(job)
        tracker.log_text(job_to_yaml(job), "config/job.yaml")
        log_dataset_inputs(tracker, job, {"train": train_manifest, "validation": val_manifest, "test": test_manifest})
        print(f"[tvr] MLflow run: {tracker.url()}", flush=True)  # in a submitted job's logs from the start
    record_validation(job, tracker, val_manifest)
    storage_path, storage_fs = run_storage(job)
    if job.train.num_workers == 0 and storage_fs is None:
        (Path(storage_path) / job.run.name / "local").mkdir(parents=True, exist_ok=True)
    config = {
        "job": job_to_dict(job),
        "tracker": {"tracking_uri": tracker.tracking_uri, "run_id": tracker.run_id},
        "num_train_videos": len(train_manifest.video_ids),
        "pretrained_path": resolve_pretrained(job),
        # Ray Train local mode does not upload checkpoints: keep them in the run's folder.
        "local_checkpoint_root": (str(Path(storage_path) / job.run.name / "local")
                                  if job.train.num_workers == 0 and storage_fs is None else None),
        **(extra_config or {}),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=job.train.num_workers, use_gpu=job.train.use_gpu,
                                     resources_per_worker=worker_resources(job)),
        torch_config=TorchConfig(backend="nccl" if job.train.use_gpu else "gloo", timeout_s=600),
        # The validation and test splits are sharded per rank (every video exactly once, whatever the
        # worker count); "val" / "test" themselves are only the names Ray asks for, never executed.
        datasets={"train": train_dataset(job, train_manifest), "val": video_dataset(job, val_manifest),
                  "test": video_dataset(job, test_manifest)},
        dataset_config=EvalShardsConfig(["train"], {name: eval_shards(job, m, max(job.train.num_workers, 1))
                                                    for name, m in (("val", val_manifest), ("test", test_manifest))}),
        run_config=RunConfig(
            name=job.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            # the best epochs by validation are kept (the latest too, always), not only the last ones
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.checkpoints_to_keep,
                                               checkpoint_score_attribute=SCORE_KEY,
                                               checkpoint_score_order=job.train.select_mode),
            failure_config=FailureConfig(max_failures=job.train.max_failures),
            callbacks=callbacks or None,
        ),
    )
    try:
        result = trainer.fit()
    except BaseException as err:
        report_quarantine(job, tracker, train_manifest, test_manifest)
        tracker.fail("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    report_quarantine(job, tracker, train_manifest, test_manifest)
    metrics = dict(result.metrics or {})
    selected = metrics.get("best_epoch", -1)
    checkpoint = selected_checkpoint(result, selected, config["local_checkpoint_root"])
    weights, val_metrics = None, None
    if checkpoint is not None:
        local = Path(job.work_dir) / "exports" / job.run.name
        local.mkdir(parents=True, exist_ok=True)
        with checkpoint.as_directory() as d:
            src = Path(d) / EXPORT_FILE
            if src.exists():
                weights = local / EXPORT_FILE
                weights.write_bytes(src.read_bytes())
            state = Path(d) / STATE_FILE
            if state.exists():
                val_metrics = json.loads(state.read_text()).get("metrics")
    logged = tracker.client.get_run(tracker.run_id).data.metrics
    test = {k.removeprefix("final/test/"): v for k, v in logged.items() if k.startswith("final/test/")}
    return TrainingResult(metrics=metrics, checkpoint_path=checkpoint.path if checkpoint else "",
                          weights_path=weights, tracker=tracker, val_metrics=val_metrics, test_metrics=test or None,
                          selected_epoch=selected if selected >= 0 else None)


def selected_checkpoint(result, epoch: int, local_root: str | None):
    """The checkpoint of the selected ``epoch`` among those Ray Train kept (the best by validation
    and the latest); in local mode (nothing uploaded) its directory under ``local_root``. The
    latest checkpoint when no epoch was selected (a run stopped before its first validation)."""
    from ray.train import Checkpoint

    if epoch is None or epoch < 0:
        return result.checkpoint
    for ckpt, m in result.best_checkpoints or []:
        if m.get("epoch") == epoch:
            return ckpt
    if result.checkpoint is not None and (result.metrics or {}).get("epoch") == epoch:
        return result.checkpoint
    if local_root:
        found = sorted(Path(local_root).glob(f"ckpt-e{epoch}-r0-*"))
        if found:
            return Checkpoint.from_directory(str(found[-1]))
    raise RuntimeError(f"run finished but the checkpoint of its selected epoch {epoch} is not among the kept "
                       "ones; raise train.checkpoints_to_keep")


def record_validation(job: JobCfg, tracker: Tracker, val_manifest) -> dict[str, Any]:
    """The validation set (source, seed, digest, every video id) next to the run in its storage
    (``validation.json``) and as the MLflow artifact ``data/validation.json``, and the split sizes
    as params: anyone can rebuild or audit it. Never fails the run it describes."""
    import logging

    from tvr_platform.config import join_uri
    from tvr_platform.data.pipeline import validation_record
    from tvr_platform.storage import storage_for

    record = validation_record(job, val_manifest)
    try:
        blob = json.dumps(record, indent=1).encode()
        storage_for(job, join_uri(job.storage_uri, "runs", job.run.name)).write_bytes("validation.json", blob)
        tracker.log_dict(record, "data/validation.json")
        tracker.set_tags({"tvr.validation": f"{record['num_videos']} videos, digest {record['digest']}"})
    except Exception as err:  # noqa: BLE001 - a record must not turn a run into a failed one
        logging.getLogger(__name__).warning("could not record the validation split: %s", err)
    return record


def worker_resources(job: JobCfg) -> dict[str, float]:
    """What each Ray Train worker reserves: train.cpus_per_worker CPUs, one GPU with
    train.use_gpu, and cluster.worker_resources (custom resources: which nodes may host it)."""
    return {"CPU": job.train.cpus_per_worker, **({"GPU": 1} if job.train.use_gpu else {}),
            **job.cluster.worker_resources}


def report_quarantine(job: JobCfg, tracker: Tracker, *manifests) -> int:
    """Every skipped / padded / patched / out-of-root clip and dropped or merged annotation of the
    run: ``<storage>/runs/<run.name>/quarantine.jsonl`` and the run's MLflow artifact
    ``quarantine.jsonl`` (+ metric ``data/quarantined``). Never fails the run it reports on."""
    import logging

    from tvr_platform.config import join_uri
    from tvr_platform.data.pipeline import read_quarantine, write_quarantine

    try:
        write_quarantine(job, join_uri(job.storage_uri, "runs", job.run.name), *manifests)
        records = read_quarantine(job, *manifests)
        if records:
            tracker.log_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "quarantine.jsonl")
        tracker.log_metrics({"data/quarantined": len(records)})
        return len(records)
    except Exception as err:  # noqa: BLE001 - a report must not turn a finished run into a failed one
        logging.getLogger(__name__).warning("could not write the quarantine report: %s", err)
        return -1


def check_cpu_budget(job: JobCfg) -> None:
    """Ray Data decodes on CPUs the training workers do not hold, and every worker's custom
    resources must exist somewhere: fail early, not by deadlock."""
    import ray

    cluster = ray.cluster_resources()
    total = cluster.get("CPU", 0)
    train_cpus = max(job.train.num_workers, 1) * job.train.cpus_per_worker
    if total - train_cpus < min(job.data.decode_num_cpus, 0.5):
        raise ValueError(
            f"train.num_workers={job.train.num_workers} x train.cpus_per_worker={job.train.cpus_per_worker} "
            f"reserve {train_cpus:g} of the cluster's {total:g} CPUs, leaving none for Ray Data decoding; "
            "lower train.cpus_per_worker (e.g. 0.5) or add CPUs")
    for key, value in job.cluster.worker_resources.items():
        need, have = value * max(job.train.num_workers, 1), cluster.get(key, 0)
        if have < need:
            raise ValueError(
                f"cluster.worker_resources.{key}={value:g} x train.num_workers={job.train.num_workers} needs "
                f"{need:g} {key}, the cluster's nodes advertise {have:g}; start "
                f"the nodes with ray start --resources '{{\"{key}\": ...}}' or lower train.num_workers")


def resolve_pretrained(job: JobCfg) -> str | None:
    """An s3:// backbone checkpoint is downloaded once to the work dir (streamed to a temporary
    file, then renamed: never held in memory, never half-written); tags and paths pass through."""
    ref = job.model.backbone.pretrained
    if ref and ref.startswith("models:/"):       # a backbone registered by `tvr pretrain`
        from tvr_platform.pretrain.recipe import resolve_backbone_ref

        return resolve_backbone_ref(ref, job.work_dir, job.tracking_uri)
    if not ref or not ref.startswith("s3://"):
        return ref
    from tvr_platform.storage import open_storage

    target = Path(job.work_dir) / "cache" / "checkpoints" / ref.removeprefix("s3://").replace("/", "__")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        store = open_storage(ref.rsplit("/", 1)[0], endpoint_url=job.storage.endpoint_url, region=job.storage.region)
        part = target.with_name(f"{target.name}.part-{os.getpid()}")
        store.download_file(ref.rsplit("/", 1)[1], part)
        part.replace(target)
    return str(target)
