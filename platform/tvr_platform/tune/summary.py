"""Campaign summary in the parent MLflow run: ranked trials (Markdown + JSON), a knobs-vs-metric
scatter plot, and the best trial's job spec ready for ``tvr train``."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from tvr_platform.config import JobCfg, job_to_yaml

FINISHED, STOPPED, ERROR, UNFINISHED = "FINISHED", "STOPPED_EARLY", "ERROR", "UNFINISHED"


def _child_runs(job: JobCfg, campaign: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from tvr_platform.tune.campaign import CAMPAIGN_TAG, ROLE_TAG, TRIAL_ID_TAG

    client = MlflowClient(job.tracking_uri)
    exp = client.get_experiment_by_name(job.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{CAMPAIGN_TAG}` = '{campaign}' and tags.`{ROLE_TAG}` = 'trial'"), max_results=10000)
    return {r.data.tags[TRIAL_ID_TAG]: r for r in runs}


def trial_rows(grid, job: JobCfg, space) -> list[dict[str, Any]]:
    """One row per trial, ranked by its validation ``tune.metric``: a finished trial's selected
    epoch (``final/val/<metric>``), else its last report (unscored trials last). Test scores are
    never read here."""
    from tvr_platform.tune.campaign import campaign_name

    runs = _child_runs(job, campaign_name(job))
    metric, sign = job.tune.metric, (1 if job.tune.mode == "max" else -1)
    rows = []
    for result in grid:
        m = result.metrics or {}
        found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(result.path).name)
        trial_id = m.get("trial_id") or (found.group(1) if found else Path(result.path).name)
        iters = int(m.get("training_iteration", 0))
        run = runs.get(trial_id)
        if result.error is not None:
            status = ERROR
        elif run is not None and run.info.status == "FINISHED":
            status = FINISHED
        elif run is not None and run.data.tags.get("tvr.tune.stopped_early") == "true":
            status = STOPPED
        else:
            status = UNFINISHED
        value = m.get(metric)
        if status == FINISHED:
            final = "final/train_loss" if metric == "train_loss" else f"final/val/{metric}"
            value = run.data.metrics.get(final, value)
        rows.append({"trial_id": trial_id, "status": status, "epochs": iters, metric: value,
                     "values": space.trial_values(result.config or {}),
                     "run_id": run.info.run_id if run else None,
                     "error": str(result.error).splitlines()[0] if result.error is not None else None})

    def key(r):
        v = r[metric]
        return (0, -sign * v) if isinstance(v, int | float) and not math.isnan(v) else (1, 0)

    rows.sort(key=key)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def markdown_table(rows: list[dict[str, Any]], metric: str) -> str:
    keys = sorted({k for r in rows for k in r["values"]})
    head = ["rank", "trial", "status", "epochs", metric, *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        v = r[metric]
        cells = [r["rank"], r["trial_id"], r["status"], r["epochs"], "" if v is None else f"{v:.4f}",
                 *(_fmt(r["values"].get(k, "")) for k in keys)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def knobs_figure(rows: list[dict[str, Any]], space, metric: str):
    """One scatter panel per knob: the knob's value (categories spread on an axis) vs the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [p for p in space.params]
    scored = [r for r in rows if isinstance(r[metric], int | float)]
    cols = min(3, max(1, len(params)))
    nrows = math.ceil(len(params) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    colors = {"FINISHED": "tab:blue", "STOPPED_EARLY": "tab:orange", "ERROR": "tab:red", "UNFINISHED": "tab:gray"}
    for ax, p in zip(axes.flat, params, strict=False):
        pts = [(r["values"][p.key], r[metric], r["status"]) for r in scored if p.key in r["values"]]
        numeric = p.kind not in ("choice", "grid") or all(isinstance(v, int | float) for v in p.args)
        if numeric:
            xs = [float(x) for x, _, _ in pts]
            if p.kind == "loguniform":
                ax.set_xscale("log")
        else:
            cats = [str(v) for v in p.args]
            xs = [cats.index(str(x)) for x, _, _ in pts]
            ax.set_xticks(range(len(cats)), cats, rotation=30)
            ax.set_xlim(-0.5, len(cats) - 0.5)
        ax.scatter(xs, [y for _, y, _ in pts], c=[colors[s] for _, _, s in pts])
        ax.set_title(p.key, fontsize=9)
        ax.set_ylabel(metric)
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    fig.suptitle(f"knobs vs {metric} (blue finished, orange stopped early)")
    fig.tight_layout()
    return fig


def summarize(grid, job: JobCfg, space, parent) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Log the ranked table, the plot, the best job spec; return (rows, best finished trial)."""
    import matplotlib.pyplot as plt

    from tvr_platform.tune.campaign import campaign_name, trial_job

    metric = job.tune.metric
    rows = trial_rows(grid, job, space)
    parent.log_text(markdown_table(rows, metric), "summary/trials.md")
    parent.log_dict({"metric": metric, "mode": job.tune.mode, "trials": rows}, "summary/trials.json")
    if rows:
        fig = knobs_figure(rows, space, metric)
        parent.client.log_figure(parent.run_id, fig, "summary/knobs_vs_metric.png")
        plt.close(fig)
    best = next((r for r in rows if r["status"] == FINISHED and r[metric] is not None), None)
    if best is not None:
        best_job = trial_job(job, space, best["values"], best["trial_id"])
        best_job.run.name = f"{campaign_name(job)}-best"
        parent.log_text(job_to_yaml(best_job), "summary/best_job.yaml")
        parent.log_metrics({f"best/{metric}": float(best[metric])})
        parent.set_tags({"tvr.tune.best_trial": best["trial_id"], "tvr.tune.best_run_id": str(best["run_id"])})
    return rows, best
