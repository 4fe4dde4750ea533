"""The ``tune`` section of a job spec (used by ``tvr tune``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(kw_only=True)
class TuneCfg:
    search_space: dict[str, Any] = field(default_factory=dict)
    """Dotted config key -> distribution spec, e.g. {'train.lr': {'loguniform': [1e-5, 1e-3]}}."""
    num_samples: int = 4
    """Trials to sample (grid axes multiply it, as in Ray Tune)."""
    search_alg: Literal["random", "optuna"] = "random"
    """random/grid (Ray's BasicVariantGenerator) or Optuna TPE."""
    metric: str = "t2v_R1"
    """Validation metric the campaign optimises."""
    mode: Literal["max", "min"] = "max"
    """Whether ``metric`` is maximised or minimised."""
    max_concurrent_trials: int = 1
    """Trials running at once."""
