"""VoP: Text-Video Co-operative Prompt Tuning, Huang et al., CVPR 2023 (arXiv 2211.12764).

Parameter-efficient tuning: the whole CLIP backbone is frozen; only prompt tokens (and, for
VoP-C, small prompt generators) train — about 0.1 % of CLIP ViT-B/32 for the base variant.
The prompted encoder loops live in :mod:`tvr.prompts`.

Text prompts (every variant): n_t tokens Pˡ_t after SOT in each of the first ``prompt_depth``
text layers; sentence feature t = CLIP's EOS feature, its index shifted by n_t.

Video prompts, n tokens of width w per prompted layer l, beside [CLS] in each frame f:

    base (VoP):   Pˡ_f = Pˡ                              one set shared by all frames
    P (VoP^P):    Pˡ_f = Pˡ_{π(f)}                       position-specific; frames at the same
                                                         relative position π(f) = ⌊f·F/T⌋ share
                                                         prompts (F = num_frames sets)
    C (VoP^C):    Pˡ_f = Pˡ + W_upˡ · TE(W_downˡ · LN(sˡ_1..sˡ_T))_f
                                                         context-specific; sˡ_f frame f's [CLS]
                                                         state entering layer l (patch mean at
                                                         l = 0, where [CLS] holds no content yet)
    F (VoP^F):    layers l < K_s intra-frame: per-frame prompts, attention inside each frame;
                  layers l ≥ K_s inter-frame: one joint sequence per clip
                  [Vˡ, x_1, .., x_T] — every token attends to the tokens of all frames — with
                  clip-level function-specific prompts Vˡ (n x w) instead of per-frame ones
    F+C:          F + C (VoP^{F+C}, the paper's MSR-VTT row in docs/reference-results.md):
                  intra-frame layers use shared + context prompts, inter-frame layers
                  clip-level prompts
    full:         P + C + F: intra-frame layers use position-specific + context prompts,
                  inter-frame layers clip-level prompts

Video feature and objective (official code: ModelScope ``vop_retrieval``, X-Pool trainer):

    v = (1/T) Σ_f f_f / ‖f_f‖              mean of L2-normalised frame features
    s(t, v) = cos(t, v)
    L = ½ [CE(s·e^τ, diag) + CE(sᵀ·e^τ, diag)]    τ = CLIP's logit_scale, frozen with the rest
                                                   of CLIP (``train_logit_scale`` to unfreeze)

Deviations from the official code, all documented here:

- The official repository bighuang624/VoP holds only a README; the released implementation
  (ModelScope ``modelscope/models/cv/vop_retrieval``) contains the base VoP only. Base VoP
  follows it (prompt init N(0, 0.02²), visual prompts right after [CLS] with no position
  embedding and through ``ln_pre`` at layer 0, text prompts after SOT before the position
  embedding is added, EOS index shifted, mean of normalised frame features). Its text suffix
  prompts (inserted before the last padding slot) are not implemented (default 0 there).
- P/C/F are rebuilt from the paper's description, since no code for them is public:
  the C generator is a per-layer bottleneck (``context_dim``) 1-layer transformer over frames
  (:class:`tvr.prompts.ContextPromptGenerator`) whose zero-initialised output is added to the
  static prompts; F's inter-frame layers use full joint attention over the clip's tokens with
  frozen weights (for a static clip this equals per-frame attention, since duplicated keys
  and values leave the softmax average unchanged). In ``full``, P and C act in the intra-frame
  layers, F's clip-level prompts in the inter-frame ones.
- P maps frame f of a T-frame clip to prompt set ⌊f·F/T⌋ (identity when T = F).

Training-recipe differences (``jobs/repro/vop_base.yaml / vop_fc.yaml``; the full list, shared by every recipe, is in
docs/reference-results.md "What still differs"): no official training code exists;
the optimiser, schedule, batch and epochs are X-Pool's (assumed, as the README says the code builds
on X-Pool) and the prompt learning rate is not confirmed from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvr.backbone import ClipBackbone
from tvr.losses import clip_logits, symmetric_ce
from tvr.methods.base import Features, MethodSpec, backbone_head_groups
from tvr.prompts import (
    ContextPromptGenerator,
    check_visual,
    project_text,
    prompted_frame_states,
    prompted_text_states,
    trainable_parameters,
)

VARIANTS = ("base", "P", "C", "F", "F+C", "full")


@dataclass(kw_only=True)
class VoPCfg:
    variant: str = "full"
    """Which video prompts: base | P (position) | C (context) | F (function) | F+C | full (P+C+F)."""
    prompt_length: int = 8
    """Video prompt tokens per prompted layer (n; official 8)."""
    text_prompt_length: int = 4
    """Text prompt tokens per prompted layer, inserted after SOT (n_t; official 4)."""
    prompt_depth: int | None = None
    """Layers (from the input) that get fresh prompts in each tower; None = every layer
    (official). 0 = no prompts at all."""
    num_frames: int = 8
    """Frames per clip F: number of position-specific prompt sets (P) and the temporal
    positions of the context generator (C). Clips with T != F frames map frame f to set ⌊f·F/T⌋."""
    intra_layers: int | None = None
    """K_s for VoP-F: the first K_s visual layers are intra-frame, the rest inter-frame;
    None = half of the visual layers. Must be within the visual layer count."""
    context_dim: int = 32
    """Bottleneck width r of the VoP-C prompt generators."""
    init_std: float = 0.02
    """Std of the normal init of the prompt tokens (official 0.02)."""
    train_logit_scale: bool = False
    """Also train CLIP's temperature (official VoP keeps it frozen with the backbone)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"model.vop.variant={self.variant!r} is not a VoP variant; "
                             f"choose one of {', '.join(VARIANTS)}")
        for name in ("prompt_length", "text_prompt_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.vop.{name} must be >= 0, got {getattr(self, name)}")
        if self.prompt_depth is not None and self.prompt_depth < 0:
            raise ValueError(f"model.vop.prompt_depth must be >= 0 or None, got {self.prompt_depth}")
        if self.intra_layers is not None and self.intra_layers < 0:
            raise ValueError(f"model.vop.intra_layers (K_s) must be >= 0 or None, got {self.intra_layers}")
        if self.num_frames < 1:
            raise ValueError(f"model.vop.num_frames must be >= 1, got {self.num_frames}")
        if self.context_dim < 1:
            raise ValueError(f"model.vop.context_dim must be >= 1, got {self.context_dim}")
        if self.init_std <= 0:
            raise ValueError(f"model.vop.init_std must be > 0, got {self.init_std}")

    @property
    def position(self) -> bool:
        return self.variant in ("P", "full")

    @property
    def context(self) -> bool:
        return self.variant in ("C", "F+C", "full")

    @property
    def function(self) -> bool:
        return self.variant in ("F", "F+C", "full")


def _depth(cfg_depth: int | None, layers: int, tower: str) -> int:
    depth = layers if cfg_depth is None else cfg_depth
    if depth > layers:
        raise ValueError(f"model.vop.prompt_depth={depth} exceeds the {tower} tower's {layers} layers; "
                         f"use at most {layers} (or None for all)")
    return depth


def _prompt(*shape: int, std: float) -> nn.Parameter | None:
    if 0 in shape:
        return None
    p = torch.empty(*shape)
    nn.init.normal_(p, std=std)
    return nn.Parameter(p)


class VoP(nn.Module):
    """VoP on a frozen :class:`ClipBackbone`; see the module docstring for the equations."""

    def __init__(self, cfg: VoPCfg, backbone: ClipBackbone):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        visual, text = backbone.clip.visual, backbone.text_tower
        check_visual(visual)
        n_vis = len(visual.transformer.resblocks)
        n_txt = len(text.transformer.resblocks)
        w_vis = int(visual.class_embedding.shape[-1])
        w_txt = int(text.token_embedding.weight.shape[-1])
        self.depth_text = _depth(cfg.prompt_depth, n_txt, "text")
        self.depth_visual = _depth(cfg.prompt_depth, n_vis, "visual")
        if cfg.function:
            k_s = n_vis // 2 if cfg.intra_layers is None else cfg.intra_layers
            if k_s > n_vis:
                raise ValueError(f"model.vop.intra_layers (K_s)={k_s} exceeds the visual tower's "
                                 f"{n_vis} layers; use 0..{n_vis}")
        else:
            k_s = n_vis                                                  # every layer intra-frame
        self.intra_layers = k_s
        frame_layers = min(self.depth_visual, k_s)                       # layers with per-frame prompts
        clip_layers = max(0, self.depth_visual - k_s)                    # layers with clip-level prompts
        sets = cfg.num_frames if cfg.position else 1
        n, std = cfg.prompt_length, cfg.init_std

        self.text_prompts = _prompt(self.depth_text, cfg.text_prompt_length, w_txt, std=std)  # (Lt, n_t, w_t)
        self.frame_prompts = _prompt(frame_layers, sets, n, w_vis, std=std)                    # (Lf, F|1, n, w)
        self.clip_prompts = _prompt(clip_layers, n, w_vis, std=std)                             # (Lc, n, w)
        self.context = nn.ModuleList(
            ContextPromptGenerator(width=w_vis, dim=cfg.context_dim, num_frames=cfg.num_frames)
            for _ in range(frame_layers if cfg.context and n > 0 else 0))

        backbone.requires_grad_(False)                                   # frozen CLIP
        if cfg.train_logit_scale:
            backbone.logit_scale.requires_grad_(True)

    # -- prompts ---------------------------------------------------------------------------------
    def frame_prompt_tokens(self, layer: int, B: int, T: int, states: Tensor | None = None) -> Tensor:
        """Per-frame prompts of an intra-frame layer -> (B, T, n, w).

        ``states`` (B*T, S, w) are the tokens entering the layer (needed by VoP-C only).
        """
        sets = self.frame_prompts.shape[1]
        p = self.frame_prompts[layer]                                    # (F|1, n, w)
        if sets > 1:
            pos = torch.arange(T, device=p.device) * sets // T           # (T,) relative position π(f)
            p = p[pos]                                                   # (T, n, w)
        p = p.unsqueeze(0).expand(B, T, -1, -1)                          # (B, T, n, w)
        if len(self.context):
            if states is None:
                raise ValueError("VoP-C prompts need the frame states entering the layer")
            w = states.shape[-1]
            summary = states[:, 1:].mean(dim=1) if layer == 0 else states[:, 0]  # (B*T, w)
            delta = self.context[layer](summary.reshape(B, T, w).to(p.dtype))     # (B, T, w)
            p = p + delta.unsqueeze(2)                                   # (B, T, n, w)
        return p

    def _frame_prompt_fn(self, layer: int, x: Tensor, B: int, T: int) -> Tensor:
        p = self.frame_prompt_tokens(layer, B, T, x)                     # (B, T, n, w)
        return p.flatten(0, 1)                                           # (B*T, n, w)

    def _clip_prompt_fn(self, layer: int, B: int) -> Tensor:
        p = self.clip_prompts[layer - self.intra_layers]                 # (n, w)
        return p.unsqueeze(0).expand(B, -1, -1)                          # (B, n, w)

    # -- encoders --------------------------------------------------------------------------------
    def encode_frames(self, frames: Tensor, hidden: list[Tensor] | None = None) -> Tensor:
        """frames (B, T, 3, H, W) -> prompted per-frame features (B, T, D)."""
        if frames.ndim != 5:
            raise ValueError(f"VoP.encode_frames expects (B, T, 3, H, W) frames, got {tuple(frames.shape)}")
        if len(self.context) and frames.shape[1] > self.cfg.num_frames:
            raise ValueError(f"model.vop.num_frames={self.cfg.num_frames} but clips have {frames.shape[1]} "
                             "frames; VoP-C needs num_frames >= frames per clip")
        return prompted_frame_states(
            self.backbone.clip.visual, frames, depth=self.depth_visual, intra_layers=self.intra_layers,
            frame_prompts=self._frame_prompt_fn if self.frame_prompts is not None else None,
            clip_prompts=self._clip_prompt_fn if self.clip_prompts is not None else None,
            hidden=hidden)

    def encode_text(self, text: Tensor) -> Features:
        tower = self.backbone.text_tower
        states, _, idx = prompted_text_states(tower, text, self.text_prompts)  # (B, S, w), -, (B,)
        eos = states[torch.arange(states.shape[0], device=states.device), idx]  # (B, w)
        return {"text": project_text(tower, eos)}                        # (B, D)

    def encode_video(self, frames: Tensor, captions: Tensor | None = None) -> Features:
        f = F.normalize(self.encode_frames(frames), dim=-1)              # (B, T, D)
        return {"video": f.mean(dim=1)}                                  # (B, D)

    # -- scores and objective --------------------------------------------------------------------
    def similarity(self, text: Features, video: Features) -> Tensor:
        t = F.normalize(text["text"], dim=-1)                            # (Nt, D)
        v = F.normalize(video["video"], dim=-1)                          # (Nv, D)
        return t @ v.t()                                                 # (Nt, Nv)

    def loss(self, text: Features, video: Features) -> dict[str, Tensor]:
        scale = self.backbone.logit_scale
        loss = symmetric_ce(clip_logits(self.similarity(text, video), scale))
        return {"loss": loss, "logit_scale": scale.detach().exp()}

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Only the trainable parameters (prompts, generators, optionally τ), all at ``lr``:
        the backbone is frozen, so ``backbone_lr`` has nothing to act on."""
        return backbone_head_groups(self, lr, lr, weight_decay)

    # -- tiny checkpoints ------------------------------------------------------------------------
    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; the paper's headline is the ratio (~0.1 %)."""
        return trainable_parameters(self)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the trained tensors (detached copies), keyed like ``state_dict``. Stored with the
        backbone reference (name + pretrained tag), this is a whole VoP checkpoint."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> None:
        """Load what :meth:`trainable_state_dict` produced into a model with the same config."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if strict and (missing or unexpected):
            raise KeyError(f"VoP trainable state does not match this model (same VoPCfg and backbone?): "
                           f"missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, value in state.items():
                if name not in params:
                    continue
                if params[name].shape != value.shape:
                    raise ValueError(f"VoP trainable state: {name} has shape {tuple(value.shape)}, "
                                     f"this model expects {tuple(params[name].shape)}")
                params[name].copy_(value)


SPEC = MethodSpec(name="vop", config_cls=VoPCfg, build=VoP,
                  summary="VoP text-video co-operative prompt tuning (frozen CLIP, base/P/C/F/full)")
