"""`tvr quickstart` end to end on tiny sizes: synthetic MP4s -> Ray Data -> Ray Train (2 workers)
-> evaluation -> MLflow run -> registry alias -> `tvr eval models:/...` reproduces the metrics."""

from __future__ import annotations

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
    assert all(k in epochs[-1] for k in ("step 4", "loss", "val t2v_R1", "samples/s", "ETA")), epochs
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
    for key in ("final/t2v_R1", "final/v2t_MnR", "val/t2v_R5", "train/loss", "perf/samples_per_s"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) == 2  # one per epoch
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/learning_curves.png"]
    assert run.data.tags["mlflow.note.content"].startswith("**meanp** on `tvr-tiny`")
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == ["synthetic-test", "synthetic-train"]

    version = client.get_model_version("tiny-qs", "1")
    assert version.tags["method"] == "meanp" and version.run_id == run.info.run_id
    assert "**meanp** on `tvr-tiny`" in version.description and run.info.run_id in version.description
    # champion only above chance (4 test clips: t2v R@1 chance = 25 %)
    if run.data.metrics["final/t2v_R1"] > 25.0:
        assert "alias champion moved: no champion yet" in out
        assert client.get_model_version_by_alias("tiny-qs", "champion").version == version.version
    else:
        assert "alias champion not moved: t2v_R1 " in out and "does not beat chance (25)" in out

    # a rerun of the complete run trains and registers nothing, and says so
    assert main(["quickstart", *overrides]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "registered earlier as models:/tiny-qs/1" in out
    assert [v.version for v in client.search_model_versions("name='tiny-qs'")] in (["1"], [1])

    report = evaluate_model("models:/tiny-qs/1", [f"run.work_dir={tmp_path}"], job.tracking_uri)
    for k, v in report["metrics"].items():
        assert v == pytest.approx(run.data.metrics[f"final/{k}"], abs=1e-6), k
