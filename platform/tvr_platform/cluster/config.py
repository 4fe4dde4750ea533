"""The ``cluster`` section of a job spec: where and with what resources a job runs."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    env_vars: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the job's processes (never secrets: use IAM / k8s secrets)."""
