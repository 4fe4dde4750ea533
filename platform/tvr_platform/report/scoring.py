"""Scores for ``tvr eval``: the method's similarity in tiles, with the inference re-normalisations.

Sinkhorn-Knopp for UCoFIA is applied the way the method defines it, to each granularity's full
matrix before averaging (``UCoFIA.combine``, temperature 1/e^θ); for every other method SK is
applied to the full final matrix (``tvr_platform.evaluation.evaluate``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tvr.methods.base import Features, prepare_video
from tvr.metrics import Ranks
from tvr_platform.evaluation import evaluate, own_sinkhorn


@torch.no_grad()
def evaluate_method(method: torch.nn.Module, text: Features, video: Features, text_to_video: Tensor, *,
                    block: int, dsl: bool, sinkhorn_iters: int | None = None, v2t_rank: str = "videos",
                    dsl_v2t: str = "texts", bank_text: Features | None = None,
                    device: torch.device | str = "cpu") -> tuple[dict[str, float], Ranks]:
    """Metrics and ranks of ``method`` on embedded texts x videos (features on CPU, tiles scored
    on ``device``, where ``method`` must be).

    ``sinkhorn_iters``: the SK this method takes: for a method with its own (UCoFIA) its
    per-granularity SK iterations (None = its config's), else the generic SK of the final matrix
    (None = off). ``bank_text``: training-caption features for the official bank form."""
    own = own_sinkhorn(method)

    def model(mode: str, text_feats: Features | None = None, video_feats: Features | None = None) -> Tensor:
        if mode == "prepare_video":
            return prepare_video(method, video_feats)
        return method.similarity(text_feats, video_feats)

    model.method = method  # type: ignore[attr-defined]  (evaluate finds the method's own SK)
    return evaluate(model, text, video, text_to_video, block=block, dsl=dsl,
                    sinkhorn_iters=0 if own else int(sinkhorn_iters or 0),
                    own_iters=None if not own or sinkhorn_iters is None else int(sinkhorn_iters), v2t_rank=v2t_rank, dsl_v2t=dsl_v2t,
                    bank_text=bank_text, device=device)


def pair_scorer(method: torch.nn.Module, text: Features, video: Features) -> Callable[[Tensor, Tensor], Tensor]:
    """score(text_idx, video_idx) -> raw similarity block (no re-normalisation), for plots."""

    @torch.no_grad()
    def score(ti: Tensor, vi: Tensor) -> Tensor:
        t = {k: v[ti] for k, v in text.items()}
        v = {k: x[vi] for k, x in video.items()}
        return method.similarity(t, v)

    return score


__all__ = ["evaluate_method", "pair_scorer"]
