"""The ``cluster`` section of a job spec: where and with what resources a job runs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tvr_platform.redaction import SECRET_NAME

# Environment variable names that carry credentials (SECRET_NAME) never go into a job spec: on a
# cluster they come from IAM roles (IRSA) or Kubernetes Secrets mounted into the pods (infra/).
# scheme://user:password@host -- a password inside a URI.
URI_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@", re.IGNORECASE)


@dataclass(kw_only=True)
class ClusterCfg:
    address: str | None = None
    """Ray address: None starts a local Ray; 'auto' joins a running one; http://head:8265 for ``tvr submit``."""
    num_cpus: int | None = None
    """CPUs for a local Ray (None = all)."""
    entrypoint_num_gpus: float = 0.0
    """GPUs reserved for the job's driver process on submission."""
    entrypoint_num_cpus: float = 1.0
    """CPUs reserved for the job's driver process on submission."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each training worker reserves on top of train.cpus_per_worker / GPU,
    e.g. {tvr_worker: 1} with one unit per node (``ray start --resources``) to put one worker on
    each node. Not CPU / GPU / memory (set those with train.*)."""
    env_vars: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the job's processes (never secrets: use IAM / k8s secrets)."""
    ship_code: bool = True
    """``tvr submit`` uploads this checkout (runtime_env working_dir + py_modules); False = the cluster image has tvr installed."""
    excludes: list[str] = field(default_factory=list)
    """Extra .gitignore-style patterns left out of the uploaded code (on top of the built-in ones)."""
    ship_untracked: list[str] = field(default_factory=list)
    """Files git does not track that ``tvr submit`` ships anyway (glob patterns relative to the
    checkout root); everything else untracked stays home. Credential files are refused regardless."""

    def __post_init__(self) -> None:
        if self.entrypoint_num_gpus < 0 or self.entrypoint_num_cpus < 0:
            raise ValueError("cluster.entrypoint_num_gpus and cluster.entrypoint_num_cpus must be >= 0")
        for key, value in self.worker_resources.items():
            if key in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"cluster.worker_resources.{key}: set CPUs with train.cpus_per_worker and GPUs "
                                 "with train.use_gpu; worker_resources is for custom resources only")
            if not value > 0:
                raise ValueError(f"cluster.worker_resources.{key}={value} must be > 0 (a quantity the nodes "
                                 "advertise with ray start --resources)")
        for key, value in self.env_vars.items():
            if SECRET_NAME.search(key) or URI_PASSWORD.search(str(value)):
                raise ValueError(
                    f"cluster.env_vars.{key} looks like a credential; job specs are shipped in clear text. "
                    "Give the pods an IAM role (IRSA) or mount a Kubernetes Secret instead (docs/laptop-to-cluster.md)")
