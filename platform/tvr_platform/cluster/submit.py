"""Submit a tvr job spec to a running Ray cluster through the Ray Jobs API.

``tvr submit jobs/train.yaml --address http://HEAD:8265 [key=value ...]`` runs the same spec that
``tvr train jobs/train.yaml`` runs locally. Everything is checked here, before the cluster is
contacted; a bad spec, a bad address, an unreachable dashboard or a missing auth token end with
one error and nothing submitted.

What travels with the job (``runtime_env``):

- **code** (``cluster.ship_code``, default on): ``working_dir`` = the root of this checkout, less
  :data:`DEFAULT_EXCLUDES`, the checkout's ``.gitignore`` and ``cluster.excludes``;
  ``py_modules`` = ``[platform/tvr_platform]``. ``platform/`` is a source root, not a package, so
  the working dir alone would not make ``tvr_platform`` importable; Ray imports a ``py_modules``
  directory under its folder name, so it arrives as ``tvr_platform`` on every worker, and
  ``platform/`` itself is left out of the working dir (one copy of the code). ``tvr`` imports from
  the working dir, which Ray puts first on ``PYTHONPATH``. Without a checkout (tvr installed from
  a wheel) the two installed package folders are shipped as ``py_modules``.
  ``cluster.ship_code=false`` ships nothing: the cluster image has tvr installed (KubeRay).
- **spec**: the resolved spec (defaults < YAML < overrides) as YAML text in ``TVR_JOB_SPEC``, with
  ``cluster.address='auto'`` (the job joins the cluster it runs on). The entrypoint
  ``python -m tvr_platform.cluster.launch <command>`` writes it to a file and runs
  ``python -m tvr_platform.cli <command> <file>``. No file is written into the checkout.
- **env**: ``cluster.env_vars`` plus ``TVR_RAY_JOB_ID`` = the submission id (the tracker tags the
  MLflow run with it, linking run and Ray job) and ``TVR_JOB_SPEC_NAME``.
- **resources**: ``cluster.entrypoint_num_cpus`` / ``entrypoint_num_gpus`` for the driver process.

Authentication (Ray >= 2.59 enables token auth on new local clusters): the token is looked up as
Ray does -- ``RAY_AUTH_TOKEN``, then the file ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``
-- unless ``RAY_AUTH_MODE=disabled``, and sent as an HTTP header (``Authorization: Bearer ...``,
or ``X-Ray-Authorization`` behind a proxy that owns ``Authorization``). We pass the header
ourselves because Ray's client only adds it when this process has ``RAY_AUTH_MODE=token``. The
token never enters the runtime_env, the metadata, a log line or an error message.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from tvr_platform.cluster.config import URI_PASSWORD

JOB_ID_ENV = "TVR_RAY_JOB_ID"
"""Environment variable holding the Ray submission id inside the job (MLflow tag ``ray.job_id``)."""
SPEC_ENV = "TVR_JOB_SPEC"
"""Environment variable holding the resolved job spec (YAML text) inside the job."""
SPEC_NAME_ENV = "TVR_JOB_SPEC_NAME"
"""Environment variable holding the submitted spec's file name (for logs)."""

COMMANDS = ("train", "tune", "eval", "check")
"""What the job runs: ``tvr train|tune|eval <spec>``, or ``check`` (import + spec smoke test)."""

DEFAULT_EXCLUDES = [
    # VCS, environments, caches, build outputs
    ".git/", ".venv/", "venv/", "**/__pycache__/", "*.pyc", ".ruff_cache/", ".pytest_cache/",
    ".mypy_cache/", "*.egg-info/", "/build/", "/dist/", ".whl/", "node_modules/",
    # local run outputs: work dirs, MLflow stores, Ray results, checkpoints
    "/tvr-work/", "/runs/", "/mlruns/", "/mlartifacts/", "mlflow.db", "*.sqlite", "/ray_results/",
    "/checkpoints/",
    # media, weights and archives: data lives in S3, not in the job package
    "*.mp4", "*.avi", "*.mkv", "*.webm", "*.mov", "*.pt", "*.pth", "*.safetensors", "*.ckpt", "*.npy",
    "*.tar", "*.tar.gz", "*.tgz", "*.zip",
    # infrastructure state: provider binaries and tfstate (may hold secrets)
    ".terraform/", "*.tfstate", "*.tfstate.*", "*.tfvars",
    # shipped separately as py_modules
    "/platform/",
]
"""Left out of the uploaded working dir (gitignore syntax, relative to the checkout root).

Ray applies the same list to ``py_modules`` (relative to ``tvr_platform/``), so no pattern may name
a folder that exists inside the code (``data/`` would drop ``tvr_platform/data``): a root-level
``data/`` folder belongs in ``.gitignore``, which Ray honours for the working dir only.
:func:`plan_upload` checks that no source file is dropped.
"""

MAX_UPLOAD_BYTES = 100 * 2**20
"""Refuse to upload more code than this (Ray's own limit is 512 MiB per package)."""

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$|^\[[0-9a-fA-F:]+\]$")

log = logging.getLogger(__name__)


class SubmitError(RuntimeError):
    """A submission or job command failed; the message says what to do. Never holds a token."""


# -- submission ids and addresses --------------------------------------------------------------

def make_submission_id(spec_name: str, now: datetime | None = None, suffix: str | None = None) -> str:
    """``tvr-<spec name>-<UTC yyyymmdd-hhmmss>-<4 hex>``: lower-case, [a-z0-9-], at most 60 chars.

    The name is sanitised (runs of other characters become '-', at most 30 kept); the random
    suffix keeps two submissions of one spec within a second apart.
    """
    stem = re.sub(r"\.ya?ml$", "", Path(spec_name).name, flags=re.IGNORECASE)
    stem = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:30].strip("-") or "job"
    now = now or datetime.now(UTC)
    suffix = suffix if suffix is not None else secrets.token_hex(2)
    return f"tvr-{stem}-{now:%Y%m%d-%H%M%S}-{suffix}"


def check_submission_id(submission_id: str) -> str:
    if not _ID_RE.match(submission_id):
        raise SubmitError(f"--submission-id {submission_id!r}: use 1-63 characters from [A-Za-z0-9._-], "
                          "starting with a letter or digit")
    return submission_id


def resolve_address(address: str | None, env: Mapping[str, str] = os.environ, spec_address: str | None = None) -> str:
    """The Jobs API address: ``--address`` > ``cluster.address`` (if http[s]) > ``RAY_API_SERVER_ADDRESS``
    > ``RAY_ADDRESS`` (if http[s]). A bare ``host:port`` gets ``http://``. Returns ``scheme://host:port``."""
    candidates = [(address, "--address")]
    if spec_address and spec_address.startswith(("http://", "https://")):
        candidates.append((spec_address, "cluster.address"))
    candidates.append((env.get("RAY_API_SERVER_ADDRESS"), "RAY_API_SERVER_ADDRESS"))
    ray_address = env.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):
        candidates.append((ray_address, "RAY_ADDRESS"))
    chosen = next(((a, w) for a, w in candidates if a), None)
    if chosen is None:
        raise SubmitError("no cluster address: pass --address http://<head>:8265 (the Ray dashboard / Jobs API) "
                          "or set RAY_API_SERVER_ADDRESS")
    raw, where = chosen[0].strip(), chosen[1]
    if raw in ("auto", "local") or raw.startswith(("ray://", "ray+")):
        raise SubmitError(f"{where}={raw!r} is not a Jobs API address; tvr submit needs the dashboard address "
                          "http://<head>:8265 (kubectl port-forward svc/<cluster>-head-svc 8265:8265 on KubeRay)")
    if "://" not in raw:
        raw = f"http://{raw}"
    m = re.match(r"^(https?)://([^/:\s]+|\[[0-9a-fA-F:]+\])(?::(\d+))?/*$", raw)
    if not m or not _HOST_RE.match(m.group(2)) or (m.group(3) and not 0 < int(m.group(3)) < 65536):
        raise SubmitError(f"{where}={chosen[0]!r} is not a valid address; expected http://<head>:8265")
    scheme, host, port = m.groups()
    return f"{scheme}://{host}" + (f":{port}" if port else "")


# -- authentication ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Auth:
    """Where the Ray auth token came from, and the headers carrying it. ``repr`` never shows it."""

    source: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        return self.source


def resolve_auth(env: Mapping[str, str] = os.environ, header: str = "Authorization",
                 home: Path | None = None) -> Auth:
    """Find the Ray token as Ray 2.60 does (``RAY_AUTH_TOKEN`` > ``RAY_AUTH_TOKEN_PATH`` > ``~/.ray/auth_token``).

    ``RAY_AUTH_MODE=disabled`` sends no token; ``RAY_AUTH_MODE=token`` without a token is an error
    (raised before the cluster is contacted). ``header`` is ``Authorization`` or
    ``X-Ray-Authorization`` (both accepted by Ray's dashboard).
    """
    if header.lower() not in ("authorization", "x-ray-authorization"):
        raise SubmitError(f"--auth-header {header!r}: use Authorization or X-Ray-Authorization")
    mode = env.get("RAY_AUTH_MODE", "").strip().lower()
    if mode not in ("", "token", "disabled"):
        raise SubmitError(f"RAY_AUTH_MODE={mode!r}: use 'token' or 'disabled'")
    if mode == "disabled":
        return Auth("none (RAY_AUTH_MODE=disabled)")
    token, source = env.get("RAY_AUTH_TOKEN", "").strip(), "RAY_AUTH_TOKEN"
    if not token and env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: no such file")
        token, source = path.read_text().strip(), f"RAY_AUTH_TOKEN_PATH ({path})"
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty")
    if not token:
        path = (home or Path.home()) / ".ray" / "auth_token"
        if path.is_file():
            token, source = path.read_text().strip(), str(path)
    if not token:
        if mode == "token":
            raise SubmitError("RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                              "(the cluster's token: `ray get-auth-token` on the head, or the KubeRay Secret)")
        return Auth("none (no RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    if any(c.isspace() for c in token):
        raise SubmitError(f"the Ray auth token from {source} contains whitespace; it must be one word")
    return Auth(source, {header: f"Bearer {token}"})


# -- the code package --------------------------------------------------------------------------

def find_checkout(start: Path | None = None) -> Path | None:
    """The root of the tvr source checkout this package runs from, or None (installed from a wheel)."""
    here = (start or Path(__file__)).resolve()
    for root in here.parents:
        if (root / "pyproject.toml").is_file() and (root / "tvr" / "__init__.py").is_file() \
                and (root / "platform" / "tvr_platform" / "__init__.py").is_file():
            return root
    return None


@dataclass
class Upload:
    """What Ray will pack from one directory: relative file paths and their total size."""

    base: Path
    files: list[str]
    bytes: int


def plan_upload(base: Path, excludes: list[str], include_gitignore: bool = True) -> Upload:
    """List the files Ray will upload from ``base`` with these excludes, using Ray's own walker."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: list[str] = []
    total = 0

    def handler(path: Path) -> None:
        nonlocal total
        if path.is_file():
            files.append(path.relative_to(base).as_posix())
            total += path.stat().st_size

    quiet = logging.getLogger("tvr_platform.cluster.upload")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    _dir_travel(base, [_get_excludes(base, list(excludes))], handler, include_gitignore=include_gitignore,
                logger=quiet)
    return Upload(base, sorted(files), total)


SECRET_FILES = (".env", ".env.*", "*.env", ".netrc", "_netrc", ".pgpass", ".git-credentials", ".npmrc", ".pypirc",
                "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks",
                "secrets.json", "secrets.yaml", "secrets.yml", "credentials.json", "credentials", "kubeconfig",
                "*.kubeconfig", "auth_token", "service-account*.json")
"""File names (any folder) tvr refuses to ship: keys, tokens and credential stores."""
SECRET_DIRS = (".aws", ".ssh", ".gnupg", ".kube", ".docker", ".config/gcloud")


def secret_files(files: Iterable[str]) -> list[str]:
    """The relative paths among ``files`` that look like credentials (:data:`SECRET_FILES`,
    anything under :data:`SECRET_DIRS`)."""
    import fnmatch

    found = []
    for f in files:
        name = f.rsplit("/", 1)[-1]
        in_dir = any(f"/{d}/" in f"/{f}" for d in SECRET_DIRS)
        if in_dir or any(fnmatch.fnmatchcase(name, pat) for pat in SECRET_FILES):
            found.append(f)
    return sorted(found)


def untracked_files(root: Path, files: Iterable[str], named: Iterable[str] = ()) -> list[str] | None:
    """The paths among ``files`` git does not track in ``root`` and the user did not name
    (``cluster.ship_untracked`` patterns); None when ``root`` is not a git checkout."""
    import fnmatch
    import subprocess

    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached"], cwd=root, capture_output=True, timeout=30,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    tracked = {p for p in out.decode("utf-8", "replace").split("\0") if p}
    named = list(named)
    return sorted(f for f in files if f not in tracked and not any(fnmatch.fnmatchcase(f, p) for p in named))


def _source_files(pkg: Path) -> set[str]:
    return {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}


def code_runtime_env(excludes: list[str], checkout: Path | None, max_bytes: int = MAX_UPLOAD_BYTES,
                     ship_untracked: Iterable[str] = ()) -> tuple[dict[str, Any], list[Upload]]:
    """``working_dir`` / ``py_modules`` / ``excludes`` for shipping the code, after checking what
    would be uploaded: only files git tracks (+ the ``ship_untracked`` patterns the user names) in
    a git checkout, ``.gitignore`` respected, no credential file (:func:`secret_files`: refused),
    every ``.py`` of ``tvr`` and ``tvr_platform`` present, the total under ``max_bytes``."""
    import tvr
    import tvr_platform

    if checkout is not None:
        platform_pkg = checkout / "platform" / "tvr_platform"
        env: dict[str, Any] = {"working_dir": str(checkout), "py_modules": [str(platform_pkg)], "excludes": excludes}
        uploads = [plan_upload(checkout, excludes), plan_upload(platform_pkg, excludes)]
        shipped = uploads[0].files + [f"platform/tvr_platform/{f}" for f in uploads[1].files]
        extra = untracked_files(checkout, shipped, ship_untracked)
        if extra:  # not tracked by git and not named: left out (a stray .env, a scratch file)
            excludes = [*excludes, *(f"/{f}" for f in extra)]
            env["excludes"] = excludes
            uploads = [plan_upload(checkout, excludes), plan_upload(platform_pkg, excludes)]
            log.info("left %d untracked file(s) out of the code package: %s", len(extra), ", ".join(extra[:10]))
        required = [(uploads[0], "tvr/", checkout / "tvr"), (uploads[1], "", platform_pkg)]
    else:
        pkgs = [Path(tvr.__file__).parent, Path(tvr_platform.__file__).parent]
        env = {"py_modules": [str(p) for p in pkgs], "excludes": excludes}
        uploads = [plan_upload(p, excludes) for p in pkgs]
        required = [(u, "", p) for u, p in zip(uploads, pkgs)]
    leaked = secret_files(f for u in uploads for f in u.files)
    if leaked:
        raise SubmitError(f"refusing to ship credential file(s) {', '.join(leaked[:8])} with the job code; "
                          "remove them from the checkout or add them to .gitignore / cluster.excludes "
                          "(credentials reach the cluster as IAM roles or Kubernetes Secrets)")
    for upload, prefix, pkg in required:
        missing = sorted(f"{prefix}{f}" for f in _source_files(pkg) if f"{prefix}{f}" not in set(upload.files))
        if missing:
            raise SubmitError(f"the excludes {excludes} would leave source files out of the job "
                              f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                              "remove the offending pattern from cluster.excludes")
    total = sum(u.bytes for u in uploads)
    if total > max_bytes:
        biggest = sorted(((os.path.getsize(u.base / f), f) for u in uploads for f in u.files), reverse=True)[:5]
        raise SubmitError(
            f"the code package would be {total / 2**20:.1f} MiB (limit {max_bytes / 2**20:.0f} MiB); largest files: "
            + ", ".join(f"{f} ({s / 2**20:.1f} MiB)" for s, f in biggest)
            + ". Add them to .gitignore or cluster.excludes; data and weights belong in S3")
    return env, uploads


def _git_revision(root: Path | None) -> str:
    if root is None or not (root / ".git").exists():
        return ""
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("+dirty" if dirty else "")


# -- preparing a submission (no network) -------------------------------------------------------

@dataclass
class Submission:
    """Everything ``submit_job`` gets, built and checked without contacting the cluster."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    entrypoint_num_cpus: float
    entrypoint_num_gpus: float
    spec_yaml: str
    spec_address: str | None
    warnings: list[str] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)

    def submit_kwargs(self) -> dict[str, Any]:
        return {"entrypoint": self.entrypoint, "submission_id": self.submission_id,
                "runtime_env": self.runtime_env, "metadata": self.metadata,
                "entrypoint_num_cpus": self.entrypoint_num_cpus, "entrypoint_num_gpus": self.entrypoint_num_gpus}


def _is_local_path(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def portability_warnings(job: Any) -> list[str]:
    """Settings that work on a laptop but lose results on a cluster (warnings, not errors)."""
    out = []
    if not Path(job.run.work_dir).is_absolute():
        out.append(f"run.work_dir={job.run.work_dir!r} is not an absolute path: on the cluster it lands in the "
                   "job's temporary working directory; set an absolute shared path, or storage.uri / tracking.uri "
                   "below")
    if _is_local_path(job.storage.uri or job.run.work_dir):
        out.append("storage.uri is a local path: with several nodes each writes its own checkpoints; "
                   "use s3://<bucket>/<prefix> (storage.endpoint_url for MinIO)")
    tracking = job.tracking.uri
    if not tracking or tracking.startswith(("sqlite:", "file:")) or "://" not in tracking:
        out.append(f"tracking.uri={tracking or '(default sqlite under run.work_dir)'!r} is local to the cluster's "
                   "head node: MLflow runs are lost with it; point it at the tracking server "
                   "(http://mlflow.tvr.svc:5000, infra/mlflow)")
    return out


PATH_KEYS = ("run.work_dir", "storage.uri", "data.root", "tracking.uri", "model.backbone.pretrained")
"""Local paths that ``load_job`` makes absolute against the current directory."""


def _is_relative_path(key: str, value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    if key == "tracking.uri":
        return value.startswith("sqlite:///") and not Path(value[len("sqlite:///"):]).is_absolute()
    return "://" not in value and not Path(value).is_absolute()


def keep_relative_paths(job: Any, spec: str | os.PathLike, overrides: Iterable[str]) -> list[str]:
    """Put back the relative local paths the spec and overrides wrote (in place); returns their keys.

    ``load_job`` anchors them on this machine's current directory, which means nothing on the
    cluster (``/home/alice/tvr/tvr-work``): shipped as written, they resolve in the job's own
    working directory there, and :func:`portability_warnings` says so.
    """
    from omegaconf import OmegaConf

    from tvr_platform.config import JobCfg
    from tvr_platform.specs import resolve_spec

    written = OmegaConf.merge(OmegaConf.structured(JobCfg), OmegaConf.load(resolve_spec(spec)),
                              OmegaConf.from_dotlist(list(overrides)))
    kept = []
    for key in PATH_KEYS:
        value = OmegaConf.select(written, key)
        if _is_relative_path(key, value):
            *parents, leaf = key.split(".")
            owner = job
            for name in parents:
                owner = getattr(owner, name)
            setattr(owner, leaf, value)
            kept.append(key)
    return kept


INPUT_PATH_KEYS = ("data.root", "model.backbone.pretrained")
"""Inputs a job reads: a relative path would resolve inside the job's (cached, shared) working
directory on the cluster, where the data set or checkpoint is not -- rejected before submitting."""


def reject_relative_inputs(kept: list[str], job: Any) -> None:
    for key in kept:
        if key in INPUT_PATH_KEYS:
            *parents, leaf = key.split(".")
            owner = job
            for name in parents:
                owner = getattr(owner, name)
            raise SubmitError(
                f"{key}={getattr(owner, leaf)!r} is a relative path: on the cluster it would resolve inside the "
                "job's working directory, not this one; give an s3:// URI or an absolute path that exists on "
                "every node")


def _check_no_credentials(job: Any) -> None:
    from tvr_platform.config import flatten

    for key, value in flatten(job, only_active_method=False).items():
        if isinstance(value, str) and URI_PASSWORD.search(value):
            raise SubmitError(f"{key} holds a password inside a URI; the spec is shipped in clear text. Give the "
                              "credentials to the pods from a Kubernetes Secret (e.g. MLFLOW_TRACKING_PASSWORD)")


def prepare(spec: str | os.PathLike, overrides: Iterable[str] = (), *, command: str = "train",
            submission_id: str | None = None, now: datetime | None = None,
            checkout: Path | None | str = "auto",
            max_upload_bytes: int = MAX_UPLOAD_BYTES) -> Submission:
    """Resolve and validate the spec and build the submission; touches neither disk nor network."""
    from tvr_platform.config import ConfigError, job_to_yaml, load_job

    if command not in COMMANDS:
        raise SubmitError(f"--command {command!r}: choose one of {', '.join(COMMANDS)}")
    try:
        overrides = list(overrides)
        job = load_job(spec, overrides)
    except ConfigError as err:
        raise SubmitError(f"invalid job spec: {err}") from None
    _check_no_credentials(job)
    reject_relative_inputs(keep_relative_paths(job, spec, overrides), job)
    spec_address = job.cluster.address
    job.cluster.address = "auto"  # the job's driver joins the cluster it runs on
    spec_yaml = job_to_yaml(job)
    sid = check_submission_id(submission_id) if submission_id else make_submission_id(str(spec), now)

    env_vars = {**job.cluster.env_vars, JOB_ID_ENV: sid, SPEC_NAME_ENV: Path(spec).name, SPEC_ENV: spec_yaml}
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    root = find_checkout() if checkout == "auto" else (Path(checkout) if checkout else None)
    revision = _git_revision(root) if job.cluster.ship_code else ""
    if revision and revision != "unknown":  # the shipped code has no .git: the MLflow run's commit tag
        env_vars["TVR_GIT_COMMIT"] = revision
    if _user():
        env_vars["TVR_SUBMITTED_BY"] = _user()
    uploads: list[Upload] = []
    if job.cluster.ship_code:
        code_env, uploads = code_runtime_env([*DEFAULT_EXCLUDES, *job.cluster.excludes], root, max_upload_bytes,
                                             ship_untracked=job.cluster.ship_untracked)
        runtime_env.update(code_env)
    metadata = {"tvr_spec": Path(spec).name, "tvr_run": job.run.name, "tvr_method": job.model.method,
                "tvr_command": command, "tvr_git_revision": revision,
                "tvr_submitted_by": _user()}
    return Submission(
        submission_id=sid, entrypoint=f"python -m tvr_platform.cluster.launch {command}",
        runtime_env=runtime_env, metadata=metadata,
        entrypoint_num_cpus=job.cluster.entrypoint_num_cpus, entrypoint_num_gpus=job.cluster.entrypoint_num_gpus,
        spec_yaml=spec_yaml, spec_address=spec_address, warnings=portability_warnings(job), uploads=uploads)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


# -- talking to the cluster --------------------------------------------------------------------

def connect(address: str, auth: Auth, timeout: float = 10.0):
    """A ``JobSubmissionClient`` for ``address`` after a quick reachability + auth check."""
    import requests

    try:
        r = requests.get(f"{address}/api/version", headers=auth.headers, timeout=timeout)
    except requests.exceptions.RequestException as err:
        kind = "timed out" if isinstance(err, requests.exceptions.Timeout) else "connection failed"
        raise SubmitError(f"cannot reach the Ray Jobs API at {address} ({kind}). Is the head node up and its "
                          "dashboard port reachable? (ray start --head --dashboard-host=0.0.0.0; on KubeRay "
                          "kubectl port-forward svc/<cluster>-head-svc 8265:8265)") from None
    if r.status_code in (401, 403):
        raise SubmitError(f"the Ray cluster at {address} refused the request (HTTP {r.status_code}): token "
                          f"authentication is on and the token (from {auth.source}) is "
                          f"{'missing' if r.status_code == 401 else 'wrong'}; set RAY_AUTH_TOKEN or "
                          "RAY_AUTH_TOKEN_PATH to the cluster's token")
    if r.status_code != 200 or "ray_version" not in r.text:
        raise SubmitError(f"{address} answered HTTP {r.status_code} on /api/version: not a Ray dashboard "
                          "(use the dashboard port, 8265 by default)")
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=dict(auth.headers))
    except Exception as err:  # ConnectionError, AuthenticationError, RuntimeError from Ray
        raise SubmitError(f"cannot connect to the Ray Jobs API at {address}: {_first_line(err)}") from None


def submit(sub: Submission, client: Any) -> str:
    """Upload the code package and submit; returns the submission id."""
    try:
        return client.submit_job(**sub.submit_kwargs())
    except Exception as err:
        raise SubmitError(f"the cluster rejected job {sub.submission_id}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def follow_logs(client: Any, job_id: str, out: IO[str] | None = None, poll_s: float = 1.0,
                tail: Callable[[str], Any] | None = None) -> str:
    """Stream the job's logs to ``out`` (stdout) until it ends; returns its final status (a string)."""
    tail = tail or client.tail_job_logs
    out = out or sys.stdout

    async def pump() -> None:
        async for chunk in tail(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(pump())
    except RuntimeError as err:  # the websocket closed early: fall back to polling
        log.debug("log tail ended: %s", err)
    while True:
        status = str(client.get_job_status(job_id))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(poll_s)
