"""Contrastive objectives shared by the methods.

Symmetric InfoNCE (CLIP's loss) over a similarity matrix S (N_t, N_v) whose diagonal holds the
matching pairs, with temperature τ = 1 / logit_scale:

    L = ½ [ CE(S / τ, diag)  +  CE(Sᵀ / τ, diag) ]

These functions are single-process: to use negatives from every worker, the platform gathers the
features (with gradients) before the method builds S, as open_clip's ClipLoss does with
``gather_with_grad``. See :func:`gather_features` for the injectable form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def symmetric_ce(logits: Tensor) -> Tensor:
    """logits (N, N), already scaled by 1/τ, positives on the diagonal -> scalar loss."""
    if logits.shape[0] != logits.shape[1]:
        raise ValueError(f"symmetric_ce needs a square matrix, got {tuple(logits.shape)}")
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def clip_logits(sims: Tensor, logit_scale: Tensor | float, max_scale: float = 100.0) -> Tensor:
    """Scale cosine similarities by exp(logit_scale) clamped at ``max_scale`` (learnable τ).

    ``logit_scale`` is CLIP's log-parameterised inverse temperature; pass a float tensor that
    does not require grad (or a Python float in log space) for a fixed temperature.
    """
    scale = torch.as_tensor(logit_scale, device=sims.device).exp().clamp(max=max_scale)
    return sims * scale


def gather_features(features: dict[str, Tensor], gather: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Apply a (differentiable) all-gather along dim 0 to every tensor of a feature dict."""
    return {k: gather(v) for k, v in features.items()}
