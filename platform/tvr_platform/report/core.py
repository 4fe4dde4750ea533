"""The evaluation report as plain JSON-ready data (no plotting here, see :mod:`.plots`).

Schema (``REPORT_SCHEMA`` = "tvr.eval-report/1")::

    {"schema", "meta": {target, method, split, num_texts, num_videos, dsl, sinkhorn_iters, ...},
     "metrics": {t2v_R1 .. t2v_MnR, v2t_R1 .. v2t_MnR},          # tvr.metrics.retrieval_metrics
     "recall_curve": {"k": [1..K], "t2v": [R@k %], "v2t": [R@k %]},
     "rank_histogram": {"edges": [...], "t2v": [counts], "v2t": [counts]},
     "similarity_sample": {"texts": [i...], "videos": [j...], "matrix": [[...]]},   # optional
     "modality_gap": {"gap": ‖mean t̂ − mean v̂‖, "mean_cos_text_video": ..., "pca": {...}}}  # optional

Modality gap (Liang et al., NeurIPS 2022, as ExCae's figure 8): with L2-normalised embeddings,
gap = ‖(1/N_t) Σ t̂_i − (1/N_v) Σ v̂_j‖₂; the picture is the 2-D PCA of both sets fitted jointly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from tvr.methods.base import Features
from tvr.metrics import Ranks, retrieval_metrics

REPORT_SCHEMA = "tvr.eval-report/1"

TEXT_KEYS = ("text", "sentence", "base.text", "base.sentence")
"""Feature keys holding one global text embedding (N, D), in order of preference."""
VIDEO_KEYS = ("video", "base.video", "frames", "base.frames", "residual")
"""Feature keys for one video embedding; (N, T, D) per-frame features are mean-pooled."""


def recall_curve(ranks: Tensor, max_k: int) -> list[float]:
    """R@k in % for k = 1..max_k from 1-based ranks."""
    r = ranks.long().cpu()
    counts = torch.bincount(r.clamp(max=max_k + 1), minlength=max_k + 2)[1:max_k + 1]   # (max_k,)
    return (counts.cumsum(0).double() / r.numel() * 100).tolist()


def rank_histogram(ranks: Tensor, edges: list[float]) -> list[int]:
    """Counts of ranks in [edges[i], edges[i+1]) (the last bin is closed)."""
    counts, _ = np.histogram(ranks.cpu().numpy(), bins=np.asarray(edges, dtype=np.float64))
    return [int(c) for c in counts]


def log_edges(n: int) -> list[float]:
    """Histogram edges for ranks 1..n: unit bins up to 10, then log-spaced, ending at n + 1."""
    small = list(range(1, min(n, 10) + 2))
    if n <= 10:
        return [float(e) for e in small]
    big = np.unique(np.round(np.geomspace(11, n + 1, num=12))).tolist()
    return [float(e) for e in small[:-1] + big]


def _global(feats: Features, keys: tuple[str, ...], what: str) -> Tensor:
    for k in keys:
        if k in feats:
            x = feats[k].float()
            return x.mean(dim=1) if x.ndim == 3 else x
    raise KeyError(f"no global {what} embedding among features {sorted(feats)} (looked for {list(keys)})")


def global_text_embedding(text: Features) -> Tensor:
    """(N, D) L2-normalised global text embedding from any method's text features."""
    return torch.nn.functional.normalize(_global(text, TEXT_KEYS, "text"), dim=-1)


def global_video_embedding(video: Features) -> Tensor:
    """(N, D) L2-normalised global video embedding (per-frame features mean-pooled)."""
    return torch.nn.functional.normalize(_global(video, VIDEO_KEYS, "video"), dim=-1)


def global_embeddings(text: Features, video: Features) -> tuple[Tensor, Tensor]:
    """One (N, D) embedding per text and per video from any method's features (per-frame features
    mean-pooled), L2-normalised: what the modality-gap picture projects."""
    t, v = global_text_embedding(text), global_video_embedding(video)
    if t.shape[1] != v.shape[1]:
        raise ValueError(f"text ({t.shape[1]}) and video ({v.shape[1]}) embeddings differ in width")
    return t, v


def pca_2d(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows x (N, D) -> (coordinates (N, 2) on the two leading principal axes, explained variance
    ratio (2,)). Exact SVD of the centred data (torch.linalg), signs fixed so that the largest
    loading of each axis is positive."""
    xc = x.double() - x.double().mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    axes = vh[:2]                                                                # (2, D)
    sign = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))    # (2, 1)
    axes = axes * sign
    var = s ** 2
    return (xc @ axes.t()).float(), (var[:2] / var.sum().clamp(min=1e-30)).float()


def modality_gap(text: Tensor, video: Tensor, max_points: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Gap statistics and the joint 2-D PCA of L2-normalised text (N_t, D) and video (N_v, D)."""
    t = torch.nn.functional.normalize(text.double(), dim=-1)
    v = torch.nn.functional.normalize(video.double(), dim=-1)
    gap = float((t.mean(0) - v.mean(0)).norm())
    g = torch.Generator().manual_seed(seed)
    ti = torch.randperm(t.shape[0], generator=g)[:max_points].sort().values
    vi = torch.randperm(v.shape[0], generator=g)[:max_points].sort().values
    coords, ratio = pca_2d(torch.cat([t[ti], v[vi]]))
    return {"gap": gap,
            "mean_cos_text_video": float((t @ v.t()).mean()),
            "pca": {"explained_variance_ratio": ratio.tolist(),
                    "text": coords[:len(ti)].tolist(), "video": coords[len(ti):].tolist(),
                    "text_index": ti.tolist(), "video_index": vi.tolist()}}


def sample_similarity(score, text_to_video: Tensor, n: int) -> dict[str, Any]:
    """The first ``n`` videos and, for each, its first caption: an (n, n) block whose diagonal
    holds the positives. ``score(text_idx, video_idx)`` returns the similarity block."""
    g = text_to_video.long().cpu()
    n_v = int(g.max()) + 1
    videos = list(range(min(n, n_v)))
    first = {}
    for i, v in enumerate(g.tolist()):
        first.setdefault(v, i)
    texts = [first[v] for v in videos]
    m = score(torch.tensor(texts), torch.tensor(videos)).float().cpu()
    return {"texts": texts, "videos": videos, "matrix": m.tolist()}


def build_report(ranks: Ranks, meta: dict[str, Any], *, max_k: int = 50,
                 similarity: dict[str, Any] | None = None, gap: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-ready report of one evaluation (schema in the module docstring)."""
    n_v, n_t = int(ranks.v2t.numel()), int(ranks.t2v.numel())
    edges = log_edges(max(n_v, n_t))          # t2v ranks are <= N_v, v2t ranks <= N_t
    k = max(10, min(max_k, n_v))
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "meta": meta,
        "metrics": retrieval_metrics(ranks),
        "recall_curve": {"k": list(range(1, k + 1)), "t2v": recall_curve(ranks.t2v, k),
                         "v2t": recall_curve(ranks.v2t, k)},
        "rank_histogram": {"edges": edges, "t2v": rank_histogram(ranks.t2v, edges),
                           "v2t": rank_histogram(ranks.v2t, edges)},
    }
    if similarity is not None:
        report["similarity_sample"] = similarity
    if gap is not None:
        report["modality_gap"] = gap
    return report
