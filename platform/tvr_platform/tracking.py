"""MLflow tracking: one run per job (resumed by run name), params from the flattened config.

All calls go through an explicit ``MlflowClient`` bound to a tracking URI and run id, so the
driver and the rank-0 worker log to the same run without global MLflow state. mlflow is
imported lazily. Values whose key looks like a credential are never logged.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvr_platform.config import JobCfg, flatten

RUN_NAME_TAG = "tvr.run_name"
RAY_JOB_ENV = "TVR_RAY_JOB_ID"
_SECRET = re.compile(r"(secret|token|password|passwd|api_key|apikey|access_key|credential)", re.I)


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Values of credential-looking keys become '***'; every other value is redacted by value (URL
    userinfo, env values of secret-looking names: :mod:`tvr_platform.redaction`)."""
    from tvr_platform.redaction import redact_text, secret_values

    secrets = tuple(secret_values())
    return {k: ("***" if _SECRET.search(k) else redact_text(str(v), secrets) if v is not None else v)
            for k, v in params.items()}


# Runs this process opened and has not terminated: a command that fails marks them FAILED/KILLED.
_OPEN: dict[str, Tracker] = {}


def end_open_runs(status: str = "FAILED") -> None:
    """Mark every run this process left open with ``status`` (the CLI calls it on every failure)."""
    for tracker in list(_OPEN.values()):
        try:
            tracker.terminate(status)
        except Exception:  # noqa: BLE001 - the tracking server may be what failed
            _OPEN.pop(tracker.run_id, None)


def git_commit(repo: Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo or Path(__file__).parent, text=True,
                              capture_output=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@dataclass
class Tracker:
    """Logs to one MLflow run. Picklable (URI + ids only), so it crosses Ray boundaries."""

    tracking_uri: str
    run_id: str

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 900])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in redact(params).items() if k not in existing]
        for i in range(0, len(new), 90):
            self.client.log_batch(self.run_id, params=new[i:i + 90])

    def set_tags(self, tags: dict[str, str]) -> None:
        from tvr_platform.redaction import redact_text

        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, redact_text(str(v)))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        from tvr_platform.redaction import redact_text

        self.client.log_text(self.run_id, redact_text(text), artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        from tvr_platform.redaction import redact

        self.client.log_dict(self.run_id, redact(data), artifact_file)

    def terminate(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
        _OPEN.pop(self.run_id, None)

    def fail(self, status: str = "FAILED") -> None:
        """End the run as failed (or KILLED) unless another process already ended it: a Tune trial
        that ASHA stops is marked KILLED by the campaign while its trainer is torn down, and the
        error that teardown raises here must not turn it into FAILED."""
        if self.client.get_run(self.run_id).info.status == "RUNNING":
            self.client.set_terminated(self.run_id, status)
        _OPEN.pop(self.run_id, None)

    def url(self) -> str:
        """The run's page on a tracking server (http[s]), else where to find it in a local store."""
        from tvr_platform.redaction import redact_text

        run = self.client.get_run(self.run_id)
        if self.tracking_uri.startswith(("http://", "https://")):
            return redact_text(f"{self.tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{self.run_id}")
        return redact_text(f"{self.tracking_uri} experiment {run.info.experiment_id} run {self.run_id}")


def start_run(job: JobCfg, *, nested_in: str | None = None, run_name: str | None = None) -> Tracker:
    """Create the job's MLflow run, or reopen the run of an earlier job with the same name."""
    from mlflow.tracking import MlflowClient

    name = run_name or job.run.name
    exp_id = ensure_experiment(job.tracking_uri, job.tracking.experiment, job.artifact_location)
    client = MlflowClient(job.tracking_uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    tags = {RUN_NAME_TAG: name, "tvr.method": job.model.method, "tvr.backbone": job.model.backbone.name,
            "tvr.git_commit": git_commit()}
    if os.environ.get(RAY_JOB_ENV):
        tags["tvr.ray_job_id"] = os.environ[RAY_JOB_ENV]
    if nested_in:
        tags["mlflow.parentRunId"] = nested_in
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    tracker = Tracker(job.tracking_uri, run_id)
    _OPEN[run_id] = tracker
    from tvr_platform.runs import applicable_params, source_tags

    tracker.set_tags({**source_tags(job), **tags})  # mlflow.source.*, mlflow.user, mlflow.note.content
    tracker.log_params(applicable_params(job, flatten(job)))
    return tracker
