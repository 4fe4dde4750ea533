"""Scores for ``tvr eval``: the method's similarity in tiles, with the inference re-normalisations.

Sinkhorn-Knopp for UCoFIA is applied the way the method defines it, to each granularity's full
matrix before averaging (``UCoFIA.combine``, temperature 1/e^θ); for every other method SK is
applied to the full final matrix (``tvr_platform.evaluation.evaluate``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tvr.methods.base import Features, prepare_video
from tvr.metrics import Ranks, ranks_from_matrix, retrieval_metrics
from tvr_platform.evaluation import evaluate


def has_granular_sinkhorn(method: torch.nn.Module) -> bool:
    return hasattr(method, "granularity_similarities") and hasattr(method, "combine")


@torch.no_grad()
def evaluate_method(method: torch.nn.Module, text: Features, video: Features, text_to_video: Tensor, *,
                    block: int, dsl: bool, sinkhorn_iters: int) -> tuple[dict[str, float], Ranks]:
    """Metrics and ranks of ``method`` on embedded texts x videos (CPU)."""
    if sinkhorn_iters > 0 and has_granular_sinkhorn(method):
        sims = method.combine(method.granularity_similarities(text, video), sinkhorn_iters=sinkhorn_iters)
        ranks = ranks_from_matrix(sims.float(), text_to_video, block=block, dsl_temp=100.0 if dsl else None)
        return retrieval_metrics(ranks), ranks

    def model(mode: str, text_feats: Features | None = None, video_feats: Features | None = None) -> Any:
        if mode == "prepare_video":
            return prepare_video(method, video_feats)
        return method.similarity(text_feats, video_feats)

    return evaluate(model, text, video, text_to_video, block=block, dsl=dsl, sinkhorn_iters=sinkhorn_iters)


def pair_scorer(method: torch.nn.Module, text: Features, video: Features) -> Callable[[Tensor, Tensor], Tensor]:
    """score(text_idx, video_idx) -> raw similarity block (no re-normalisation), for plots."""

    @torch.no_grad()
    def score(ti: Tensor, vi: Tensor) -> Tensor:
        t = {k: v[ti] for k, v in text.items()}
        v = {k: x[vi] for k, x in video.items()}
        return method.similarity(t, v)

    return score


__all__ = ["evaluate_method", "has_granular_sinkhorn", "pair_scorer"]
