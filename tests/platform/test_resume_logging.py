"""Resume logs every epoch once: epoch metrics reach MLflow only after the checkpoint holding them
is reported, and a resumed run logs the restored epoch if the run that wrote it died before
logging it. (Before, a run dying between logging and committing epoch e redid e on rerun and
logged it twice, with different values.)"""

from __future__ import annotations

import pytest

from tiny import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_every_epoch_is_logged_once_across_crashes_and_reruns(tmp_path):
    from mlflow.tracking import MlflowClient

    from tvr_platform.config import load_job
    from tvr_platform.recipes import ensure_synthetic
    from tvr_platform.train.trainer import run_training

    job = load_job(None, tiny_overrides(tmp_path, **{"train.epochs": 2, "run.name": "crashy"}))
    ensure_synthetic(job)
    # 1: dies right after epoch 0's checkpoint is reported, before logging it
    with pytest.raises(Exception, match="injected crash after"):
        run_training(job, extra_config={"crash": {"epoch": 0, "when": "after_report"}})
    # 2: resumes at epoch 1 (logs epoch 0 from the checkpoint), dies before epoch 1's report
    with pytest.raises(Exception, match="injected crash before"):
        run_training(job, extra_config={"crash": {"epoch": 1, "when": "before_report"}})
    # 3: resumes at epoch 1 again and finishes
    result = run_training(job)
    assert result.metrics["epoch"] == 1
    client = MlflowClient(job.tracking_uri)
    for key in ("epoch", "train_loss", "val/t2v_R1"):
        history = sorted(client.get_metric_history(result.tracker.run_id, key), key=lambda m: m.step)
        assert len(history) == 2 and history[0].step < history[1].step, (key, history)
    assert [m.value for m in sorted(client.get_metric_history(result.tracker.run_id, "epoch"),
                                    key=lambda m: m.step)] == [0.0, 1.0]
