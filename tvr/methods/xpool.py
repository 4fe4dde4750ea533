"""X-Pool: cross-modal language-video attention, Gorti et al. CVPR 2022, github.com/layer6ai-labs/xpool.

A text t ∈ R^D attends over the T frame features F = [f_1 .. f_T] ∈ R^{T×D} of a video (CLIP CLS
features), so every (text i, video j) pair gets its own text-conditioned video embedding v_{j|i}.
Following the official ``modules/transformer.py`` (class ``Transformer``) exactly, with one shared
LayerNorm LN₁ for both modalities, H heads of width d_h = D / H:

    t̃ = LN₁(t),  F̃ = LN₁(F)
    q = W_q t̃ + b_q                       (D,)       split into heads q_h      (d_h,)
    K = F̃ W_kᵀ + b_k,  V = F̃ W_vᵀ + b_v   (T, D)     split into heads K_h, V_h (T, d_h)
    a_h = softmax_k( K_h q_h / √d_h )      (T,)       softmax over the frames
    z = W_o [a_1ᵀ V_1 ‖ … ‖ a_Hᵀ V_H] + b_o (D,)
    z' = LN₂(z)
    v_{j|i} = LN₃( z' + Dropout(W_l z' + b_l) )

All four projections and W_l start as the identity with zero bias (official ``_init_parameters``).
The score is the cosine between the *raw* CLIP sentence feature (not LN₁(t)) and the pooled video
(official ``sim_matrix_training`` / ``sim_matrix_inference``):

    s(t_i, v_j) = cos(t_i, v_{j|i})
    L = ½ [ CE(S / τ, diag) + CE(Sᵀ / τ, diag) ]      CLIP's learnable τ = 1 / exp(logit_scale)

Official defaults (``config/all_config.py``): 1 head, dropout 0.3, 12 frames, CLIP lr 1e-6 and
head lr 1e-5, weight decay 0.2, logit scale clamped at 100 (here inside :func:`clip_logits`).
Pooling is text-conditioned, so ``encode_video`` returns per-frame features and pooling happens in
``similarity`` / ``loss``.

Deviations from the official code:
- the pooled tensor is laid out (N_t, N_v, D) (official: (N_v, N_t, D)); the scores are the same;
- ``similarity`` processes the texts in chunks of ``sim_chunk`` so a block costs
  O(sim_chunk · N_v · D) memory (the official code pools all texts x all videos at once on the CPU);
- inference computes the frames' keys and values K, V once per ``similarity`` call (the official
  code once per call too; earlier versions here once per text chunk), and ``prepare_video`` adds
  them to the video features so an evaluation or a search index computes them once in all;
- the official ``attention_temperature`` argument is unused by its transformer pooling and is not
  exposed here.

Training-recipe differences (``jobs/repro/xpool.yaml``; the full list, shared by every recipe, is in
docs/reference-results.md "What still differs"): one caption per clip per epoch (epochs x 20 instead
of all pairs); warm-up in steps (10 % of the updates, as ``warmup_proportion``); AdamW eps 1e-8
(official 1e-6) and no weight decay on gains/biases/embeddings/temperature (official: every
parameter decays); no RandomResizedCrop / horizontal flip in training; the last evaluation is
reported (official: best of 10 evaluations per epoch on the test split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvr.backbone import ClipBackbone
from tvr.losses import clip_logits, symmetric_ce
from tvr.methods.base import Features, MethodSpec, backbone_head_groups


@dataclass(kw_only=True)
class XPoolCfg:
    """X-Pool text-conditioned attention pooling (the embedding width comes from the backbone)."""

    num_heads: int = 1
    """Attention heads H in the text-to-frame cross attention (official ``num_mha_heads`` = 1)."""
    dropout: float = 0.3
    """Dropout on the residual linear branch (official ``transformer_dropout`` = 0.3)."""
    sim_chunk: int = 32
    """Texts pooled at once in ``similarity``; memory per chunk is about 6 · sim_chunk · N_v · D floats."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"num_heads must be a positive integer, got {self.num_heads!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.sim_chunk, int) or self.sim_chunk < 1:
            raise ValueError(f"sim_chunk must be a positive integer, got {self.sim_chunk!r}")


class TextConditionedPool(nn.Module):
    """The official X-Pool ``Transformer``: texts (N_t, D) x videos (N_v, T, D) -> (N_t, N_v, D)."""

    def __init__(self, *, dim: int, num_heads: int = 1, dropout: float = 0.3):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the embedding width {dim}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.linear_proj = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ln3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.linear_proj):
            nn.init.eye_(lin.weight)
            nn.init.zeros_(lin.bias)

    def project_frames(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """The text-independent part: frames (N_v, T, D) -> K, V (N_v, T, D) (before the head split)."""
        f = self.ln1(frames)                                             # (Nv, T, D)
        return self.k_proj(f), self.v_proj(f)

    def forward(self, text: Tensor, frames: Tensor, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """text (N_t, D), frames (N_v, T, D) -> v_{j|i} laid out (N_t, N_v, D). ``kv``: the frames'
        keys and values from :meth:`project_frames`, when the caller already has them."""
        Nt, (Nv, T, D) = text.shape[0], frames.shape
        H, dh = self.num_heads, self.head_dim
        t = self.ln1(text)                                               # (Nt, D)
        k, v = self.project_frames(frames) if kv is None else kv         # (Nv, T, D) each
        q = self.q_proj(t).view(Nt, H, dh)                               # (Nt, H, dh)
        k = k.reshape(Nv, T, H, dh)                                      # (Nv, T, H, dh)
        v = v.reshape(Nv, T, H, dh)                                      # (Nv, T, H, dh)
        logits = torch.einsum("ihd,jkhd->ijhk", q, k) / math.sqrt(dh)    # (Nt, Nv, H, T)
        attn = logits.softmax(dim=-1)                                    # over frames
        z = torch.einsum("ijhk,jkhd->ijhd", attn, v).reshape(Nt, Nv, D)  # (Nt, Nv, D)
        z = self.ln2(self.out_proj(z))                                   # (Nt, Nv, D)
        return self.ln3(z + self.dropout(self.linear_proj(z)))           # (Nt, Nv, D)


def pair_cosine(text: Tensor, pooled: Tensor) -> Tensor:
    """cos(t_i, v_{j|i}): text (N_t, D), pooled (N_t, N_v, D) -> (N_t, N_v)."""
    t = F.normalize(text, dim=-1)                                        # (Nt, D)
    v = F.normalize(pooled, dim=-1)                                      # (Nt, Nv, D)
    return torch.einsum("id,ijd->ij", t, v)                              # (Nt, Nv)


class XPool(nn.Module):
    def __init__(self, cfg: XPoolCfg, backbone: ClipBackbone):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.pool = TextConditionedPool(dim=backbone.embed_dim, num_heads=cfg.num_heads, dropout=cfg.dropout)

    def encode_text(self, text: Tensor) -> Features:
        eos, _, _ = self.backbone.encode_text(text)                      # (B, D)
        return {"text": eos}

    def encode_video(self, frames: Tensor, captions: Tensor | None = None) -> Features:
        cls, _ = self.backbone.encode_frames(frames)                     # (B, T, D)
        return {"frames": cls}

    def _frames(self, video: Features) -> Tensor:
        """The per-frame features (N_v, T, D) in the head's dtype."""
        if "frames" not in video or video["frames"].ndim != 3:
            raise ValueError(f"{type(self).__name__}: video features need 'frames' (N_v, T, D) from encode_video, "
                             f"got {sorted(video)}")
        return video["frames"].to(self.pool.ln1.weight.dtype)

    def _check(self, text: Features, video: Features) -> tuple[Tensor, Tensor]:
        for key, feats, where in (("text", text, "encode_text"), ("frames", video, "encode_video")):
            if key not in feats:
                raise KeyError(f"{type(self).__name__}: features need {key!r} from {where}, got {sorted(feats)}")
        t, f = text["text"], video["frames"]
        if f.ndim != 3 or t.ndim != 2 or t.shape[-1] != f.shape[-1]:
            raise ValueError(f"{type(self).__name__}: expected text (N_t, D) and frames (N_v, T, D), "
                             f"got {tuple(t.shape)} and {tuple(f.shape)}")
        dtype = self.pool.ln1.weight.dtype      # features stored as fp32 meet a bf16 / fp64 head
        return t.to(dtype), f.to(dtype)

    def prepare_video(self, video: Features) -> Features:
        """Inference: add the frames' keys and values ``frames_k``, ``frames_v`` (N_v, T, D), which
        depend only on the frames, so an evaluation or a search index computes them once."""
        f = self._frames(video)                                          # (Nv, T, D)
        k, v = self.pool.project_frames(f)                               # (Nv, T, D) each
        return {**video, "frames_k": k, "frames_v": v}

    def frame_kv(self, video: Features, f: Tensor) -> tuple[Tensor, Tensor]:
        """The frames' keys and values: prepared ones if present, else projected now (once per call)."""
        if "frames_k" in video and "frames_v" in video:
            return video["frames_k"].to(f.dtype), video["frames_v"].to(f.dtype)
        return self.pool.project_frames(f)

    def similarity(self, text: Features, video: Features) -> Tensor:
        t, f = self._check(text, video)                                  # (Nt, D), (Nv, T, D)
        kv = self.frame_kv(video, f)
        out = [pair_cosine(tc, self.pool(tc, f, kv))                     # (c, Nv) per chunk
               for tc in t.split(self.cfg.sim_chunk)]
        return torch.cat(out) if out else t.new_zeros(0, f.shape[0])     # (Nt, Nv)

    def loss(self, text: Features, video: Features) -> dict[str, Tensor]:
        t, f = self._check(text, video)                                  # (B, D), (B, T, D)
        sims = pair_cosine(t, self.pool(t, f))                           # (B, B)
        return {"loss": symmetric_ce(clip_logits(sims, self.backbone.logit_scale))}

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return backbone_head_groups(self, lr, backbone_lr, weight_decay)


SPEC = MethodSpec(name="xpool", config_cls=XPoolCfg, build=XPool,
                  summary="X-Pool text-conditioned attention pooling of frames (Gorti et al. 2022)")
