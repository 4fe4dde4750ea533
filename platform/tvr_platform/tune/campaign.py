"""``run_campaign(job)``: a Ray Tune campaign whose trials run the same training service as
``tvr train`` (a Ray Train V2 ``TorchTrainer`` built by ``run_training`` inside a Tune function
trainable), tracked as one MLflow parent run with a child run per trial.

Resources (the trap on small machines): the trial is only the trainer's *driver*. Tune places the
trial function in a placement group whose bundles capture every child task and actor that does not
ask for its own scheduling strategy. The TorchTrainer's controller (0 CPU) lands there, and the
trainer's workers get their own placement group, so the trial must NOT reserve the workers' CPUs as
well: it asks for ``tune.trial_cpus`` (default 0.01 CPU) and the workers
(``train.num_workers x train.cpus_per_worker``) plus Ray Data's decode actors must fit the cluster
next to it. A trial that reserves a full CPU leaves a 2-CPU machine with too little for both.
"""

from __future__ import annotations

import json
import math
import signal
from dataclasses import dataclass
from typing import Any

from tvr_platform.config import ConfigError, JobCfg, job_from_dict, job_to_dict, job_to_yaml
from tvr_platform.tune.space import SearchSpace, apply_values, build_space, merged_space

CAMPAIGN_TAG = "tvr.tune.campaign"
ROLE_TAG = "tvr.tune.role"
TRIAL_ID_TAG = "tvr.tune.trial_id"
CHECKPOINT_TAG = "tvr.checkpoint_path"
VALIDATION_METRICS = tuple(f"{d}_{m}" for d in ("t2v", "v2t") for m in ("R1", "R5", "R10", "MdR", "MnR")) \
    + ("train_loss",)


def campaign_name(job: JobCfg) -> str:
    return job.tune.name or job.run.name


def tune_storage(job: JobCfg) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) of the campaign's Tune experiments."""
    from tvr_platform.train.trainer import run_storage

    return run_storage(job, "tune")


def check_campaign(job: JobCfg) -> SearchSpace:
    """Everything that can be checked without Ray: the space, the metric, the schedule."""
    space = build_space(job)
    if job.tune.metric not in VALIDATION_METRICS:
        raise ConfigError(f"tune.metric={job.tune.metric!r}: choose one of {list(VALIDATION_METRICS)}")
    if job.tune.scheduler == "asha" and job.tune.grace_period > job.train.epochs:
        raise ConfigError(f"tune.grace_period={job.tune.grace_period} exceeds train.epochs={job.train.epochs}")
    if job.train.eval_every != 1 and job.tune.scheduler == "asha":
        raise ConfigError("tune.scheduler=asha needs the validation metric every epoch: set train.eval_every=1")
    return space


def check_trial_capacity(job: JobCfg) -> None:
    """Concurrent trials must fit: each holds its driver (``tune.trial_cpus``) and its workers'
    placement group; otherwise waiting trainers time out and retry for ever."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    # Decode actors of concurrent trials hold CPUs too: with no room for them, trials deadlock
    # (each waits for the CPUs the others' decode actors hold).
    decode = job.data.decode_concurrency * job.data.decode_num_cpus if job.tune.max_concurrent_trials > 1 else 0
    per_trial = job.tune.trial_cpus + max(job.train.num_workers, 1) * job.train.cpus_per_worker + decode
    if job.tune.max_concurrent_trials * per_trial > total + 1e-9:
        raise ConfigError(
            f"tune.max_concurrent_trials={job.tune.max_concurrent_trials} trials x ({job.tune.trial_cpus:g} driver"
            f" + {max(job.train.num_workers, 1)} x {job.train.cpus_per_worker:g} worker CPUs + decode actors) "
            f"exceed the cluster's {total:g} CPUs; lower tune.max_concurrent_trials or train.cpus_per_worker")


def trial_job(base: JobCfg, space: SearchSpace, config: dict[str, Any], trial_id: str) -> JobCfg:
    """The job a trial trains: the campaign's job + its sampled values, named after the trial
    (a deterministic name, so a retried trial resumes its Ray Train run)."""
    job = apply_values(base, space.trial_values(config))
    job.run.name = f"{campaign_name(base)}-{trial_id}"
    # the trial's epoch is chosen on what the campaign ranks trials by (validation, never test)
    job.train.select_metric, job.train.select_mode = base.tune.metric, base.tune.mode
    return job


# -- the trial (runs in a Tune function trainable) -------------------------------------------------

def run_trial(config: dict[str, Any], *, base: dict[str, Any], space: SearchSpace, parent_run_id: str) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from tvr_platform.tracking import start_run
    from tvr_platform.train.trainer import run_training

    base_job = job_from_dict(base)
    trial_id = tune.get_context().get_trial_id()
    job = trial_job(base_job, space, config, trial_id)
    values = space.trial_values(config)
    tracker = start_run(job, nested_in=parent_run_id, run_name=job.run.name)
    tracker.set_tags({CAMPAIGN_TAG: campaign_name(base_job), ROLE_TAG: "trial", TRIAL_ID_TAG: trial_id,
                      "tvr.tune.values": json.dumps(values, default=str)})
    tracker.log_text(job_to_yaml(job), "config/job.yaml")
    from tvr_platform.tune.cleanup import RecordPlacementGroup

    result = run_training(job, callbacks=[TuneReportCallback(), RecordPlacementGroup(tracker)], tracker=tracker)
    from tvr_platform.recipes import final_metrics

    test, val = final_metrics(result)
    loss = (result.val_metrics or {}).get("train_loss")
    # final/val/*: the selected epoch's validation scores (what the campaign ranks and promotes on);
    # final/test/* were logged by the trial's workers (reported, never used to choose)
    tracker.log_metrics({f"final/val/{k}": float(v) for k, v in val.items()}
                        | ({"final/train_loss": float(loss)} if loss is not None else {}))
    tracker.log_dict({"trial_id": trial_id, "run": job.run.name, "method": job.model.method,
                      "selected_epoch": None if result.selected_epoch is None else result.selected_epoch + 1,
                      "val_metrics": val, "test_split": job.data.test_split, "test_metrics": test,
                      "values": values, "checkpoint": result.checkpoint_path}, "report/eval.json")
    tracker.set_tags({CHECKPOINT_TAG: result.checkpoint_path})
    _log_learning_curve(tracker, base_job.tune.metric)
    tracker.terminate("FINISHED")


def _log_learning_curve(tracker, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = tracker.client.get_metric_history(tracker.run_id, metric if metric == "train_loss" else f"val/{metric}")
    loss = tracker.client.get_metric_history(tracker.run_id, "train_loss")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([m.step for m in history], [m.value for m in history], "o-", label=f"val/{metric}")
    ax.set_xlabel("global step")
    ax.set_ylabel(metric)
    if loss:
        ax2 = ax.twinx()
        ax2.plot([m.step for m in loss], [m.value for m in loss], "s--", color="tab:red", label="train_loss")
        ax2.set_ylabel("train_loss")
    ax.set_title("learning curve")
    fig.tight_layout()
    tracker.client.log_figure(tracker.run_id, fig, "plots/learning_curve.png")
    plt.close(fig)


# -- the campaign (driver) -------------------------------------------------------------------------

def _child_run_closer(tracking_uri: str, experiment: str, campaign: str):
    """A Tune callback for trials Tune ended (ASHA stop, error): mark their child runs in MLflow
    (a stopped trial's process is killed before it can close its own run) and free the worker
    placement group the killed trainer leaves behind (see ``tune/cleanup.py``)."""
    from ray.tune import Callback

    class ChildRunCloser(Callback):
        def _close(self, trial, status: str, tags: dict[str, str]) -> None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                return
            runs = client.search_runs([exp.experiment_id], filter_string=(
                f"tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}' and tags.`{CAMPAIGN_TAG}` = '{campaign}'"))
            from tvr_platform.tune.cleanup import PLACEMENT_GROUP_TAG, remove_placement_group

            # A stopped trial's trainer may have raised (and closed its run FAILED) while Tune tore
            # it down: the stop is the truth, so KILLED replaces that FAILED (Tracker.fail keeps a
            # KILLED that came first).
            replace = ("RUNNING", "FAILED") if status == "KILLED" else ("RUNNING",)
            for run in runs:
                if run.data.tags.get(PLACEMENT_GROUP_TAG):
                    remove_placement_group(run.data.tags[PLACEMENT_GROUP_TAG])
                if run.info.status in replace:
                    for k, v in tags.items():
                        client.set_tag(run.info.run_id, k, v)
                    client.set_terminated(run.info.run_id, status)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, "KILLED", {"tvr.tune.stopped_early": "true"})

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "FAILED", {})

    return ChildRunCloser()


def _search_alg(job: JobCfg, space: SearchSpace):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if job.tune.search_alg == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(space=space.define_by_run, sampler=optuna.samplers.TPESampler(seed=job.tune.seed),
                            seed=job.tune.seed)
    # Tune ignores TuneConfig.max_concurrent_trials for a BasicVariantGenerator passed in: set it here.
    return BasicVariantGenerator(random_state=job.tune.seed, max_concurrent=job.tune.max_concurrent_trials)


def _scheduler(job: JobCfg):
    from ray.tune.schedulers import FIFOScheduler

    if job.tune.scheduler == "asha":
        from tvr_platform.tune.asha import FinishLastEpochASHA

        return FinishLastEpochASHA(time_attr="training_iteration", max_t=job.train.epochs,
                             grace_period=job.tune.grace_period, reduction_factor=job.tune.reduction_factor)
    return FIFOScheduler()


@dataclass
class CampaignResult:
    name: str
    experiment_path: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    interrupted: bool
    promoted: dict[str, Any] | None = None


def run_campaign(job: JobCfg, *, resume: bool = False, retry_errored: bool = False) -> CampaignResult:
    """Validate, then run (or resume) the campaign and summarise it in the parent MLflow run."""
    from ray import tune

    from tvr_platform.data.pipeline import load_splits
    from tvr_platform.tracking import start_run
    from tvr_platform.train.trainer import init_ray

    space = check_campaign(job)  # before anything starts
    load_splits(job)  # the data (and a non-empty validation hold-out) must be there before trials start
    name = campaign_name(job)
    storage_path, storage_fs = tune_storage(job)
    exp_path = f"{storage_path}/{name}"
    init_ray(job)
    check_trial_capacity(job)
    can_restore = tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs)
    if resume and not can_restore:
        raise ConfigError(f"--resume: no campaign {name!r} at {exp_path} to resume (tune.name / run.name)")
    if not resume and can_restore:
        raise ConfigError(f"campaign {name!r} already exists at {exp_path}: add --resume to continue it, "
                          "or set another tune.name")

    parent = start_run(job, run_name=name)
    parent.set_tags({CAMPAIGN_TAG: name, ROLE_TAG: "campaign", "tvr.tune.experiment_path": exp_path})
    parent.log_dict(merged_space(job), "campaign/search_space.json")
    parent.log_text(job_to_yaml(job), "config/job.yaml")

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=job_to_dict(job), space=space, parent_run_id=parent.run_id),
        {"CPU": job.tune.trial_cpus, **({"GPU": job.tune.trial_gpus} if job.tune.trial_gpus else {})})
    if resume:
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=retry_errored, storage_filesystem=storage_fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={} if job.tune.search_alg == "optuna" else space.ray_param_space(job.tune.seed),
            tune_config=tune.TuneConfig(
                metric=job.tune.metric, mode=job.tune.mode, num_samples=job.tune.num_samples,
                search_alg=_search_alg(job, space), scheduler=_scheduler(job),
                # random/grid: the BasicVariantGenerator carries the limit (Tune ignores it there)
                max_concurrent_trials=job.tune.max_concurrent_trials if job.tune.search_alg == "optuna" else None),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=job.tune.max_failures),
                callbacks=[_child_run_closer(job.tracking_uri, job.tracking.experiment, name)]),
        )
    previous = signal.getsignal(signal.SIGINT)
    try:
        grid = tuner.fit()
    finally:
        signal.signal(signal.SIGINT, previous)

    from tvr_platform.tune.summary import summarize

    rows, best = summarize(grid, job, space, parent)
    # Ctrl-C: Tune saves the experiment and returns; unfinished or never-created trials remain.
    expected = job.tune.num_samples * math.prod(len(p.args) for p in space.params if p.kind == "grid")
    interrupted = len(rows) < expected or any(r["status"] == "UNFINISHED" for r in rows)
    result = CampaignResult(name=name, experiment_path=exp_path, parent_run_id=parent.run_id, rows=rows,
                            best=best, interrupted=interrupted)
    if interrupted:
        parent.terminate("KILLED")
        return result
    if job.tune.promote and best is not None:
        from tvr_platform.tune.promote import promote_trial

        result.promoted = promote_trial(job, best["run_id"])
        parent.log_dict(result.promoted, "campaign/promoted.json")
    parent.terminate("FINISHED")
    return result
