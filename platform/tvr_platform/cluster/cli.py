"""``tvr submit`` and ``tvr jobs status|logs|stop|list``: the cluster half of the command line.

The main CLI registers these with one call, ``add_subcommands(subparsers)``; every handler is set
as ``func`` on its parser and returns the process exit code (0 = success). Also runnable alone:
``python -m tvr_platform.cluster.cli submit jobs/train.yaml --address http://HEAD:8265``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from tvr_platform.cluster import submit as sb

_EXAMPLES = """examples:
  tvr submit jobs/train.yaml --address http://HEAD:8265 train.epochs=3
  tvr submit jobs/train.yaml --command check          # imports + spec on the cluster, nothing trained
  tvr jobs logs tvr-train-20261123-101500-ab12 --follow
environment:
  RAY_API_SERVER_ADDRESS      default for --address
  RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token
                              the cluster's auth token (sent as a header, never logged)
  RAY_AUTH_MODE=disabled      send no token
"""


def _intermixed(base: type[argparse.ArgumentParser]) -> type[argparse.ArgumentParser]:
    """A parser class that takes ``key=value`` positionals before *and* after options."""

    class IntermixedParser(base):  # type: ignore[misc, valid-type]
        _inside = False

        def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001
            if self._inside:
                return super().parse_known_args(args, namespace)
            self._inside = True
            try:
                return super().parse_known_intermixed_args(args, namespace)
            finally:
                self._inside = False

    return IntermixedParser


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray Jobs API, http://<head>:8265 (default: cluster.address if http, "
                                     "else $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--auth-header", default="Authorization", choices=["Authorization", "X-Ray-Authorization"],
                   help="header carrying the Ray auth token (X-Ray-Authorization behind an auth proxy)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the dashboard")


def add_subcommands(subparsers: Any) -> None:
    """Register ``submit`` and ``jobs`` on an ``argparse`` subparsers object."""
    parser_class = getattr(subparsers, "_parser_class", None)
    if parser_class is not None:
        subparsers._parser_class = _intermixed(parser_class)
    try:
        p = subparsers.add_parser(
            "submit", help="run a job spec on a Ray cluster (Ray Jobs API)", epilog=_EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description="Validate a job spec locally, ship this checkout and the resolved spec to a Ray "
                        "cluster and start `tvr <command> <spec>` there.")
    finally:
        if parser_class is not None:
            subparsers._parser_class = parser_class
    p.add_argument("spec", help="job spec YAML (jobs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides, as for tvr train")
    _add_connection_args(p)
    p.add_argument("--command", default="train", choices=sb.COMMANDS, help="what the job runs (default train)")
    p.add_argument("--submission-id", help="job id (default tvr-<spec>-<utc time>-<rand>)")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit 0 iff SUCCEEDED")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; contact nothing")
    p.set_defaults(func=cmd_submit)

    jobs = subparsers.add_parser("jobs", help="status, logs, stop or list jobs on a Ray cluster")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="{status,logs,stop,list}")
    for name, helptext, func in (("status", "a job's status and metadata", cmd_status),
                                 ("logs", "a job's driver logs", cmd_logs),
                                 ("stop", "stop a running job", cmd_stop)):
        jp = jsub.add_parser(name, help=helptext)
        jp.add_argument("job_id", help="submission id (tvr-...) as printed by tvr submit")
        _add_connection_args(jp)
        jp.set_defaults(func=func)
        if name == "logs":
            jp.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    lp = jsub.add_parser("list", help="all jobs on the cluster")
    _add_connection_args(lp)
    lp.set_defaults(func=cmd_list)


# -- handlers ----------------------------------------------------------------------------------

def _fail(args: argparse.Namespace, err: Exception) -> int:
    where = "submit" if getattr(args, "jobs_command", None) is None else f"jobs {args.jobs_command}"
    print(f"tvr {where}: error: {err}", file=sys.stderr)
    return 1


def _client(args: argparse.Namespace, spec_address: str | None = None):
    address = sb.resolve_address(args.address, spec_address=spec_address)
    auth = sb.resolve_auth(header=args.auth_header)
    return address, sb.connect(address, auth, timeout=args.connect_timeout)


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        sub = sb.prepare(args.spec, args.overrides, command=args.command, submission_id=args.submission_id)
        for w in sub.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if args.dry_run:
            print(describe(sub))
            return 0
        address, client = _client(args, sub.spec_address)
        job_id = sb.submit(sub, client)
    except sb.SubmitError as err:
        return _fail(args, err)
    print(f"submitted {job_id} to {address}\n"
          f"  logs:   tvr jobs logs {job_id} --follow --address {address}\n"
          f"  status: tvr jobs status {job_id} --address {address}\n"
          f"  stop:   tvr jobs stop {job_id} --address {address}", flush=True)
    if not args.follow:
        return 0
    return _follow(client, job_id)


def _follow(client: Any, job_id: str) -> int:
    try:
        status = sb.follow_logs(client, job_id)
    except KeyboardInterrupt:
        print(f"\n(stopped following; {job_id} keeps running)", file=sys.stderr)
        return 130
    print(f"job {job_id} {status}", file=sys.stderr if status != "SUCCEEDED" else sys.stdout)
    return 0 if status == "SUCCEEDED" else 1


def _ray_call(what: str, fn, *a):  # noqa: ANN001
    try:
        return fn(*a)
    except Exception as err:
        raise sb.SubmitError(f"{what}: {sb._first_line(err)}") from None


def cmd_status(args: argparse.Namespace) -> int:
    try:
        _, client = _client(args)
        info = _ray_call(f"job {args.job_id}", client.get_job_info, args.job_id)
    except sb.SubmitError as err:
        return _fail(args, err)
    print(f"{args.job_id}: {info.status}")
    if info.message:
        print(f"  message:    {info.message}")
    print(f"  started:    {_when(info.start_time)}\n  ended:      {_when(info.end_time)}")
    print(f"  entrypoint: {info.entrypoint}")
    for k, v in sorted((info.metadata or {}).items()):
        print(f"  {k}: {v}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    try:
        _, client = _client(args)
        if args.follow:
            _ray_call(f"job {args.job_id}", client.get_job_status, args.job_id)
            return _follow(client, args.job_id)
        text = _ray_call(f"job {args.job_id}", client.get_job_logs, args.job_id)
    except sb.SubmitError as err:
        return _fail(args, err)
    sys.stdout.write(text)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    try:
        _, client = _client(args)
        stopped = _ray_call(f"job {args.job_id}", client.stop_job, args.job_id)
        status = "" if stopped else _ray_call(f"job {args.job_id}", client.get_job_status, args.job_id)
    except sb.SubmitError as err:
        return _fail(args, err)
    print(f"stop requested for {args.job_id}" if stopped else f"{args.job_id} already ended ({status})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    try:
        _, client = _client(args)
        jobs = _ray_call("list jobs", client.list_jobs)
    except sb.SubmitError as err:
        return _fail(args, err)
    rows = [(j.submission_id or j.job_id or "-", str(j.status), _when(j.start_time),
             (j.metadata or {}).get("tvr_run", "-"), j.entrypoint or "-")
            for j in sorted(jobs, key=lambda j: j.start_time or 0)]
    header = ("SUBMISSION ID", "STATUS", "STARTED (UTC)", "RUN", "ENTRYPOINT")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4][:60])
    return 0


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def describe(sub: sb.Submission) -> str:
    """A human-readable account of a prepared submission (``--dry-run``); the spec text last."""
    env = sub.runtime_env
    lines = [f"submission id: {sub.submission_id}", f"entrypoint:    {sub.entrypoint}",
             f"resources:     entrypoint_num_cpus={sub.entrypoint_num_cpus} "
             f"entrypoint_num_gpus={sub.entrypoint_num_gpus}"]
    if "working_dir" in env:
        lines.append(f"working_dir:   {env['working_dir']}")
    for mod in env.get("py_modules", []):
        lines.append(f"py_modules:    {mod}")
    for up in sub.uploads:
        lines.append(f"  upload {up.base}: {len(up.files)} files, {up.bytes / 2**20:.2f} MiB")
    if not sub.uploads:
        lines.append("code:          not shipped (cluster.ship_code=false: the image has tvr installed)")
    for k, v in sorted(env["env_vars"].items()):
        lines.append(f"env {k}=" + (f"<{len(v)} bytes of YAML, below>" if k == sb.SPEC_ENV else v))
    for k, v in sorted(sub.metadata.items()):
        lines.append(f"metadata {k}={v}")
    lines += ["--- resolved spec ---", sub.spec_yaml.rstrip()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tvr", description="tvr cluster commands")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
