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


def _recall(plt, report: dict[str, Any]):
    rc = report["recall_curve"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for d in ("t2v", "v2t"):
        ax.plot(rc["k"], rc[d], marker=".", label=d)
    ax.set(xscale="log", xlabel="K", ylabel="R@K (%)", ylim=(0, 101), title="Recall@K")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _ranks(plt, report: dict[str, Any]):
    h = report["rank_histogram"]
    edges = h["edges"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=False)
    for ax, d in zip(axes, ("t2v", "v2t")):
        ax.stairs(h[d], edges, fill=True, alpha=0.7)
        ax.set(xscale="log", xlabel="rank of the positive", ylabel="count", title=d)
    return fig


def _heatmap(plt, report: dict[str, Any]):
    s = report["similarity_sample"]
    fig, ax = plt.subplots(figsize=(4.6, 4))
    im = ax.imshow(s["matrix"], cmap="viridis", aspect="auto")
    ax.set(xlabel="video", ylabel="caption (diagonal = its video)", title="similarity sample")
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
           title=f"modality gap = {g['gap']:.3f}")
    ax.legend()
    return fig


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
