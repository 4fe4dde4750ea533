"""The ``tune`` section of a job spec (used by ``tvr tune``); the space syntax is in ``tune/space.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(kw_only=True)
class TuneCfg:
    search_space: dict[str, Any] = field(default_factory=dict)
    """Dotted config key -> distribution spec, e.g. {'train.lr': {'loguniform': [1e-5, 1e-3]}}; optional
    'when: {model.method: tmass}' makes a key conditional (docs/tuning.md)."""
    methods: list[str] = field(default_factory=list)
    """Sample model.method over these methods, each with its documented knob space (conditional)."""
    common_knobs: bool = False
    """Add the shared knobs (lr, backbone_lr, frames per clip, batch size) to the space."""
    name: str = ""
    """Campaign name: the Tune experiment and the MLflow parent run ('' = run.name)."""
    num_samples: int = 4
    """Trials to sample (grid axes multiply it, as in Ray Tune)."""
    search_alg: Literal["random", "optuna"] = "random"
    """random/grid (Ray's BasicVariantGenerator) or Optuna TPE."""
    seed: int | None = None
    """Seed of the search algorithm (None = unseeded)."""
    metric: str = "t2v_R1"
    """Validation metric the campaign optimises (reported every epoch by each trial)."""
    mode: Literal["max", "min"] = "max"
    """Whether ``metric`` is maximised or minimised."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha = early-stop weak trials on ``metric`` per epoch; fifo = run every trial to the end."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: keep 1/reduction_factor of the trials at each rung."""
    max_concurrent_trials: int = 1
    """Trials running at once (each holds train.num_workers x train.cpus_per_worker CPUs + decode)."""
    trial_cpus: float = 0.01
    """CPUs of each trial's driver function (it only waits on its TorchTrainer; the workers hold
    their own resources in the trainer's placement group)."""
    trial_gpus: float = 0.0
    """GPUs of each trial's driver function (keep 0: GPUs go to the trainer's workers)."""
    max_failures: int = 0
    """Tune retries of an errored trial (it resumes its Ray Train run from the latest checkpoint)."""
    promote: bool = False
    """At campaign end register the best trial (tracking.registered_model or tvr-<method>) and
    move 'challenger' (and 'champion' if it beats the current one)."""

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ValueError("tune.num_samples and tune.max_concurrent_trials must be >= 1")
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ValueError("tune.grace_period must be >= 1 and tune.reduction_factor > 1")
        if self.trial_cpus < 0 or self.trial_gpus < 0 or self.trial_cpus + self.trial_gpus <= 0:
            raise ValueError("tune.trial_cpus / tune.trial_gpus must be >= 0 and not both 0 "
                             "(Ray rejects an empty trial resource request; use e.g. trial_cpus: 0.01)")
        if self.max_failures < 0:
            raise ValueError("tune.max_failures must be >= 0")
