"""Search spaces of a tuning campaign: parsed, validated against the job config, turned into Ray
Tune / Optuna spaces, and applied back onto a job.

A space maps a dotted config key to ONE distribution and an optional ``when`` condition::

    train.lr:                {loguniform: [1.0e-5, 1.0e-3]}
    data.batch_size:         {choice: [8, 16]}
    model.method:            {choice: [tmass, ucofia]}
    model.tmass.radius:      {choice: [mean, scaled_mean, linear], when: {model.method: tmass}}
    model.ucofia.sinkhorn_iters: {randint: [0, 6], when: {model.method: ucofia}}

Kinds: ``choice`` (list), ``grid`` (list, every value tried; random/grid search only), ``uniform``
/ ``loguniform`` ([low, high]), ``quniform`` ([low, high, q]), ``randint`` ([low, high], both ends
included). A conditional key is sampled only when every ``when`` key (a discrete, unconditional key
of the same space) took one of the listed values; otherwise it is absent from the trial.

``tune.methods: [tmass, ucofia]`` adds ``model.method`` as a choice over those methods plus each
method's documented knob space (:data:`METHOD_SPACES`) conditioned on it; ``tune.common_knobs``
adds :data:`COMMON_SPACE` (learning rates, frames per clip, batch size). Entries written in
``tune.search_space`` replace preset entries of the same key.

Everything is checked by :func:`build_space` before any trial starts: unknown keys, sections,
untunable keys, bad ranges, values the config rejects, impossible conditions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tvr.methods import METHODS
from tvr_platform.config import ConfigError, JobCfg

DISCRETE = ("choice", "grid")
RANGES = ("uniform", "loguniform", "quniform", "randint")
KINDS = DISCRETE + RANGES

METHOD_SPACES: dict[str, dict[str, dict[str, Any]]] = {
    # ExCae: expert count M and active experts per pair (top-k <= M holds for every combination).
    "excae": {"model.excae.num_experts": {"choice": [4, 8, 16]},
              "model.excae.top_k": {"randint": [1, 4]}},
    # UCoFIA: Sinkhorn-Knopp iterations at evaluation (0 = off) and patches kept per frame.
    "ucofia": {"model.ucofia.sinkhorn_iters": {"choice": [0, 2, 4]},
               "model.ucofia.topk": {"randint": [1, 6]}},
    # T-MASS: the three radius parameterisations and the support-loss weight alpha.
    "tmass": {"model.tmass.radius": {"choice": ["mean", "scaled_mean", "linear"]},
              "model.tmass.support_weight": {"uniform": [0.4, 1.6]}},
    # VoP: prompted layers (ViT-B has 12; tiny backbones need a smaller space) and prompt tokens.
    "vop": {"model.vop.prompt_depth": {"choice": [4, 8, 12]},
            "model.vop.prompt_length": {"choice": [4, 8, 16]}},
}
"""First-class knob spaces of the seed methods, added by ``tune.methods``."""

COMMON_SPACE: dict[str, dict[str, Any]] = {
    "train.lr": {"loguniform": [1.0e-5, 1.0e-3]},
    "train.backbone_lr": {"loguniform": [1.0e-7, 1.0e-5]},
    "data.num_frames": {"choice": [4, 8, 12]},
    "data.batch_size": {"choice": [8, 16, 32]},
}
"""Knobs every method shares, added by ``tune.common_knobs: true``."""

UNTUNABLE = ("tune.", "tracking.", "storage.", "cluster.", "run.name", "run.work_dir", "captions.")


@dataclass(frozen=True)
class Param:
    """One sampled config key."""

    key: str
    kind: str
    args: tuple
    when: Mapping[str, tuple] = field(default_factory=dict)

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether this key is sampled, given the values sampled so far."""
        return all(k in values and values[k] in allowed for k, allowed in self.when.items())

    @property
    def values(self) -> tuple:
        """Discrete values, or the range ends for a range kind (what validation tries)."""
        if self.kind in DISCRETE:
            return self.args
        return self.args[:2]

    def ray_domain(self):
        from ray import tune

        a = self.args
        return {"choice": lambda: tune.choice(list(a)), "grid": lambda: tune.grid_search(list(a)),
                "uniform": lambda: tune.uniform(*a), "loguniform": lambda: tune.loguniform(*a),
                "quniform": lambda: tune.quniform(*a), "randint": lambda: tune.randint(a[0], a[1] + 1),
                }[self.kind]()

    def suggest(self, trial) -> Any:
        """Sample with an Optuna trial (define-by-run)."""
        a = self.args
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(a))
        if self.kind == "randint":
            return trial.suggest_int(self.key, a[0], a[1])
        if self.kind == "quniform":
            return trial.suggest_float(self.key, a[0], a[1], step=a[2])
        return trial.suggest_float(self.key, a[0], a[1], log=self.kind == "loguniform")


@dataclass(frozen=True)
class SearchSpace:
    """Validated parameters, conditions before the keys they condition."""

    params: tuple[Param, ...]

    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def trial_values(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The active keys of a sampled Tune config (inactive conditional keys dropped)."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.key in config and p.active(values):
                values[p.key] = config[p.key]
        return values

    def ray_param_space(self, seed: int | None = None) -> dict[str, Any]:
        """Flat {dotted key: Tune domain}; conditional keys are ``sample_from`` that return None
        when inactive (dropped again by :meth:`trial_values`), drawing from their own generator
        seeded from ``seed`` (Ray's ``random_state`` does not reach ``sample_from``)."""
        from ray import tune

        out: dict[str, Any] = {}
        for p in self.params:
            out[p.key] = tune.sample_from(_ConditionalSample(p, seed)) if p.when else p.ray_domain()
        return out

    def define_by_run(self, trial) -> None:
        """Optuna define-by-run: only active keys are suggested, so TPE sees a conditional space."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(values):
                values[p.key] = p.suggest(trial)

    @property
    def has_grid(self) -> bool:
        return any(p.kind == "grid" for p in self.params)


class _ConditionalSample:
    """``tune.sample_from`` callable (picklable): the parameter's sample, or None when inactive."""

    def __init__(self, param: Param, seed: int | None = None):
        import zlib

        import numpy as np

        self.param = param
        self.rng = np.random.default_rng(None if seed is None else [seed, zlib.crc32(param.key.encode())])

    def __call__(self, spec) -> Any:
        values = {k: spec.config[k] for k in self.param.when}
        if not self.param.active(values):
            return None
        return self.param.ray_domain().sample(random_state=self.rng)


# -- parsing and validation ----------------------------------------------------------------------

def merged_space(job: JobCfg) -> dict[str, Any]:
    """Preset entries (``tune.methods``, ``tune.common_knobs``) overlaid by ``tune.search_space``."""
    tune = job.tune
    raw: dict[str, Any] = {}
    if tune.common_knobs:
        raw.update(COMMON_SPACE)
    if tune.methods:
        unknown = [m for m in tune.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"tune.methods: {unknown} are not tvr methods; choose from {sorted(METHODS)}")
        raw["model.method"] = {"choice": list(tune.methods)}
        for m in tune.methods:
            for key, spec in METHOD_SPACES.get(m, {}).items():
                raw[key] = {**spec, "when": {"model.method": m}}
    for key, spec in tune.search_space.items():
        raw[key] = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    return raw


def _number(key: str, v: Any, *, integer: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
        raise ConfigError(f"tune.search_space.{key}: {v!r} is not {'an integer' if integer else 'a number'}")
    if not math.isfinite(v):
        raise ConfigError(f"tune.search_space.{key}: {v!r} is not finite")
    return v


def parse_param(key: str, spec: Any) -> Param:
    where = f"tune.search_space.{key}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping like {{choice: [...]}} or {{uniform: [low, high]}}, "
                          f"got {spec!r}")
    kinds = [k for k in spec if k != "when"]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)} (plus an optional 'when'), "
                          f"got {sorted(spec)}")
    kind, args = kinds[0], spec[kinds[0]]
    if not isinstance(args, list | tuple) or not args:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
    args = tuple(args)
    if kind in DISCRETE:
        if len(set(map(repr, args))) != len(args):
            raise ConfigError(f"{where}.{kind}: duplicate values in {list(args)}")
    else:
        want = 3 if kind == "quniform" else 2
        if len(args) != want:
            raise ConfigError(f"{where}.{kind}: expected [low, high{', q' if want == 3 else ''}], got {list(args)}")
        lo, hi = (_number(key, v, integer=kind == "randint") for v in args[:2])
        if (kind == "randint" and lo > hi) or (kind != "randint" and not lo < hi):
            raise ConfigError(f"{where}.{kind}: invalid range [{lo}, {hi}]: low must be below high")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}.loguniform: low must be > 0 for a log scale, got {lo}")
        if kind == "quniform" and not _number(key, args[2]) > 0:
            raise ConfigError(f"{where}.quniform: q must be > 0, got {args[2]}")
    when = spec.get("when") or {}
    if not isinstance(when, Mapping):
        raise ConfigError(f"{where}.when: expected {{key: value or [values]}}, got {when!r}")
    when = {k: tuple(v) if isinstance(v, list | tuple) else (v,) for k, v in when.items()}
    if when and kind == "grid":
        raise ConfigError(f"{where}: a grid cannot be conditional (it would multiply every trial); use choice")
    return Param(key, kind, args, when)


def _check_key(schema, key: str) -> None:
    where = f"tune.search_space.{key}"
    if key.startswith(UNTUNABLE):
        raise ConfigError(f"{where}: this key is not tunable (campaign, tracking, storage and cluster settings "
                          "are fixed for a campaign)")
    missing = object()
    value = OmegaConf.select(schema, key, default=missing)
    if value is missing:
        raise ConfigError(f"{where}: unknown config key {key!r}; name a key of the job config "
                          "(the config tree is platform/tvr_platform/config.py; method sections in tvr/methods/)")
    if OmegaConf.is_config(value):
        raise ConfigError(f"{where}: {key!r} is a config section; name one of its keys")
    if key.startswith("model.") and key.endswith(".num_frames"):
        raise ConfigError(f"{where}: method frame counts follow data.num_frames; tune data.num_frames instead")


def apply_values(job: JobCfg, values: Mapping[str, Any]) -> JobCfg:
    """A copy of ``job`` with the sampled ``values`` set, validated like a job spec. The chosen
    method's frame count (T-MASS, VoP) follows ``data.num_frames``."""
    cfg = OmegaConf.structured(job)
    try:
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False)
        section = cfg.model[cfg.model.method]
        if "num_frames" in section:
            section.num_frames = cfg.data.num_frames
        out = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        cause = err.__cause__ if isinstance(err.__cause__, ValueError) else err
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ConfigError(f"{shown}: {str(cause).splitlines()[0]}") from None
    assert isinstance(out, JobCfg)
    return out


def _order(params: dict[str, Param]) -> list[Param]:
    conditions = [p for p in params.values() if not p.when]
    return conditions + [p for p in params.values() if p.when]


def build_space(job: JobCfg) -> SearchSpace:
    """Parse and validate the campaign's space against ``job``; raises :class:`ConfigError`
    naming the key before any trial runs."""
    raw = merged_space(job)
    if not raw:
        raise ConfigError("tune.search_space: empty; name at least one key to tune "
                          "(or set tune.methods / tune.common_knobs)")
    schema = OmegaConf.structured(job)
    params = {}
    for key, spec in raw.items():
        _check_key(schema, key)
        params[key] = parse_param(key, spec)
    for p in params.values():
        for cond, allowed in p.when.items():
            base = params.get(cond)
            where = f"tune.search_space.{p.key}.when.{cond}"
            if base is None or base.kind not in DISCRETE or base.when:
                raise ConfigError(f"{where}: a condition must name an unconditional choice/grid key of the space")
            bad = [v for v in allowed if v not in base.args]
            if bad:
                raise ConfigError(f"{where}: {bad} never sampled (choices: {list(base.args)})")
        method_of_key = p.key.split(".")[1] if p.key.startswith("model.") else None
        if method_of_key in METHODS:
            possible = set(p.when.get("model.method", params["model.method"].args if "model.method" in params
                                      else (job.model.method,)))
            if method_of_key not in possible:
                raise ConfigError(f"tune.search_space.{p.key}: only used when model.method={method_of_key}, "
                                  f"but the campaign's methods are {sorted(possible)}; add "
                                  f"when: {{model.method: {method_of_key}}} or sample model.method")
    for p in params.values():  # every value must be one the config accepts
        for v in p.values:
            context = {k: allowed[0] for k, allowed in p.when.items()}
            method_of_key = p.key.split(".")[1] if p.key.startswith("model.") else None
            if method_of_key in METHODS:
                context["model.method"] = method_of_key
            try:
                apply_values(job, {**context, p.key: v})
            except ConfigError as err:
                raise ConfigError(f"tune.search_space.{p.key}: value {v!r} is rejected by the config: {err}") from None
    if job.tune.search_alg == "optuna" and any(p.kind == "grid" for p in params.values()):
        raise ConfigError("tune.search_space: grid is for search_alg=random; with optuna use choice")
    return SearchSpace(tuple(_order(params)))
