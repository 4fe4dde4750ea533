"""PNG plots of an evaluation report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = ("recall_at_k.png", "rank_histogram.png", "similarity_heatmap.png", "modality_gap.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _subject(report: dict[str, Any]) -> str:
    """'<model> v<version> (<method>), <split>' for the titles, from the report's meta."""
    m = report.get("meta", {})
    model = f"{m['model']} v{m['model_version']}" if m.get("model") else m.get("target", "")
    method = m.get("method", "")
    return ", ".join(x for x in (f"{model} ({method})" if model and method else model or method,
                                 m.get("split") and f"split {m['split']}") if x)


def _sizes(report: dict[str, Any]) -> tuple[int, int] | None:
    m = report.get("meta", {})
    return (int(m["num_videos"]), int(m["num_texts"])) if "num_videos" in m and "num_texts" in m else None


def first_true_survival(r: int, pool: int, positives: float) -> float:
    """P(the best-ranked of ``positives`` true items among ``pool`` has rank >= r), random scores."""
    p = 1.0
    for i in range(max(r - 1, 0)):
        if pool - positives - i <= 0:  # fewer negatives than r - 1: the first true one ranks earlier
            return 0.0
        p *= (pool - positives - i) / (pool - i)
    return p


def _recall(plt, report: dict[str, Any]):
    rc = report["recall_curve"]
    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    sizes = _sizes(report)
    for d, colour in (("t2v", "tab:blue"), ("v2t", "tab:orange")):
        ax.plot(rc["k"], rc[d], marker=".", label=d, color=colour)
        if sizes:  # random scores: t2v one true clip of N; v2t c = T/N true captions of T
            n, t = sizes
            pool, pos = (n, 1.0) if d == "t2v" else (t, max(t / n, 1.0))
            ax.plot(rc["k"], [100 * (1 - first_true_survival(k + 1, pool, pos)) for k in rc["k"]], ls="--",
                    lw=1, color=colour, label=f"{d} chance")
    ax.set(xscale="log", xlabel="K", ylabel="R@K (%)", ylim=(0, 101), title=f"Recall@K: {_subject(report)}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _ranks(plt, report: dict[str, Any]):
    h = report["rank_histogram"]
    edges = h["edges"]
    sizes = _sizes(report)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), sharey=False)
    for ax, d in zip(axes, ("t2v", "v2t")):
        ax.stairs(h[d], edges, fill=True, alpha=0.7, label="ranks")
        if sizes:  # expected count per bin for random scores
            n, t = sizes
            pool, pos, queries = (n, 1.0, t) if d == "t2v" else (t, max(t / n, 1.0), n)
            expected = [queries * (first_true_survival(int(a), pool, pos) - first_true_survival(int(b), pool, pos))
                        for a, b in zip(edges[:-1], edges[1:])]
            ax.stairs(expected, edges, color="black", ls="--", lw=1, label="chance")
            ax.legend(fontsize=8)
        ax.set(xscale="log", xlabel="rank of the positive", ylabel="count", title=d)
    fig.suptitle(f"Rank histogram: {_subject(report)}", fontsize=9)
    return fig


def _heatmap(plt, report: dict[str, Any]):
    s = report["similarity_sample"]
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    im = ax.imshow(s["matrix"], cmap="viridis", aspect="auto")
    n = len(s["matrix"])
    ax.scatter(range(n), range(n), marker="s", s=max(4.0, 600 / max(n, 1)), facecolors="none",
               edgecolors="white", linewidths=0.8, label="positive pair")
    ax.set(xlabel="video", ylabel="caption (its video on the diagonal)",
           title=f"similarity sample: {_subject(report)}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper right")
    fig.colorbar(im, ax=ax)
    return fig


def _gap(plt, report: dict[str, Any]):
    g = report["modality_gap"]
    p = g["pca"]
    fig, ax = plt.subplots(figsize=(4.6, 4))
    for name, colour in (("text", "tab:blue"), ("video", "tab:red")):
        pts = p[name]
        ax.scatter([x for x, _ in pts], [y for _, y in pts], s=6, alpha=0.6, c=colour, label=name)
    r = p["explained_variance_ratio"]
    ax.set(xlabel=f"PC1 ({100 * r[0]:.0f}%)", ylabel=f"PC2 ({100 * r[1]:.0f}%)",
           title=f"modality gap = {g['gap']:.3f}: {_subject(report)}")
    ax.title.set_fontsize(9)
    ax.legend()
    return fig


def learning_curves(history: dict[str, list[tuple[int, float]]], title: str, out: str | Path) -> Path:
    """Training curves: ``history`` maps a metric name to its (step, value) points; losses on the
    left axis, recalls (%) on the right."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    right = None
    for name, points in history.items():
        if not points:
            continue
        steps, values = zip(*sorted(points))
        if "loss" in name:
            ax.plot(steps, values, marker=".", label=name)
        else:
            right = right or ax.twinx()
            right.plot(steps, values, marker="o", ls="--", label=name, color="tab:green")
            right.set(ylabel="R@1 (%)", ylim=(0, 101))
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.title.set_fontsize(9)
    handles = ax.get_legend_handles_labels()
    if right is not None:
        extra = right.get_legend_handles_labels()
        handles = (handles[0] + extra[0], handles[1] + extra[1])
    ax.legend(*handles, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def write_plots(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the plots the report has data for into ``out_dir``; returns the PNG paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = [("recall_at_k.png", _recall, "recall_curve"), ("rank_histogram.png", _ranks, "rank_histogram"),
              ("similarity_heatmap.png", _heatmap, "similarity_sample"), ("modality_gap.png", _gap, "modality_gap")]
    written = []
    for name, make, key in makers:
        if key in report:
            fig = make(plt, report)
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(out / name)
    return written
