"""`tvr quickstart` end to end on tiny sizes: synthetic MP4s -> Ray Data -> Ray Train (2 workers)
-> evaluation -> MLflow run -> registry alias -> `tvr eval models:/...` reproduces the metrics."""

from __future__ import annotations

import json

import pytest

from tiny import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_quickstart_runs_end_to_end_and_the_registered_model_reproduces(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from tvr_platform.cli import REPO_JOBS, main
    from tvr_platform.config import load_job
    from tvr_platform.recipes import evaluate_model

    overrides = tiny_overrides(tmp_path, **{"train.epochs": 2, "tracking.registered_model": "tiny-qs"})
    assert main(["quickstart", *overrides]) == 0
    cap = capsys.readouterr()
    out = cap.out
    # default verbosity: tvr's lines only (one per epoch from rank 0); Ray's / MLflow's go to a file
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) <= 24, out
    epochs = [line for line in lines if line.startswith("[tvr] epoch ")]
    assert [e.split()[2] for e in epochs] == ["1/2", "2/2"], out
    # 12 training clips less 1 held out for validation: 11 // (3 x 2 workers) = 1 step per epoch
    assert all(k in epochs[-1] for k in ("step 2", "loss", "val t2v_R1", "samples/s", "ETA")), epochs
    assert not [line for line in cap.err.splitlines() if line.strip()], cap.err
    (log,) = (tmp_path / "logs").glob("tvr-*.log")
    assert "Failed to query Ray Train Controller" in log.read_text() or "RayTrainWorker" in log.read_text()
    assert "t2v_R1" in out and "mlflow ui --backend-store-uri sqlite:///" in out

    job = load_job(REPO_JOBS / "quickstart.yaml", overrides)
    client = MlflowClient(job.tracking_uri)
    exp = client.get_experiment_by_name(job.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`tvr.run_name` = 'quickstart-meanp'")
    assert run.data.params["model.method"] == "meanp" and run.data.params["data.num_frames"] == "2"
    assert run.info.status == "FINISHED"
    for key in ("final/test/t2v_R1", "final/test/v2t_MnR", "final/val/t2v_R1", "test/t2v_R1", "val/t2v_R5",
                "train/loss", "perf/samples_per_s"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) == 2  # one per epoch
    # every epoch is scored on the held-out validation video only; the 4 test clips once, at the end
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val/num_videos")] == [1, 1]
    assert len(client.get_metric_history(run.info.run_id, "final/test/t2v_R1")) == 1
    assert run.data.metrics["final/test/num_videos"] == 4
    from tvr_platform.data.pipeline import load_splits
    from tvr_platform.train.worker import select_epoch

    train_m, val_m, test_m = load_splits(job)
    val_scores = sorted(client.get_metric_history(run.info.run_id, "val/t2v_R1"), key=lambda m: m.step)
    selected = select_epoch(list(enumerate(m.value for m in val_scores)), "max") + 1
    assert run.data.metrics["final/epoch"] == selected
    recorded = json.loads((tmp_path / "storage" / "runs" / "quickstart-meanp" / "validation.json").read_text())
    assert recorded["video_ids"] == val_m.video_ids and recorded["seed"] == 0
    assert not set(val_m.video_ids) & (set(train_m.video_ids) | set(test_m.video_ids))
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/learning_curves.png"]
    assert run.data.tags["mlflow.note.content"].startswith("**meanp** on `tvr-tiny`")
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == [
        "synthetic-test", "synthetic-train", "synthetic-train-held-out"]

    version = client.get_model_version("tiny-qs", "1")
    assert version.tags["method"] == "meanp" and version.run_id == run.info.run_id
    assert "**meanp** on `tvr-tiny`" in version.description and run.info.run_id in version.description
    assert f"Weights of epoch {selected} of 2, the best by validation t2v_R1" in version.description
    assert version.tags["selected_epoch"] == str(selected)
    assert float(version.tags["val.t2v_R1"]) == pytest.approx(run.data.metrics["final/val/t2v_R1"], abs=1e-4)
    assert float(version.tags["test.t2v_R1"]) == pytest.approx(run.data.metrics["final/test/t2v_R1"], abs=1e-4)
    # champion only above chance on validation (1 held-out clip: t2v R@1 chance = 100 %, never beaten)
    assert "alias champion not moved: t2v_R1 100 does not beat chance (100)" in out
    assert f"Test split (test), epoch {selected} of 2 (best validation t2v_R1 100.0)" in out

    # a rerun of the complete run trains and registers nothing, and says so
    assert main(["quickstart", *overrides]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "registered earlier as models:/tiny-qs/1" in out
    assert [v.version for v in client.search_model_versions("name='tiny-qs'")] in (["1"], [1])

    report = evaluate_model("models:/tiny-qs/1", [f"run.work_dir={tmp_path}"], job.tracking_uri)
    for k, v in report["metrics"].items():  # the registered weights are those the test split scored
        assert v == pytest.approx(run.data.metrics[f"final/test/{k}"], abs=1e-6), k
