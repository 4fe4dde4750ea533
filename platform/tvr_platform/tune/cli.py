"""``tvr tune`` and ``tvr registry promote``.

    tvr tune <spec> [overrides] [--resume] [--retry-errored]
    tvr registry promote <spec> [overrides] (--run-id ID | --campaign NAME) [--name MODEL]
"""

from __future__ import annotations

import argparse


def cmd_tune(args: argparse.Namespace) -> int:
    from tvr_platform.config import load_job
    from tvr_platform.tune.campaign import run_campaign

    job = load_job(args.spec, args.overrides)
    result = run_campaign(job, resume=args.resume, retry_errored=args.retry_errored)
    metric = job.tune.metric
    print(f"\ncampaign {result.name}: {len(result.rows)} trials, ranked by {metric} ({job.tune.mode})")
    for r in result.rows:
        v = r[metric]
        print(f"  {r['rank']:>3}  {r['trial_id']:<14} {r['status']:<14} epochs={r['epochs']:<3} "
              f"{metric}={'-' if v is None else f'{v:.4f}'}  {r['values']}")
    print(f"[tvr] Tune experiment: {result.experiment_path}")
    print(f"[tvr] MLflow parent run: {result.parent_run_id} ({job.tracking_uri})")
    if result.interrupted:
        print(f"[tvr] interrupted; continue with: tvr tune {args.spec} {' '.join(args.overrides)} --resume")
        return 130
    if result.best is not None:
        print(f"[tvr] best trial {result.best['trial_id']}; reproduce it with `tvr train` on the parent run's "
              "artifact summary/best_job.yaml")
    if result.promoted:
        p = result.promoted
        print(f"[tvr] registered models:/{p['name']}/{p['version']} (challenger; champion "
              f"{'moved' if p['promoted'] else 'kept'}: {p.get('reason', '')})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from tvr_platform.config import load_job
    from tvr_platform.tune.campaign import campaign_name
    from tvr_platform.tune.promote import best_campaign_run, promote_run

    job = load_job(args.spec, args.overrides)
    run_id = args.run_id or best_campaign_run(job.tracking_uri, job.tracking.experiment,
                                              args.campaign or campaign_name(job))
    out = promote_run(job.tracking_uri, run_id, name=args.name or job.tracking.registered_model,
                      metric=args.metric or job.tune.metric, mode=args.mode or job.tune.mode, force=args.force,
                      caller=job)
    print(f"[tvr] registered models:/{out['name']}/{out['version']} from run {run_id}: challenger moved; "
          f"champion {'moved' if out['promoted'] else 'kept'} ({out['reason']})")
    return 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("tune", help="run (or resume) a Ray Tune campaign over a job spec")
    p.add_argument("spec", help="YAML job spec with a tune: section")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--resume", action="store_true", help="continue an interrupted campaign (Tuner.restore)")
    p.add_argument("--retry-errored", action="store_true", help="with --resume: rerun errored trials")
    p.set_defaults(func=cmd_tune)

    reg = sub.add_parser("registry", help="MLflow model registry").add_subparsers(dest="registry_command",
                                                                                   required=True)
    pr = reg.add_parser("promote", help="register a run's weights and move challenger/champion")
    pr.add_argument("spec", help="job spec (for the tracking URI, experiment, campaign name)")
    pr.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    src = pr.add_mutually_exclusive_group()
    src.add_argument("--run-id", help="MLflow run to register (a trial or a train run)")
    src.add_argument("--campaign", help="campaign whose best finished trial is registered (default: the spec's)")
    pr.add_argument("--name", help="registered model name (default tracking.registered_model or tvr-<method>)")
    pr.add_argument("--metric", help="metric deciding champion (default tune.metric)")
    pr.add_argument("--mode", choices=("max", "min"), help="default tune.mode")
    pr.add_argument("--force", action="store_true", help="move champion even when the run does not beat chance "
                    "or the current champion")
    pr.set_defaults(func=cmd_promote)
