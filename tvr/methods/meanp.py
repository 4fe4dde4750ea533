"""CLIP4Clip mean pooling ("meanP"), Luo et al. 2021, github.com/ArrowLuo/CLIP4Clip.

    v = norm( (1/T) Σ_t f_t / ‖f_t‖ )      f_t: CLIP CLS feature of frame t, (B, T, D) -> (B, D)
    s(t, v) = cos(t, v)                     t: CLIP EOS sentence feature
    L = symmetric InfoNCE with CLIP's learnable temperature

The frame features are L2-normalised *before* the mean and the mean normalised again, exactly as
the official ``CLIP4Clip._loose_similarity`` (``sim_header="meanP"``: ``visual_output /= norm``,
``_mean_pooling_for_similarity_visual``, ``/= norm``); a mean of raw features weights frames by
their norms and differs whenever those norms differ.

Deviations from the official code: no frame padding mask (the platform always samples T real
frames, so the official masked mean equals the plain mean); the logit scale is clamped at 100
inside :func:`tvr.losses.clip_logits` (CLIP4Clip does not clamp).

Training-recipe differences (``jobs/repro/meanp.yaml``; the full list, shared by every recipe, is in
docs/reference-results.md "What still differs"): one caption per clip per epoch (epochs x 20
instead of ``--expand_msrvtt_sentences``); torch AdamW instead of BertAdam (b2 0.98, eps 1e-6,
no bias correction) and a cosine decay after the warm-up instead of ``warmup_cosine`` over the
whole run; no decay on gains/embeddings/temperature too (official: biases and LayerNorm only);
77 caption tokens (official ``max_words 32``); bf16 autocast (official: fp16 CLIP weights);
12 frames from tvr's sampler (official: 1 fps, then 12 uniformly); last epoch reported (official:
best epoch on the test split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from tvr.backbone import ClipBackbone
from tvr.losses import clip_logits, symmetric_ce
from tvr.methods.base import Features, MethodSpec, backbone_head_groups


@dataclass(kw_only=True)
class MeanPCfg:
    """Mean pooling has no knobs of its own."""


class MeanP(nn.Module):
    global_cosine = True
    """``similarity`` is the cosine of one global text and one global video embedding, so a search
    index may answer it with a nearest-neighbour index over the unit video embeddings."""

    def __init__(self, cfg: MeanPCfg, backbone: ClipBackbone):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone

    def encode_text(self, text: Tensor) -> Features:
        eos, _, _ = self.backbone.encode_text(text)                      # (B, D)
        return {"text": eos}

    def encode_video(self, frames: Tensor, captions: Tensor | None = None) -> Features:
        cls, _ = self.backbone.encode_frames(frames)                     # (B, T, D)
        return {"video": F.normalize(F.normalize(cls, dim=-1).mean(dim=1), dim=-1)}  # (B, D)

    def similarity(self, text: Features, video: Features) -> Tensor:
        t = F.normalize(text["text"], dim=-1)                            # (Nt, D)
        v = F.normalize(video["video"], dim=-1)                          # (Nv, D)
        return t @ v.t()                                                 # (Nt, Nv)

    def loss(self, text: Features, video: Features) -> dict[str, Tensor]:
        return {"loss": symmetric_ce(clip_logits(self.similarity(text, video), self.backbone.logit_scale))}

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return backbone_head_groups(self, lr, backbone_lr, weight_decay)


SPEC = MethodSpec(name="meanp", config_cls=MeanPCfg, build=MeanP,
                  summary="CLIP4Clip mean pooling of frame features")
