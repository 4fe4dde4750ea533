"""The entrypoint of a submitted job, run by Ray on the cluster: ``python -m tvr_platform.cluster.launch CMD``.

It writes the resolved spec that ``tvr submit`` put in ``TVR_JOB_SPEC`` to a private temporary
file (never into the shared, cached working dir) and replaces itself with
``python -m tvr_platform.cli CMD <file>`` -- the same command a laptop runs, so a submitted job and
a local one differ only in where they run. ``check`` instead validates the spec and prints what
the job sees (imports, versions, GPUs, the Ray job id) as one JSON line and exits: a cheap smoke
test of a cluster's image and the code shipping (``tvr submit spec.yaml --command check``).

The same entrypoint serves a KubeRay RayJob (``infra/kuberay/rayjob.yaml``): the spec arrives in
``TVR_JOB_SPEC`` through ``runtimeEnvYAML``, and the Ray submission id (the RayJob's ``jobId``) is
read from Ray's job config when ``TVR_RAY_JOB_ID`` is not set.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from tvr_platform.cluster.submit import COMMANDS, JOB_ID_ENV, SPEC_ENV, SPEC_NAME_ENV


def _ray_job_config(env: dict[str, str] | os._Environ = os.environ) -> dict:
    """The job config Ray hands a Ray Jobs entrypoint (``RAY_JOB_CONFIG_JSON_ENV_VAR``); {} outside one."""
    try:
        config = json.loads(env.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def ray_submission_id(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The Ray Jobs submission id this driver runs under (job config metadata ``job_submission_id``)."""
    return (_ray_job_config(env).get("metadata") or {}).get("job_submission_id") or None


def job_env_var_names(env: dict[str, str] | os._Environ = os.environ) -> set[str]:
    """Environment variables the submitted job's runtime_env already sets for every worker.

    A driver's ``ray.init(runtime_env=...)`` is merged with the job's, and Ray refuses the merge when
    both name the same variable; these must be left out of the driver's runtime_env."""
    return set((_ray_job_config(env).get("runtime_env") or {}).get("env_vars") or {})


def link_job_id(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    """Make sure ``TVR_RAY_JOB_ID`` (the MLflow tag ``tvr.ray_job_id``) is set: ``tvr submit`` sets it;
    a KubeRay RayJob or a plain ``ray job submit`` does not, so it is taken from Ray's job config."""
    if not env.get(JOB_ID_ENV):
        found = ray_submission_id(env)
        if found:
            env[JOB_ID_ENV] = found
    return env.get(JOB_ID_ENV)


def write_spec(env: dict[str, str] | os._Environ = os.environ) -> Path:
    text = env.get(SPEC_ENV)
    if not text:
        raise SystemExit(f"tvr launch: {SPEC_ENV} is empty; submit jobs with `tvr submit <spec.yaml>`")
    name = Path(env.get(SPEC_NAME_ENV) or "job.yaml").name
    folder = Path(tempfile.mkdtemp(prefix=f"{env.get(JOB_ID_ENV, 'tvr-job')}-"))
    path = folder / name
    path.write_text(text)
    return path


def check(spec: Path) -> dict:
    """Load the spec and report the job's view of the cluster."""
    import ray
    import torch

    import tvr
    import tvr_platform
    from tvr_platform.config import load_job

    job = load_job(spec)
    return {
        "job_id": os.environ.get(JOB_ID_ENV), "spec": spec.name, "run": job.run.name, "method": job.model.method,
        "cluster_address": job.cluster.address, "tvr": tvr.__file__, "tvr_platform": tvr_platform.__file__,
        "python": sys.version.split()[0], "ray": ray.__version__, "torch": torch.__version__,
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0, "cwd": os.getcwd(),
        "env_vars": {k: os.environ.get(k) for k in sorted(job.cluster.env_vars)},
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in COMMANDS:
        print(f"usage: python -m tvr_platform.cluster.launch {{{','.join(COMMANDS)}}}", file=sys.stderr)
        return 2
    link_job_id()
    spec = write_spec()
    if argv[0] == "check":
        print("tvr-check " + json.dumps(check(spec), sort_keys=True), flush=True)
        return 0
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "tvr_platform.cli", argv[0], str(spec)])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
