"""The one typed configuration tree of a tvr job, and its strict YAML + ``key.sub=value`` loader.

Precedence: dataclass defaults < YAML job spec < command-line overrides. Unknown keys, wrong
types and invalid values fail here, with the file and key named, before any Ray work starts.

The ``model`` section has the shared keys (``method``, ``backbone``) plus one sub-section per
registered method (``model.tmass``, ``model.vop``, ...), built from the method table
``tvr.methods.METHODS``; only the section of the chosen ``model.method`` is used and logged.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tvr.backbone import BackboneCfg
from tvr.methods import METHODS
from tvr_platform.captions.config import CaptionsCfg
from tvr_platform.cluster.config import ClusterCfg
from tvr_platform.data.config import DataCfg
from tvr_platform.tune.config import TuneCfg


class ConfigError(ValueError):
    """A job spec or override is invalid; the message names the file and key."""


@dataclass(kw_only=True)
class RunCfg:
    name: str = "run-{method}"
    """Run name; ``{method}`` stands for model.method. Rerunning the same name resumes its latest
    checkpoint, only when the spec's identity (method, backbone, frames, method section) matches."""
    work_dir: str = "./tvr-work"
    """Local directory for runs, caches and (by default) the MLflow store."""
    seed: int = 0
    """Seed for model init, sampling and evaluation noise."""

    def __post_init__(self) -> None:
        # run.name goes into MLflow filter strings, paths and Ray run names
        if not self.name.strip() or any(c in self.name for c in "'\"`\\"):
            raise ValueError(f"run.name={self.name!r}: use letters, digits, '-', '_' or '.' "
                             "(no quotes or backslashes)")


@dataclass(kw_only=True)
class StorageCfg:
    uri: str = ""
    """Root storage URI: a local directory or s3://bucket/prefix ('' = <run.work_dir>/storage)."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, moto); None = AWS. Credentials: the AWS chain only."""
    region: str | None = None
    """S3 region (None = the AWS chain's default, else us-east-1)."""


@dataclass(kw_only=True)
class TrainCfg:
    epochs: int = 5
    """Passes over the training split."""
    lr: float = 1e-4
    """Learning rate of the method's new parameters (heads, prompts, experts)."""
    backbone_lr: float = 1e-6
    """Learning rate of CLIP backbone parameters (T-MASS uses 1e-6 / 3e-5)."""
    weight_decay: float = 0.2
    """AdamW weight decay (not applied to gains, biases, embeddings, temperature)."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine schedule."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 = off)."""
    grad_accum: int = 1
    """Gradient accumulation steps (does not add contrastive negatives)."""
    num_workers: int = 2
    """Ray Train workers (processes); 0 = Ray Train local mode in the driver."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each training worker reserves; leave CPUs free for Ray Data's decode actors."""
    strategy: Literal["deepspeed", "ddp"] = "ddp"
    """deepspeed (ZeRO) or plain torch DDP."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    """auto = bf16 on GPU, fp32 on CPU."""
    gather_with_grad: bool = True
    """Gather features from every worker so negatives span the global batch (open_clip style)."""
    checkpoints_to_keep: int = 2
    """Ray Train checkpoints kept per run: the best by validation ``select_metric`` (plus the latest,
    always kept for resuming)."""
    max_failures: int = 0
    """Worker-group restarts allowed (Ray Train FailureConfig)."""
    eval_every: int = 1
    """Evaluate on the validation split every N epochs (and after the last); the test split is
    evaluated once, after training."""
    select_metric: str = "t2v_R1"
    """Validation metric that picks the epoch registered and tested (t2v_/v2t_ R1..MnR, or
    train_loss); ``tvr tune`` sets it to tune.metric."""
    select_mode: Literal["max", "min"] = "max"
    """Whether ``select_metric`` is maximised or minimised."""
    max_steps_per_epoch: int = 0
    """Cap on steps per epoch (0 = the whole split), for smoke runs."""
    peak_tflops: float = 0.0
    """Per-GPU peak bf16 TFLOP/s for MFU (0 = measure it with a matmul at start-up; GPU only)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError("train.zero_stage must be one of 0, 1, 2, 3")
        if self.epochs < 1 or self.grad_accum < 1 or self.num_workers < 0:
            raise ValueError("train.epochs and train.grad_accum must be >= 1, train.num_workers >= 0")
        for key in ("lr", "backbone_lr", "weight_decay", "grad_clip", "warmup_steps", "max_steps_per_epoch",
                    "peak_tflops", "max_failures"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 0")
        metrics = [f"{d}_{m}" for d in ("t2v", "v2t") for m in ("R1", "R5", "R10", "MdR", "MnR")] + ["train_loss"]
        if self.select_metric not in metrics:
            raise ValueError(f"train.select_metric={self.select_metric!r}: choose one of {metrics}")
        if self.checkpoints_to_keep < 1 or self.eval_every < 1:
            raise ValueError("train.checkpoints_to_keep and train.eval_every must be >= 1 (the best epoch's "
                             "checkpoint is kept for registration)")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"train.cpus_per_worker={self.cpus_per_worker} must be > 0 (e.g. 0.5 or 1)")


@dataclass(kw_only=True)
class EvalCfg:
    block_size: int = 1024
    """Side of the text x video similarity tiles held in memory."""
    dsl: bool = False
    """Dual-softmax re-normalisation at inference."""
    sinkhorn_iters: int = 0
    """Generic Sinkhorn-Knopp iterations on the final matrix at inference (0 = off), for methods
    without their own SK; UCoFIA's per-granularity SK is model.ucofia.sinkhorn_iters (everywhere:
    training-time evaluation, Tune, tvr eval, tvr bench)."""
    sinkhorn_bank: Literal["transductive", "train"] = "transductive"
    """Where a method's own SK takes its potentials in ``tvr eval``: the evaluated matrix itself
    (transductive) or the training captions x test videos (train: the official UCoFIA evaluation;
    embeds every caption of data.train_split). Training-time evaluation is always transductive."""
    v2t_rank: Literal["videos", "texts"] = "videos"
    """Video->text rank with several captions per video: 'videos' = 1 + #other videos whose best caption
    beats the video's best true caption (the published X-Pool / CLIP4Clip protocol); 'texts' = count
    competing captions."""
    dsl_v2t: Literal["texts", "videos"] = "texts"
    """DSL softmax axis for video->text: 'texts' (T-MASS's code: one matrix for both directions) or
    'videos'."""


@dataclass(kw_only=True)
class TrackingCfg:
    uri: str = ""
    """MLflow tracking URI ('' = sqlite:///<run.work_dir>/mlflow.db)."""
    experiment: str = "tvr"
    """MLflow experiment name."""
    artifact_location: str = ""
    """Artifact root for a new experiment ('' = <run.work_dir>/mlartifacts; may be s3://)."""
    registered_model: str = ""
    """Register the trained model under this name ('' = do not register)."""
    alias: str = "champion"
    """Alias moved to the new version when registering."""


def _model_cfg_class() -> type:
    method_sections = [(name, spec.config_cls, field(default_factory=spec.config_cls))
                       for name, spec in METHODS.items()]
    return make_dataclass(
        "ModelCfg",
        [("method", str, field(default="meanp")),
         ("backbone", BackboneCfg, field(default_factory=BackboneCfg)), *method_sections],
        kw_only=True,
        namespace={"__doc__": "model.method picks the method; model.<method> holds its options."},
    )


ModelCfg = _model_cfg_class()


@dataclass(kw_only=True)
class JobCfg:
    run: RunCfg = field(default_factory=RunCfg)
    storage: StorageCfg = field(default_factory=StorageCfg)
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)  # type: ignore[valid-type]
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    tune: TuneCfg = field(default_factory=TuneCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)
    captions: CaptionsCfg = field(default_factory=CaptionsCfg)

    def __post_init__(self) -> None:
        from tvr.backbone import SCHEMAS, model_config

        if not self.model.backbone.name.startswith(SCHEMAS):
            model_config(self.model.backbone.name)  # an unknown backbone: one line naming the choices
        bb = self.model.backbone
        if bb.image_size and bb.pretrained and self.train.strategy == "deepspeed" and self.train.zero_stage == 3:
            raise ValueError(f"model.backbone.image_size={bb.image_size} with pretrained weights needs the position "
                             "embedding resized on load, which the ZeRO-3 partitioned loader does not do: use "
                             "train.zero_stage <= 2 or model.backbone.image_size=0")
        if self.model.method not in METHODS:
            raise ValueError(f"model.method={self.model.method!r} is not a tvr method; "
                             f"choose one of {sorted(METHODS)}")
        if self.eval.sinkhorn_iters and hasattr(self.method_cfg, "sinkhorn_iters"):
            raise ValueError(f"eval.sinkhorn_iters={self.eval.sinkhorn_iters}: {self.model.method} has its own "
                             f"per-granularity SK; set model.{self.model.method}.sinkhorn_iters instead")
        frames = getattr(self.method_cfg, "num_frames", None)
        if frames is not None and frames != self.data.num_frames:
            raise ValueError(f"model.{self.model.method}.num_frames ({frames}) must equal data.num_frames "
                             f"({self.data.num_frames}): set both")

    # -- derived paths (no side effects) ------------------------------------------------------
    @property
    def method_cfg(self) -> Any:
        return getattr(self.model, self.model.method)

    @property
    def work_dir(self) -> Path:
        return Path(self.run.work_dir).expanduser().resolve()

    @property
    def storage_uri(self) -> str:
        return self.storage.uri or str(self.work_dir / "storage")

    @property
    def dataset_uri(self) -> str:
        return self.data.root or join_uri(self.storage_uri, "datasets", "synthetic")

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.work_dir / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str:
        return self.tracking.artifact_location or (self.work_dir / "mlartifacts").as_uri()


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


# -- loading ------------------------------------------------------------------------------------

def _fail(where: str, err: Exception) -> ConfigError:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return ConfigError(f"{where}: {f'{key}: ' if key else ''}{msg}")


def yaml_error(path: str | os.PathLike, err: Exception) -> ConfigError:
    """A YAML syntax error as one line: file, line and column (1-based), and what is wrong."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return ConfigError(f"{where}: not valid YAML: {problem}; fix the spec at that line and column")


def _read_spec(path: Path, *, stored: bool) -> Any:
    """One spec file as an OmegaConf mapping. ``stored``: someone else's file (the registry, run
    storage): parsed with ``yaml.safe_load`` and every ``${...}`` kept as literal text, so no
    OmegaConf resolver (``oc.env``, ...) ever runs on it."""
    import yaml

    try:
        text = path.read_text()
        data = yaml.safe_load(text) if stored else None
        loaded = OmegaConf.create(_escape_interpolations(data)) if stored else OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise yaml_error(path, err) from None
    except (OmegaConfBaseException, ValueError, TypeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, type(OmegaConf.create({}))):
        raise ConfigError(f"{path}: a job spec must be a YAML mapping")
    return loaded


def _escape_interpolations(node: Any) -> Any:
    """Every ``${`` in a string is escaped for OmegaConf: kept as text, never resolved."""
    if isinstance(node, str):
        return node.replace("${", "\\${")
    if isinstance(node, dict):
        return {k: _escape_interpolations(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape_interpolations(v) for v in node]
    return node


def load_job(spec: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
             *, stored: bool = False) -> JobCfg:
    """Defaults < YAML ``spec`` < ``overrides`` ('key.sub=value'), validated strictly.

    ``stored=True`` for a spec tvr did not get from its user (see :func:`load_stored_job`)."""
    schema = OmegaConf.structured(JobCfg)
    layers = []
    if spec is not None:
        from tvr_platform.specs import resolve_spec

        path = Path(spec) if stored else resolve_spec(spec)  # jobs/train.yaml outside a checkout: the shipped spec
        if not path.is_file():
            raise ConfigError(f"{path}: job spec file not found")
        layers.append((str(path), _read_spec(path, stored=stored)))
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"command line: overrides must look like key.sub=value, got {bad}")
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    cfg = schema
    for where, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _fail(where, err) from None
    try:
        job = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        where = " + ".join(w for w, _ in layers) or "defaults"
        raise _fail(where, err.__cause__ if isinstance(err.__cause__, ValueError) else err) from None
    assert isinstance(job, JobCfg)
    job.run.name = job.run.name.replace("{method}", job.model.method)
    return anchor_local_paths(job)


# Keys of a spec that say where data, storage, tracking and endpoints are (and which credentials
# to send there). In a stored spec they are never followed: the caller's own values win.
PLACE_KEYS = ("run.work_dir", "storage.uri", "storage.endpoint_url", "storage.region", "data.root",
              "tracking.uri", "tracking.artifact_location", "cluster.address", "cluster.env_vars",
              "captions.api_base_url", "captions.api_key_env")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


def load_stored_job(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *,
                    caller: JobCfg | None = None, where: str | None = None, report: Any = "stderr") -> JobCfg:
    """A job spec read back from the model registry or run storage: someone else's file.

    Loaded without OmegaConf resolvers (``${oc.env:AWS_SECRET_ACCESS_KEY}`` stays that text), and
    every place it names (:data:`PLACE_KEYS`: storage, endpoints, data root, tracking server,
    cluster, env vars) is replaced by the caller's own value (``caller``, default: defaults +
    ``overrides``); the keys
    that differed are reported in one line (``report``: 'stderr', a callable, or None), never
    followed."""
    import sys

    from tvr_platform.redaction import redact

    job = load_job(path, overrides, stored=True)
    caller = caller or load_job(None, overrides)
    differ = {}
    for key in PLACE_KEYS:
        theirs, mine = _get(job, key), _get(caller, key)
        if theirs != mine:
            differ[key] = theirs
            _set(job, key, mine)
    if differ and report is not None:
        shown = ", ".join(f"{k}={redact(v)!r}" for k, v in differ.items())
        line = (f"[tvr] {where or path}: the stored spec names {shown}; not followed, using this "
                "command's own values (set them as overrides to choose)")
        if callable(report):
            report(line)
        else:
            print(line, file=sys.stderr)
    return job


def _is_local(uri: str) -> bool:
    return bool(uri) and "://" not in uri


def anchor_local_paths(job: JobCfg, base: str | os.PathLike | None = None) -> JobCfg:
    """Make the spec's relative local paths absolute against ``base`` (default: the cwd), in place.

    Ray workers run in Ray's session directory, not in the directory the user typed the command in:
    a relative ``run.work_dir``, ``storage.uri``, ``data.root``, ``tracking.uri`` (sqlite:///rel) or
    ``model.backbone.pretrained`` file must be resolved on the driver before the job is shipped."""
    root = Path(base or Path.cwd()).expanduser().resolve()

    def anchor(path: str) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (root / p).resolve())

    job.run.work_dir = anchor(job.run.work_dir)
    if _is_local(job.storage.uri):
        job.storage.uri = anchor(job.storage.uri)
    if _is_local(job.data.root):
        job.data.root = anchor(job.data.root)
    sqlite = "sqlite:///"
    if job.tracking.uri.startswith(sqlite) and not job.tracking.uri.startswith(sqlite + "/"):
        job.tracking.uri = sqlite + anchor(job.tracking.uri[len(sqlite):])
    pretrained = job.model.backbone.pretrained
    if pretrained and _is_local(pretrained) and (root / pretrained).is_file():
        job.model.backbone.pretrained = anchor(pretrained)
    return job


def job_from_dict(data: dict[str, Any]) -> JobCfg:
    """Rebuild a JobCfg from :func:`job_to_dict` output (what crosses a Ray boundary)."""
    try:
        # Values were resolved where the job was loaded: a '${' left in one is text, never resolved here.
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobCfg),
                                                   OmegaConf.create(_escape_interpolations(data))))
    except OmegaConfBaseException as err:
        raise _fail("job dict", err) from None


def job_to_dict(job: JobCfg) -> dict[str, Any]:
    return asdict(job)


def job_to_yaml(job: JobCfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(job))


def flatten(job: JobCfg, *, only_active_method: bool = True) -> dict[str, Any]:
    """Dotted key -> value for every leaf (MLflow params); other methods' sections left out."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if is_dataclass(obj):
            for f in fields(obj):
                if only_active_method and prefix == "model." and f.name in METHODS and f.name != job.model.method:
                    continue
                walk(f"{prefix}{f.name}.", getattr(obj, f.name))
        elif isinstance(obj, dict) and obj:
            for k, v in obj.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = obj

    walk("", job)
    return out
