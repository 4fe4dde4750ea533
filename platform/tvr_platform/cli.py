"""The ``tvr`` command line. Every command takes a YAML job spec plus ``key.sub=value`` overrides.

    tvr quickstart [overrides]            synthetic data -> train -> eval -> register, locally
    tvr data synth <spec> [overrides]     write the synthetic MSR-VTT-format clip set
    tvr data prepare [spec] [overrides]   decode once: sampled frames as sharded Parquet (frame cache)
    tvr train <spec> [overrides]          train with Ray Train (+ DeepSpeed), log to MLflow
    tvr pretrain [spec] [overrides]       image-text pre-training -> registered open_clip backbone
    tvr eval <spec | models:/name@alias> [--dsl] [--sinkhorn N] [--split S] [overrides]
    tvr data check <folder> [--format F] [--split S]   validate a dataset folder, print its counts
    tvr config list | show NAME [overrides]            the job specs shipped with tvr

Full reference: docs/commands.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from tvr_platform.data.cli import add_prepare

# Nothing heavy at import: ``tvr --help`` and argument errors must answer in well under a second, so
# torch, open_clip, ray, mlflow and even the config tree (it imports the method table) load only
# inside the command that needs them (tests/platform/test_cli.py checks sys.modules).
REPO_JOBS = Path(__file__).resolve().parents[2] / "jobs"
if not REPO_JOBS.is_dir():  # installed from a wheel: the specs shipped inside the package
    REPO_JOBS = Path(__file__).resolve().parent / "jobs"


def load_job(spec, overrides=()):  # noqa: ANN001 - the config module is imported on first use
    from tvr_platform.config import load_job as _load

    return _load(spec, overrides)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("tvr")
    except PackageNotFoundError:
        return "unknown"

# Command groups that live with their subsystem; each module exposes add_subcommands(subparsers).
COMMAND_GROUPS = (
    "tvr_platform.cluster.cli",    # tvr submit, tvr jobs status|logs|stop|list
    "tvr_platform.captions.cli",   # tvr captions improve|generate (ExCae CSI)
    "tvr_platform.tune.cli",       # tvr tune, tvr registry promote
    "tvr_platform.search.cli",     # tvr index build, tvr search
    "tvr_platform.bench.cli",      # tvr bench methods
    "tvr_platform.pretrain.cli",   # tvr pretrain
)


def _quiet_env() -> None:
    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}.items():
        os.environ.setdefault(k, v)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from tvr_platform.recipes import METRIC_ORDER, ensure_synthetic, print_table, train

    job = _new_run(load_job(args.spec or REPO_JOBS / "quickstart.yaml", args.overrides), args)
    print(f"[tvr] 1/3 synthetic clips -> {job.dataset_uri}")
    ensure_synthetic(job)
    print(f"[tvr] 2/3 training {job.model.method} on {job.model.backbone.name} "
          f"({job.train.num_workers} Ray Train workers, {job.train.strategy}), run {job.run.name}")
    report = train(job, register=True, force=args.force)
    reg = report.get("registered", {})
    if report.get("already_complete"):
        print(f"[tvr] run {job.run.name} is already complete: nothing trained or registered "
              f"(train again: --new or run.name=...)")
        print_table(f"Test split ({job.data.test_split}), recorded",
                    {k: report["metrics"][k] for k in METRIC_ORDER if k in report["metrics"]})
        print(f"\n[tvr] 3/3 registered earlier as models:/{reg.get('name')}/{reg.get('version')}")
    else:
        print_table(f"Test split ({job.data.test_split}), {selected_words(job, report)}",
                    {k: report["metrics"][k] for k in METRIC_ORDER if k in report["metrics"]})
        print(f"\n[tvr] 3/3 registered models:/{reg.get('name')}/{reg.get('version')} (alias "
              f"{job.tracking.alias} {'moved' if reg.get('promoted') else 'not moved'}: {reg.get('reason')})")
    print(f"[tvr] MLflow: {report['mlflow']}")
    print(f"[tvr] look at it: mlflow ui --backend-store-uri {job.tracking_uri}")
    return 0


def selected_words(job, report: dict) -> str:
    """'epoch 3 of 12 (best validation t2v_R1 41.7)': which weights the test numbers are from."""
    epoch, val = report.get("selected_epoch"), report.get("val_metrics") or {}
    metric = job.train.select_metric
    score = f" {val[metric]:.1f}" if metric in val else ""
    return (f"epoch {epoch if epoch is None else int(epoch)} of {job.train.epochs} "
            f"(best validation {metric}{score})")


def _new_run(job, args: argparse.Namespace):
    """``--new``: a fresh run name (``<run.name>-N``) instead of resuming ``run.name``."""
    if getattr(args, "new", False):
        from tvr_platform.runs import next_free_name

        job.run.name = next_free_name(job)
    return job


def cmd_synth(args: argparse.Namespace) -> int:
    from tvr_platform.recipes import ensure_synthetic

    job = load_job(args.spec, args.overrides)
    ensure_synthetic(job)
    print(f"[tvr] synthetic set at {job.dataset_uri}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tvr_platform.recipes import METRIC_ORDER, print_table, train

    job = _new_run(load_job(args.spec, args.overrides), args)
    report = train(job, force=args.force)
    if report.get("already_complete"):
        print(f"[tvr] run {job.run.name} is already complete: nothing trained "
              f"(train again: --new or run.name=...; more epochs: a larger train.epochs)")
    print_table(f"{job.run.name}: test split ({job.data.test_split}), {selected_words(job, report)}",
                {k: report["metrics"][k] for k in METRIC_ORDER if k in report["metrics"]})
    print(f"[tvr] MLflow: {report['mlflow']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tvr_platform.recipes import METRIC_ORDER, evaluate_model, print_table

    flags = [f"eval.dsl={str(args.dsl).lower()}"] if args.dsl else []
    if args.sinkhorn is not None:  # the method's own SK where it has one (UCoFIA), else the generic one
        from tvr_platform.recipes import sinkhorn_override

        flags += [sinkhorn_override(args.target, args.overrides, args.sinkhorn)]
    flags += [f"data.test_split={args.split}"] if args.split else []
    report = evaluate_model(args.target, [*args.overrides, *flags])
    print_table(f"{args.target}: {report['split']} ({report['num_texts']} texts, {report['num_videos']} videos)",
                {k: report["metrics"][k] for k in METRIC_ORDER})
    print(f"[tvr] report: {report['report_file']} (+ {len(report['plots'])} plots, logged to MLflow)")
    return 0


def cmd_config_list(args: argparse.Namespace) -> int:
    from tvr_platform.specs import header, jobs_dir, shipped

    specs = shipped()
    width = max(len(n) for n in specs)
    print(f"[tvr] job specs shipped with tvr ({jobs_dir()}); `tvr config show NAME` prints one resolved")
    for name, path in specs.items():
        print(f"  {name:<{width}}  {header(path)}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from tvr_platform.config import job_to_yaml

    job = load_job(args.name, args.overrides)
    if args.raw:
        from tvr_platform.specs import resolve_spec

        print(resolve_spec(args.name).read_text(), end="")
    else:
        print(job_to_yaml(job), end="")
    return 0


def _spec_command(sub, name: str, handler, help_text: str, spec_optional: bool = False) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("spec", nargs="?" if spec_optional else None, help="YAML job spec")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvr", description="Text-video retrieval experiments on Ray + MLflow.")
    parser.add_argument("--version", action="version", version=f"tvr {version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's, MLflow's and the libraries' logs (default: a file under the work dir)")
    sub = parser.add_subparsers(dest="command", required=True)
    for p in (_spec_command(sub, "quickstart", cmd_quickstart, "synthetic data -> train -> eval -> register",
                            spec_optional=True),
              _spec_command(sub, "train", cmd_train, "train a job spec with Ray Train")):
        p.add_argument("--new", action="store_true",
                       help="start a new run (<run.name>-N) instead of resuming run.name")
        p.add_argument("--force", action="store_true", help="when registering: move the alias even if the "
                       "model does not beat chance or the current champion")
    p = sub.add_parser("eval", help="evaluate a job spec's model or a registered model")
    p.add_argument("target", help="job spec path or models:/name@alias")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--dsl", action="store_true", help="dual-softmax re-normalisation (= eval.dsl=true)")
    p.add_argument("--sinkhorn", type=int, metavar="N", help="Sinkhorn-Knopp iterations: the method's own SK where it has one "
                   "(UCoFIA: model.ucofia.sinkhorn_iters=N, per granularity), else eval.sinkhorn_iters=N")
    p.add_argument("--split", metavar="S", help="dataset split to evaluate (= data.test_split=S)")
    p.set_defaults(func=cmd_eval)
    config = sub.add_parser("config", help="the job specs shipped with tvr").add_subparsers(
        dest="config_command", required=True)
    config.add_parser("list", help="list the shipped job specs").set_defaults(func=cmd_config_list)
    p = config.add_parser("show", help="print a job spec resolved (defaults < YAML < overrides)")
    p.add_argument("name", help="a shipped spec (train, jobs/train.yaml) or a YAML file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--raw", action="store_true", help="the file as written (with its comments), no overrides")
    p.set_defaults(func=cmd_config_show)
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    _spec_command(data, "synth", cmd_synth, "write the synthetic clip set", spec_optional=True)
    add_prepare(data)                                                   # tvr data prepare (frame cache)
    for module in COMMAND_GROUPS:
        importlib.import_module(module).add_subcommands(sub)
    return parser


def reference_markdown() -> str:
    """docs/commands.md: every command's ``--help``, generated from the parser (a test keeps the
    file equal to it: ``python -c 'from tvr_platform.cli import reference_markdown as r; print(r(), end="")'
    > docs/commands.md``)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        parts = ["# Command reference", "",
                 "Generated from the command line's own `--help` (`tests/platform/test_docs.py` keeps it current).",
                 "Every command that takes a job spec also takes `key.sub=value` overrides of the config tree",
                 "(`tvr config show NAME` prints a spec resolved, with every key). `tvr -v COMMAND` shows Ray's and",
                 "MLflow's own logs, which otherwise go to `<run.work_dir>/logs/`.", ""]

        def walk(p: argparse.ArgumentParser, path: list[str]) -> None:
            parts.extend([f"## `{' '.join(path)}`", "", "```", p.format_help().rstrip(), "```", ""])
            for action in p._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, child in action.choices.items():
                        walk(child, [*path, name])

        walk(parser, ["tvr"])
        return "\n".join(parts)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def user_error(err: BaseException) -> str | None:
    """The one-line message of a failure the user can fix (bad input, a read-only path, a refused
    checkpoint), unwrapping Ray's wrappers; None for a bug (which keeps its traceback)."""
    from tvr_platform.config import ConfigError

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ConfigError):
            return f"config error: {err}"
        if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return f"{err}" if "[Errno" not in str(err) else f"{err.strerror}: {err.filename} (check the path and its permissions)"
        if isinstance(err, ValueError) or type(err).__name__ in ("UnsafeCheckpointError", "StorageError",
                                                                "AnnotationError", "DecodeError"):
            return str(err).splitlines()[0] if str(err) else type(err).__name__
        nxt = getattr(err, "cause", None) if isinstance(getattr(err, "cause", None), BaseException) else None
        err = nxt or err.__cause__ or err.__context__
    return None


def _run(args: argparse.Namespace) -> int:
    from tvr_platform.tracking import end_open_runs

    try:
        return args.func(args)
    except Exception as err:
        message = user_error(err)
        if message is None:
            raise
        end_open_runs("FAILED")
        print(f"tvr: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    _quiet_env()
    args = build_parser().parse_args(argv)
    spec = getattr(args, "spec", None)
    if spec and "=" in spec and not spec.endswith((".yaml", ".yml")):  # optional spec omitted
        args.spec, args.overrides = None, [spec, *args.overrides]
    from tvr_platform import logs
    from tvr_platform.redaction import redacted_output
    from tvr_platform.tracking import end_open_runs

    if not args.verbose:
        logs.quiet()
    try:
        with redacted_output():          # no credential reaches stdout / stderr, whoever prints it
            return _run(args)
    except KeyboardInterrupt:
        end_open_runs("KILLED")
        print("tvr: interrupted; its MLflow run is marked KILLED", file=sys.stderr)
        return 130
    except BaseException:
        end_open_runs("FAILED")
        raise
    finally:
        if logs.log_file() is not None:
            print(f"[tvr] Ray / MLflow logs: {logs.log_file()} (tvr -v ... shows them here)")
        logs.restore()


if __name__ == "__main__":
    sys.exit(main())
