"""Ray Train with DeepSpeed (ZeRO 0-3) and DDP on 2 CPU workers: training, checkpoints, exact
resume, and restart after a worker dies."""

from __future__ import annotations

import pytest

from tiny import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _job(tmp_path, **extra):
    from tvr_platform.config import load_job
    from tvr_platform.recipes import ensure_synthetic

    job = load_job(None, tiny_overrides(tmp_path, **extra))
    ensure_synthetic(job)
    return job


def _history(job, run_id, key):
    from mlflow.tracking import MlflowClient

    return [m.value for m in sorted(MlflowClient(job.tracking_uri).get_metric_history(run_id, key),
                                     key=lambda m: (m.step, m.timestamp))]


def _losses(job, run_id):
    return _history(job, run_id, "train_loss")


@pytest.mark.parametrize("strategy, stage", [("ddp", 0), ("deepspeed", 0), ("deepspeed", 1),
                                             ("deepspeed", 2), ("deepspeed", 3)])
def test_two_workers_train_and_export(tmp_path, strategy, stage):
    """3 epochs whose validation scores (forced by a test hook) make epoch 2 of 3 the best: its
    checkpoint is kept (train.checkpoints_to_keep=1: the best + the latest), holds the exported
    weights, and is loaded back on every rank for the one test evaluation."""
    from mlflow.tracking import MlflowClient

    from tvr_platform.train.trainer import run_training

    # 19 clips: 2 steps per worker and epoch once validation holds some out (1 step made the
    # epoch losses single-batch noise); the validation and test splits stay uneven over 2 workers
    job = _job(tmp_path, **{"train.strategy": strategy, "train.zero_stage": stage, "train.epochs": 3,
                            "run.name": f"{strategy}{stage}", "train.checkpoints_to_keep": 1,
                            "data.synth.num_clips": 19})
    result = run_training(job, extra_config={"select_scores": [10.0, 30.0, 20.0]})
    losses = _losses(job, result.tracker.run_id)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert result.weights_path is not None and result.weights_path.stat().st_size > 0
    assert 0.0 <= result.metrics["t2v_R1"] <= 100.0 and result.metrics["best_epoch"] == 1
    assert result.selected_epoch == 1 and result.val_metrics["epoch"] == 1
    assert result.checkpoint_path.endswith("epoch=0001")
    kept = sorted(p.name for p in (tmp_path / "storage" / "runs" / job.run.name).glob("epoch=*"))
    assert kept == ["epoch=0001", "epoch=0002"], kept                  # epoch 0: neither best nor latest
    assert not (tmp_path / "storage" / "runs" / job.run.name / "epoch=0002" / "model.pt").exists()
    logged = MlflowClient(job.tracking_uri).get_run(result.tracker.run_id).data.metrics
    from tvr_platform.data.pipeline import load_splits

    _, val, test = load_splits(job)
    assert (val.num_videos % 2, test.num_videos % 2) == (1, 1), (val.num_videos, test.num_videos)
    assert logged["final/epoch"] == 2 and result.val_metrics["num_videos"] == val.num_videos
    assert logged["final/test/num_videos"] == test.num_videos == result.test_metrics["num_videos"]
    if strategy == "ddp" or stage == 3:
        # the workers' test scores are those of the exported (selected) weights, not the last epoch's
        from tvr_platform.config import job_to_yaml
        from tvr_platform.recipes import evaluate_model

        spec = tmp_path / "job.yaml"
        spec.write_text(job_to_yaml(job))
        report = evaluate_model(str(spec), [])
        for k, v in report["metrics"].items():
            assert v == pytest.approx(result.test_metrics[k], abs=1e-4), k


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_resume_continues_with_the_identical_next_step(tmp_path, strategy):
    """Run A stops right after its epoch-0 checkpoint and takes one probe step; run B (same name)
    resumes from that checkpoint and takes the same probe step: the losses must be identical."""
    from tvr_platform.train.trainer import run_training

    job = _job(tmp_path, **{"train.strategy": strategy, "train.zero_stage": 2 if strategy == "deepspeed" else 0,
                            "train.epochs": 2, "run.name": f"resume-{strategy}"})
    first = run_training(job, extra_config={"probe": 0})
    resumed = run_training(job, extra_config={"probe": 0})
    assert resumed.metrics["epoch"] == 0  # restored from the epoch-0 checkpoint
    assert resumed.tracker.run_id == first.tracker.run_id  # the same MLflow run is reopened
    probes = _history(job, first.tracker.run_id, "probe_next_loss")
    assert len(probes) == 2 and probes[0] == probes[1], probes


def test_worker_failure_is_restarted_from_the_last_checkpoint(tmp_path):
    from tvr_platform.data.pipeline import load_splits
    from tvr_platform.train.trainer import run_training

    job = _job(tmp_path, **{"train.epochs": 2, "train.max_failures": 1, "run.name": "failing"})
    steps_per_epoch = load_splits(job)[0].num_videos // (3 * 2)        # 11 of 12 videos train (1 validates)
    # the first step of epoch 1, after epoch 0's checkpoint
    result = run_training(job, extra_config={"fail_at_step": steps_per_epoch})
    assert result.metrics["epoch"] == 1 and result.weights_path is not None
