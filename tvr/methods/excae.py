"""ExCae ECS: expertized caption selection, Yang, Chen, Li, Yao, "Expertized Caption Auto-Enhancement
for Video-Text Retrieval", arXiv 2502.02885 (2025); official code github.com/CaryXiang/ECA4VTR
(mirrored as HyunjoonChun/ECA4VTR: ``code/moe_fusion.py`` ``ECSModule``, ``code/model.py``).

The caption half of ExCae (CSI, the prompt self-improvement loop that writes the K auxiliary
captions) is :mod:`tvr.captioning`; this module is the retrieval model that consumes them.

Symbols. For video j: F_j = [f_1 .. f_T] ∈ R^{T×D} CLIP CLS frame features, C_j = [c_1 .. c_K] ∈
R^{K×D} CLIP EOS features of its K auxiliary captions with validity mask μ_k ∈ {0, 1} (an all-zero
token row is padding, μ_k = 0). For text i: t_i ∈ R^D its CLIP EOS feature. M experts, top-k routing.

Experts (official ``Expert_General`` = ``nn.TransformerEncoder`` + final LayerNorm). Expert m reads
one "view" X^{(m)}_j of the video, in the official order of combinations (single embeddings first,
then the full concatenation), assigned round-robin m mod 3:

    view 0 (captions):  X = [c_1 .. c_K]          view 1 (frames): X = [f_1 .. f_T]
    view 2 (joint):     X = [c_1 .. c_K, f_1 .. f_T]
    e_m(j) = Enc_m([ε_m ; X^{(m)}_j])[0]   ∈ R^D  (ε_m a learned read-out token of expert m,
                                                   padding captions masked out of attention)

Router (official ``GatingNetwork``: Linear(·, 256) -> ReLU -> Linear(256, M)), here conditioned on
the query text as well, so every (text i, video j) pair is routed on its own (``router="pair"``):

    u_j   = [ Σ_k μ_k c_k / Σ_k μ_k ; (1/T) Σ_t f_t ]                 (2D)  video summary
    z_ij  = W₂ ReLU(W_t t_i + W_v u_j + b₁) + b₂                      (M)   router logits
    p_ij  = softmax(z_ij)                                                    full router probabilities
    𝒦_ij  = top-k(z_ij),  g_ijm = exp(z_ijm) / Σ_{n∈𝒦_ij} exp(z_ijn)  for m ∈ 𝒦_ij, else 0
    r_j   = ( Σ_k μ_k c_k + Σ_t f_t ) / ( Σ_k μ_k + T )               (D)   official residual
                                                                             ``concat.mean(dim=1)``
    v_{j|i} = Σ_m g_ijm e_m(j) + r_j
    s_ecs(i, j) = cos(t_i, v_{j|i})

``router="text"`` drops the W_v u_j term (routing by the query only), ``router="video"`` drops W_t t_i
(routing by the video only, as the official code does; it gates on the concatenated first caption /
first frame features, here on their masked means u_j).

Only the k active experts carry gradient for a pair: g_ijm = 0 exactly for m ∉ 𝒦_ij. The score is
evaluated without materialising v_{j|i} ∈ R^{N_t×N_v×D}: with t̂_i = t_i / ‖t_i‖, E_j = [e_1(j) ..
e_M(j)] ∈ R^{M×D}, Gram matrix Γ_j = E_j E_jᵀ,

    ⟨t̂_i, v_{j|i}⟩ = Σ_m g_ijm ⟨t̂_i, e_m(j)⟩ + ⟨t̂_i, r_j⟩
    ‖v_{j|i}‖²     = g_ijᵀ Γ_j g_ij + 2 Σ_m g_ijm ⟨e_m(j), r_j⟩ + ‖r_j‖²

so a chunk of c texts costs O(c · N_v · max(M, H)) memory (H = router width), not O(c · N_v · D).

Training on a batch of B matching pairs (every (i, j) pair is routed, since all of them enter the
contrastive loss), P = B² routed pairs:

    L_ecs = ½ [ CE(S/τ, diag) + CE(Sᵀ/τ, diag) ]                 CLIP's learnable τ
    f_m   = (1 / (P·k)) Σ_{(i,j)} 1[m ∈ 𝒦_ij]                      fraction of assignments (Σ f_m = 1)
    P̄_m  = (1 / P) Σ_{(i,j)} p_ijm                               mean router probability
    L_bal = M · Σ_m f_m · P̄_m                                     Switch Transformer (Fedus et al.
                                                                  2021, eq. 4) / GShard auxiliary
                                                                  loss, top-k form; = 1 when balanced
    L     = L_ecs + α · L_bal                                     α = ``balance_weight`` (default 0:
                                                                  off, the official objective;
                                                                  Switch used 0.01)

f_m is piecewise constant (no gradient); the gradient reaches the router through P̄_m. With
top_k = 0 no expert is assigned, f = 0 and L_bal = 0. The loss
dict also reports ``expert_util_max`` = max_m f_m and ``expert_frac_XX`` = f_m per expert.

Plug-in (``base`` = meanp | xpool | tmass | ucofia | vop), the paper's Table 3: ECS enriches the
video side of another method, built on the *same* backbone. Two named modes (``plugin``):

``plugin="representation"`` (default): the ECS output joins the base method's video
representation, and the base's own loss and similarity then run once, unchanged. With the
official video-only router (the evidence must exist before any query is seen; ``router="auto"``
resolves to ``video`` here), for video j with the base's own frame features F_j (VoP: its
*prompted* frames) and captions C_j encoded by the base's text path (VoP: its prompted text tower):

    g_j   = top-k / dense gates of z_j = W₂ ReLU(W_v u_j + b₁) + b₂      (M)
    x_j   = Σ_m g_jm e_m(j) + r_j                                        (D) the official ECSModule
                                                                              output + residual
    F̃_j   = [f_1 .. f_T ; x_j]                                           (T+1, D) one evidence token

F̃_j replaces F_j inside the base's ``encode_video`` (the backbone / VoP frame encoder is wrapped
for that one call, so the frames go through the backbone once):

    meanP      v_j = pool(F̃_j)                 the base's own mean, over T+1 tokens
    X-Pool     v_{j|i} = XPool(t_i, F̃_j)        the text attends over frames *and* the evidence
    T-MASS     the same pooling; its radius sees T+1 cosines (the base's ``num_frames`` is sized
               T+1 automatically: give ``base_options.num_frames`` = frames per clip); training
               uses T-MASS's training noise, evaluation its sampler (the base's own split)
    UCoFIA     frame-sentence over T+1 frames, video-sentence through the temporal encoder over
               T+1, patch-word with the evidence frame's patches all equal to x_j (so its K + 1
               selected tokens are x_j); per-granularity SK as the base (``granularity_similarities``
               / ``combine`` are the base's); needs ``base_options.max_frames`` >= T + 1
    VoP        v_j = mean of the normalised prompted frames and x_j; the backbone stays frozen,
               only VoP's prompts and ECS's experts / router train (``trainable_parameters``)

    L = L_base(features with F̃) + α · L_bal     L_bal over the B routed videos (P = B, k = top_k)

``plugin="score"``: score-level fusion. ECS keeps its own (text-routed) scores and the base its
own representation; training adds the two objectives, each run once, and only inference mixes:

    L = L_base + L_ecs + α · L_bal               S = (1 − w) · S_base + w · S_ecs  (w = ``plugin_weight``)

Base features live under "base.*" in both modes.

Token lengths: queries and auxiliary captions are cut to ``max_text_tokens`` = 70 CLIP positions
(SOT .. EOT included, the EOT moved into the last kept slot), the paper's text length (§4.1);
0 keeps the backbone's whole context.

Official hyper-parameters that the released code does not pin (its config file is not public)
and what is assumed here: 16 experts, top-2 (the paper's ablation setting), 1 encoder layer,
8 heads, feed-forward 4·D (PyTorch's default 2048 for D = 512), dropout 0.1 (PyTorch default).
``expert_width`` w < D (not in the official code) makes each expert a bottleneck D -> w -> D, so
that over a frozen backbone (VoP) ECS's heads stay small: ViT-B/32, VoP full + 16 experts train
25.4 % of all parameters at w = D (50.7 M in ECS), 1.95 % at w = 64 (2.1 M; measured, docs/excae.md).
``top_k = 0`` (no expert active, v = r_j: the first point of the paper's active-experts curve)
is allowed.

Deviations from the official code (documented choices, not accidents):
- standalone and in ``plugin="score"``, routing is conditioned on the query text (``router="auto"``
  = ``pair``) as the task requires; ``router="video"`` reproduces the official text-independent gating
  (and is what ``plugin="representation"`` uses);
- the official gate is sparse top-k in training and a dense softmax over all experts at inference;
  that is the default here (``dense_eval=True``); ``dense_eval=False`` keeps top-k at inference;
- each expert reads out a learned token ε_m instead of output position 0 (the first caption or
  first frame), so padded captions and videos without captions are handled; the router's video
  summary u_j uses masked means instead of the first caption / first frame for the same reason;
- views are assigned round-robin (m mod 3) instead of in blocks of ``num_experts_per_combination``,
  so any M ≥ 3 covers all three views;
- the Switch/GShard load-balancing loss (in neither paper nor official code) is available with
  ``balance_weight`` > 0; the default 0 is the official objective;
- ``caption_grad=False`` encodes captions without gradient through the text tower (memory saver).

Training-recipe differences (``jobs/repro/excae.yaml``; the full list, shared by every recipe, is in
docs/reference-results.md "What still differs"): the official release has no training code or
configuration: the recipe's training values are CLIP4Clip's (assumed) and its backbone (ViT-B/32)
is not confirmed; the recipe uses the official video-only router (``router: video``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvr.backbone import ClipBackbone
from tvr.losses import clip_logits, symmetric_ce
from tvr.methods.base import Features, MethodSpec, backbone_head_groups

VIEWS = ("captions", "frames", "joint")
"""Input view of expert m is VIEWS[m % 3] (official order: single embeddings, then all)."""

ROUTERS = ("auto", "pair", "text", "video")
PLUGINS = ("representation", "score")

PAPER_TEXT_TOKENS = 70
"""The paper's text length (§4.1): queries and captions are cut at 70 CLIP token positions."""


@dataclass(frozen=True)
class _Adapter:
    """How the evidence token enters one base method (``plugin="representation"``)."""

    frames_on: str
    """'backbone': wrap ``backbone.encode_frames`` (CLS + patches); 'base': wrap ``base.encode_frames``."""
    captions_on: str = "backbone"
    """'backbone': captions through the plain text tower; 'base': through ``base.encode_text`` ('text')."""
    grow_num_frames: bool = False
    """The base's ``num_frames`` counts the tokens its scoring sees: size it T + 1."""
    max_frames_key: str = ""
    """Base config field that must hold T + 1 frames (checked at encode time)."""


ADAPTERS: dict[str, _Adapter] = {
    "meanp": _Adapter("backbone"),
    "xpool": _Adapter("backbone"),
    "tmass": _Adapter("backbone", grow_num_frames=True),
    "ucofia": _Adapter("backbone", max_frames_key="max_frames"),
    "vop": _Adapter("base", captions_on="base"),
}
"""The bases ECS plugs into as a representation; any other method needs ``plugin="score"``."""

_BASE_HOOKS = ("granularity_similarities", "combine", "sinkhorn_temperature", "prepare_video")
"""Evaluation hooks of a base (UCoFIA's per-granularity SK, X-Pool / T-MASS prepared frames) that
ExCae exposes as its own in ``plugin="representation"``."""


@dataclass(kw_only=True)
class ExCaeCfg:
    """ExCae expertized caption selection (ECS), optionally plugged into another method."""

    num_experts: int = 16
    """M, the number of expert networks."""
    top_k: int = 2
    """Experts activated per routed item; 0 = none (v = residual, the first point of the paper's curve)."""
    router: str = "auto"
    """Router input: 'pair' (query text + video summary), 'text' (query only), 'video' (official);
    'auto' = 'video' for plugin='representation' with a base, else 'pair'."""
    router_hidden: int = 256
    """Hidden width of the router MLP (official GatingNetwork: 256)."""
    expert_layers: int = 1
    """Transformer encoder layers per expert."""
    expert_heads: int = 8
    """Attention heads per expert layer (must divide the expert width)."""
    expert_width: int = 0
    """Expert model width w; 0 = the embedding width D (official). w < D: bottleneck experts
    (D -> w -> D projections), e.g. 64 keeps ECS's heads small over a frozen VoP."""
    expert_ff_mult: int = 4
    """Expert feed-forward width = expert_ff_mult x expert width."""
    dropout: float = 0.1
    """Dropout inside the experts."""
    balance_weight: float = 0.0
    """α, weight of the Switch/GShard load-balancing loss (0 = off: neither paper nor official code has it)."""
    dense_eval: bool = True
    """Official inference: dense softmax over all experts in eval mode (False = top-k at evaluation too)."""
    caption_grad: bool = True
    """Back-propagate into the text tower through the caption embeddings (official: yes)."""
    max_text_tokens: int = PAPER_TEXT_TOKENS
    """CLIP token positions kept of every query and caption (paper: 70); 0 = the whole context."""
    base: str = "none"
    """Plug-in base method: 'none' (ECS alone), 'meanp', 'xpool', 'tmass', 'ucofia', 'vop'."""
    plugin: str = "representation"
    """'representation': the evidence joins the base's video representation (one base loss/score);
    'score': score-level fusion S = (1 - w) S_base + w S_ecs."""
    base_options: dict[str, Any] = field(default_factory=dict)
    """Keyword overrides for the base method's own config class (e.g. {'num_heads': 2})."""
    plugin_weight: float = 0.5
    """w in S = (1 - w) S_base + w S_ecs (plugin='score' only)."""
    sim_chunk: int = 32
    """Texts scored at once in ``similarity``; memory ~ sim_chunk x N_v x max(M, router_hidden)."""

    def __post_init__(self) -> None:
        for name in ("num_experts", "router_hidden", "expert_layers", "expert_heads",
                     "expert_ff_mult", "sim_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.excae.{name} must be a positive integer, got {value!r}")
        for name in ("top_k", "max_text_tokens", "expert_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"model.excae.{name} must be an integer >= 0, got {value!r}")
        if self.max_text_tokens == 1:
            raise ValueError("model.excae.max_text_tokens must be 0 (no cut) or >= 2 (SOT + EOT)")
        if self.top_k > self.num_experts:
            raise ValueError(f"model.excae.top_k={self.top_k} exceeds model.excae.num_experts="
                             f"{self.num_experts}; choose top_k <= num_experts")
        if self.router not in ROUTERS:
            raise ValueError(f"model.excae.router must be one of {ROUTERS}, got {self.router!r}")
        if self.plugin not in PLUGINS:
            raise ValueError(f"model.excae.plugin must be one of {PLUGINS}, got {self.plugin!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.excae.dropout must be in [0, 1), got {self.dropout!r}")
        if self.balance_weight < 0:
            raise ValueError(f"model.excae.balance_weight must be >= 0, got {self.balance_weight!r}")
        if not 0.0 < self.plugin_weight <= 1.0:
            raise ValueError(f"model.excae.plugin_weight must be in (0, 1], got {self.plugin_weight!r}")
        if self.base == "excae":
            raise ValueError("model.excae.base cannot be 'excae'; choose none or one of "
                             f"{', '.join(ADAPTERS)}")
        if self.representation:
            if self.base not in ADAPTERS:
                raise ValueError(f"model.excae.base={self.base!r} has no representation plug-in; choose one of "
                                 f"{', '.join(ADAPTERS)} or set model.excae.plugin=score")
            if self.router not in ("auto", "video"):
                raise ValueError(f"model.excae.router={self.router!r}: plugin=representation routes by the "
                                 "video only (the evidence exists before any query); use router=video or "
                                 "auto, or plugin=score for text-conditioned routing")

    @property
    def representation(self) -> bool:
        """ECS evidence inside the base's video representation."""
        return self.base != "none" and self.plugin == "representation"

    @property
    def router_mode(self) -> str:
        if self.router != "auto":
            return self.router
        return "video" if self.representation else "pair"


def cut_tokens(ids: Tensor, n: int) -> Tensor:
    """Keep the first n positions of CLIP token ids (N, L) (argmax = EOT pooling), the EOT moved
    into position n - 1 of a row that was longer; positions >= n become padding. Shape unchanged,
    so the towers' fixed positional embeddings still fit. n = 0 or n >= L: unchanged."""
    if n == 0 or n >= ids.shape[-1]:
        return ids
    eot = ids.argmax(dim=-1)                                             # (N,) EOT position
    out = ids.clone()
    long_rows = (eot >= n).nonzero().flatten()
    out[long_rows, n - 1] = ids[long_rows, eot[long_rows]]
    out[:, n:] = 0
    return out


class Expert(nn.Module):
    """One expert: [ε ; X] -> TransformerEncoder (+ final LayerNorm) -> output at ε. With a width
    w < D the tokens are projected D -> w before and w -> D after (a bottleneck expert)."""

    def __init__(self, *, dim: int, heads: int, layers: int, ff: int, dropout: float, width: int = 0):
        super().__init__()
        w = width or dim
        self.down = nn.Linear(dim, w) if w != dim else None
        self.up = nn.Linear(w, dim) if w != dim else None
        self.readout_embedding = nn.Parameter(torch.randn(w) * 0.02)
        layer = nn.TransformerEncoderLayer(w, heads, ff, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(w), enable_nested_tensor=False)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (B, S, D) tokens, valid (B, S) bool -> (B, D)."""
        B = x.shape[0]
        if self.down is not None:
            x = self.down(x)                                             # (B, S, w)
        tok = self.readout_embedding.to(x.dtype).expand(B, 1, -1)         # (B, 1, w)
        seq = torch.cat([tok, x], dim=1)                                 # (B, 1+S, w)
        keep = torch.cat([valid.new_ones(B, 1), valid], dim=1)           # (B, 1+S)
        out = self.encoder(seq, src_key_padding_mask=~keep)[:, 0]        # (B, w)
        return out if self.up is None else self.up(out)                  # (B, D)


class Router(nn.Module):
    """z_ij = W₂ ReLU(W_t t_i + W_v u_j + b₁) + b₂ for a block of texts x videos."""

    def __init__(self, *, dim: int, hidden: int, num_experts: int, mode: str):
        super().__init__()
        self.mode = mode
        self.text_in = nn.Linear(dim, hidden, bias=False) if mode in ("pair", "text") else None
        self.video_in = nn.Linear(2 * dim, hidden, bias=False) if mode in ("pair", "video") else None
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.out = nn.Linear(hidden, num_experts)

    def forward(self, text: Tensor, route: Tensor) -> Tensor:
        """text (N_t, D), route (N_v, 2D) -> logits (N_t, N_v, M)."""
        Nt, Nv = text.shape[0], route.shape[0]
        h = self.bias.to(text.dtype).expand(Nt, Nv, -1)                  # (Nt, Nv, H)
        if self.text_in is not None:
            h = h + self.text_in(text)[:, None, :]                       # (Nt, 1, H)
        if self.video_in is not None:
            h = h + self.video_in(route)[None, :, :]                     # (1, Nv, H)
        return self.out(F.relu(h))                                       # (Nt, Nv, M)


def top_k_gates(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """logits (..., M) -> sparse gates (..., M) (softmax over the top k, zero elsewhere), indices (..., k).
    k = 0: all gates zero, no index."""
    if k == 0:
        return torch.zeros_like(logits), torch.zeros(*logits.shape[:-1], 0, dtype=torch.long, device=logits.device)
    vals, idx = logits.topk(k, dim=-1)                                   # (..., k)
    gates = torch.zeros_like(logits).scatter(-1, idx, vals.softmax(dim=-1))
    return gates, idx


def load_balance_loss(probs_sum: Tensor, counts: Tensor, num_pairs: int, k: int) -> tuple[Tensor, Tensor]:
    """Switch/GShard L_bal = M Σ_m f_m P̄_m from Σ_pairs p (M,) and assignment counts (M,).

    Returns (L_bal, f) with f_m = counts_m / (num_pairs · k); k = 0 gives (0, 0)."""
    M = probs_sum.shape[0]
    if k == 0 or num_pairs == 0:
        return probs_sum.sum() * 0.0, probs_sum.new_zeros(M).detach()
    frac = counts.to(probs_sum.dtype) / (num_pairs * k)                  # (M,) f_m, sums to 1
    mean_prob = probs_sum / num_pairs                                    # (M,) P̄_m
    return M * (frac * mean_prob).sum(), frac


@contextlib.contextmanager
def _shadow(obj: nn.Module, name: str, fn: Callable[..., Any]) -> Iterator[None]:
    """Within the block, ``obj.<name>`` is ``fn`` (an instance attribute shadowing the method)."""
    object.__setattr__(obj, name, fn)
    try:
        yield
    finally:
        object.__delattr__(obj, name)


@contextlib.contextmanager
def shared_backbone_calls(backbone: ClipBackbone) -> Iterator[None]:
    """Within the block, repeated ``encode_frames`` / ``encode_text`` calls on the *same* input
    tensor (the base method's and ECS's) run the backbone once; a cached patches=True / tokens=True
    result also serves a later request without them. Instance attributes shadow the methods and
    are removed on exit, so nothing leaks outside one encode call."""
    cache: dict[tuple[str, int], tuple[Tensor, tuple]] = {}
    frames_fn, text_fn = backbone.encode_frames, backbone.encode_text

    def encode_frames(frames: Tensor, patches: bool = False):
        hit = cache.get(("frames", id(frames)))
        if hit is not None and hit[0] is frames and (not patches or hit[1][1] is not None):
            return hit[1]
        out = frames_fn(frames, patches=patches)
        cache[("frames", id(frames))] = (frames, out)
        return out

    def encode_text(text: Tensor, tokens: bool = False):
        hit = cache.get(("text", id(text)))
        if hit is not None and hit[0] is text and (not tokens or hit[1][1] is not None):
            return hit[1]
        out = text_fn(text, tokens=tokens)
        cache[("text", id(text))] = (text, out)
        return out

    with _shadow(backbone, "encode_frames", encode_frames), _shadow(backbone, "encode_text", encode_text):
        yield


class ExCae(nn.Module):
    def __init__(self, cfg: ExCaeCfg, backbone: ClipBackbone):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone                     # registered first: shared params are named backbone.*
        D = backbone.embed_dim
        W = cfg.expert_width or D
        if W % cfg.expert_heads:
            raise ValueError(f"model.excae.expert_heads={cfg.expert_heads} must divide the expert width {W} "
                             f"(model.excae.expert_width, 0 = the embedding width of "
                             f"model.backbone.name={backbone.cfg.name!r})")
        self.experts = nn.ModuleList(
            Expert(dim=D, heads=cfg.expert_heads, layers=cfg.expert_layers, ff=cfg.expert_ff_mult * W,
                   dropout=cfg.dropout, width=W) for _ in range(cfg.num_experts))
        self.views = [VIEWS[m % len(VIEWS)] for m in range(cfg.num_experts)]
        self.router = Router(dim=D, hidden=cfg.router_hidden, num_experts=cfg.num_experts, mode=cfg.router_mode)
        self.adapter = ADAPTERS.get(cfg.base) if cfg.representation else None
        self.base: nn.Module | None = None
        if cfg.base != "none":
            from tvr.methods import get_spec  # lazy: tvr.methods imports this module

            spec = get_spec(cfg.base)
            try:
                base_cfg = spec.config_cls(**dict(cfg.base_options))
            except TypeError as err:
                raise ValueError(f"model.excae.base_options: {err}; valid keys are the fields of "
                                 f"{spec.config_cls.__name__}") from None
            if self.adapter is not None and self.adapter.grow_num_frames:
                base_cfg = dataclasses.replace(base_cfg, num_frames=base_cfg.num_frames + 1)
            self.base = spec.build(base_cfg, backbone)

    def __getattr__(self, name: str) -> Any:
        # UCoFIA's per-granularity SK hooks, exposed when ECS sits inside UCoFIA's representation
        if name in _BASE_HOOKS:
            base = self._modules.get("base")
            if base is not None and self.__dict__["cfg"].representation and hasattr(base, name):
                fn = getattr(base, name)
                if name == "granularity_similarities":
                    return lambda text, video: fn(self._sub(text), self._sub(video))
                if name == "prepare_video":
                    return lambda video: {**video, **{f"base.{k}": v for k, v in fn(self._sub(video)).items()}}
                return fn
            raise AttributeError(f"ExCae(base={self.__dict__['cfg'].base!r}) has no {name!r}")
        return super().__getattr__(name)

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts (over VoP: prompts + ECS heads vs everything)."""
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return n_train, sum(p.numel() for p in self.parameters())

    def _cut(self, ids: Tensor) -> Tensor:
        return cut_tokens(ids, self.cfg.max_text_tokens)

    # -- encoders ---------------------------------------------------------------------------------
    def encode_text(self, text: Tensor) -> Features:
        text = self._cut(text)
        if self.cfg.representation:
            return {f"base.{k}": v for k, v in self.base.encode_text(text).items()}
        with shared_backbone_calls(self.backbone):
            out = {f"base.{k}": v for k, v in self.base.encode_text(text).items()} if self.base else {}
            eos, _, _ = self.backbone.encode_text(text)                  # (B, D)
        out["text"] = eos
        return out

    def encode_captions(self, captions: Tensor | None, B: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """captions (B, K, L) ids (all-zero rows = padding) -> embeddings (B, K, D), valid (B, K)."""
        D = self.backbone.embed_dim
        if captions is None:
            return like.new_zeros(B, 0, D), torch.zeros(B, 0, dtype=torch.bool, device=like.device)
        if captions.ndim != 3 or captions.shape[0] != B:
            raise ValueError(f"ExCae.encode_video: captions must be (B={B}, K, L) token ids, "
                             f"got {tuple(captions.shape)}")
        K, L = captions.shape[1:]
        flat = captions.reshape(B * K, L)                                # (B*K, L)
        valid = (flat != 0).any(dim=-1)                                  # (B*K,)
        emb = like.new_zeros(B * K, D)                                   # (B*K, D)
        if bool(valid.any()):
            ids = self._cut(flat[valid])                                 # (n_valid, L)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.caption_grad):
                if self.adapter is not None and self.adapter.captions_on == "base":
                    eos = self.base.encode_text(ids)["text"]             # (n_valid, D) the base's text path
                else:
                    eos, _, _ = self.backbone.encode_text(ids)           # (n_valid, D)
            emb = emb.index_put((valid.nonzero().squeeze(1),), eos.to(emb.dtype))
        return emb.view(B, K, D), valid.view(B, K)                       # (B, K, D), (B, K)

    def experts_of(self, f: Tensor, c: Tensor, mu: Tensor) -> dict[str, Tensor]:
        """Frames f (B, T, D), captions c (B, K, D) with mask mu (B, K) -> experts (B, M, D),
        residual r (B, D), route u (B, 2D)."""
        B, T = f.shape[:2]
        mu_f = mu.to(f.dtype)                                            # (B, K)
        n_cap = mu_f.sum(dim=1, keepdim=True)                            # (B, 1)
        cap_sum = (c * mu_f[..., None]).sum(dim=1)                       # (B, D)
        residual = (cap_sum + f.sum(dim=1)) / (n_cap + T)                # (B, D) r_j
        route = torch.cat([cap_sum / n_cap.clamp(min=1), f.mean(dim=1)], dim=-1)  # (B, 2D) u_j
        joint = torch.cat([c, f], dim=1)                                 # (B, K+T, D)
        joint_valid = torch.cat([mu, mu.new_ones(B, T)], dim=1)          # (B, K+T)
        inputs = {"captions": (c, mu), "frames": (f, mu.new_ones(B, T)), "joint": (joint, joint_valid)}
        experts = torch.stack([expert(*inputs[view]) for expert, view in zip(self.experts, self.views)],
                              dim=1)                                     # (B, M, D) e_m(j)
        return {"experts": experts, "residual": residual, "route": route}

    def evidence(self, f: Tensor, captions: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The video-routed ECS output x_j = Σ_m g_jm e_m(j) + r_j of the base's frames f (B, T, D)
        -> x (B, D), router probabilities (B, M), gates (B, M)."""
        B, D = f.shape[0], f.shape[-1]
        c, mu = self.encode_captions(captions, B, f)                     # (B, K, D), (B, K)
        ecs = self.experts_of(f, c, mu)
        logits = self.router(f.new_zeros(1, D), ecs["route"])[0]         # (B, M) video-only router
        g, _ = self.gates(logits)                                        # (B, M)
        x = torch.einsum("bm,bmd->bd", g, ecs["experts"]) + ecs["residual"]  # (B, D)
        return x, logits.softmax(dim=-1), g

    def _encode_video_representation(self, frames: Tensor, captions: Tensor | None) -> Features:
        B, T = frames.shape[:2]
        ad, base = self.adapter, self.base
        if ad.max_frames_key:
            cap = getattr(base.cfg, ad.max_frames_key)
            if T + 1 > cap:
                raise ValueError(f"ExCae over {self.cfg.base} appends one evidence token: clips of {T} frames "
                                 f"need model.excae.base_options.{ad.max_frames_key} >= {T + 1} (now {cap})")
        routed: dict[str, Tensor] = {}

        def with_evidence(f: Tensor) -> Tensor:
            x, probs, gates = self.evidence(f, captions)                 # (B, D), (B, M), (B, M)
            routed.update(probs=probs, gates=gates)
            return torch.cat([f, x[:, None].to(f.dtype)], dim=1)         # (B, T+1, D) F̃

        if ad.frames_on == "base":                                       # VoP: the prompted frames
            real_frames = base.encode_frames

            def base_frames(frames_: Tensor, *args: Any, **kwargs: Any) -> Tensor:
                return with_evidence(real_frames(frames_, *args, **kwargs))

            with _shadow(base, "encode_frames", base_frames):
                out = base.encode_video(frames, None)
        else:
            real = self.backbone.encode_frames

            def backbone_frames(frames_: Tensor, patches: bool = False) -> tuple[Tensor, Tensor | None]:
                cls, tokens = real(frames_, patches=patches)             # (B, T, D), (B, T, P, D) | None
                cls2 = with_evidence(cls)                                # (B, T+1, D)
                if tokens is not None:                                   # the evidence "frame": P copies of x
                    x = cls2[:, -1:, None, :].expand(-1, -1, tokens.shape[2], -1)  # (B, 1, P, D)
                    tokens = torch.cat([tokens, x.to(tokens.dtype)], dim=1)        # (B, T+1, P, D)
                return cls2, tokens

            with _shadow(self.backbone, "encode_frames", backbone_frames):
                out = base.encode_video(frames, None)
        if not routed:
            raise RuntimeError(f"ExCae over {self.cfg.base}: the base's encode_video did not read its frames "
                               "through the expected encoder; the evidence was never added")
        feats = {f"base.{k}": v for k, v in out.items()}
        feats.update({"ecs.probs": routed["probs"], "ecs.gates": routed["gates"]})
        return feats

    def encode_video(self, frames: Tensor, captions: Tensor | None = None) -> Features:
        if self.cfg.representation:
            return self._encode_video_representation(frames, captions)
        B = frames.shape[0]
        with shared_backbone_calls(self.backbone):
            out = ({f"base.{k}": v for k, v in self.base.encode_video(frames, captions).items()}
                   if self.base else {})
            f, _ = self.backbone.encode_frames(frames)                   # (B, T, D)
        c, mu = self.encode_captions(captions, B, f)                     # (B, K, D), (B, K)
        out.update(self.experts_of(f, c, mu))
        return out

    # -- scoring ----------------------------------------------------------------------------------
    def _check(self, text: Features, video: Features) -> None:
        if self.cfg.representation:
            if not any(k.startswith("base.") for k in video) or "ecs.gates" not in video:
                raise KeyError(f"ExCae(base={self.cfg.base!r}, plugin=representation): video features need "
                               f"'base.*' and 'ecs.gates' from ExCae.encode_video, got {sorted(video)}")
            return
        for key, feats, where in (("text", text, "encode_text"), ("experts", video, "encode_video"),
                                  ("residual", video, "encode_video"), ("route", video, "encode_video")):
            if key not in feats:
                raise KeyError(f"ExCae: features need {key!r} from ExCae.{where}, got {sorted(feats)}")
        if self.base is not None and not any(k.startswith("base.") for k in video):
            raise KeyError(f"ExCae(base={self.cfg.base!r}): video features lack the base method's "
                           f"'base.*' entries; encode them with this ExCae model")

    def gates(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Router logits (..., M) -> gates (..., M) and top-k indices (..., k): top-k in training,
        the dense softmax at evaluation when ``dense_eval`` (official); all zero when top_k = 0."""
        gates, idx = top_k_gates(logits, self.cfg.top_k)
        if not self.training and self.cfg.dense_eval and self.cfg.top_k > 0:
            gates = logits.softmax(dim=-1)
        return gates, idx

    def _ecs_chunk(self, t: Tensor, video: Features) -> tuple[Tensor, Tensor, Tensor]:
        """Texts t (c, D) x all videos -> s_ecs (c, N_v), router probs (c, N_v, M), top-k idx (c, N_v, k)."""
        E, r = video["experts"], video["residual"]                       # (Nv, M, D), (Nv, D)
        logits = self.router(t, video["route"])                          # (c, Nv, M)
        g, idx = self.gates(logits)                                      # (c, Nv, M), (c, Nv, k)
        th = F.normalize(t, dim=-1)                                      # (c, D) t̂_i
        te = torch.einsum("id,jmd->ijm", th, E)                          # (c, Nv, M) ⟨t̂_i, e_m(j)⟩
        num = (g * te).sum(-1) + th @ r.t()                              # (c, Nv)
        gram = torch.einsum("jmd,jnd->jmn", E, E)                        # (Nv, M, M) Γ_j
        er = torch.einsum("jmd,jd->jm", E, r)                            # (Nv, M) ⟨e_m(j), r_j⟩
        quad = (torch.einsum("ijm,jmn->ijn", g, gram) * g).sum(-1)       # (c, Nv) gᵀ Γ g
        sq = quad + 2 * (g * er[None]).sum(-1) + (r * r).sum(-1)[None]   # (c, Nv) ‖v_{j|i}‖²
        return num * sq.clamp(min=1e-12).rsqrt(), logits.softmax(dim=-1), idx

    def ecs_similarity(self, text: Features, video: Features) -> Tensor:
        """s_ecs (N_t, N_v), chunked over texts (standalone / plugin='score')."""
        t = text["text"]
        out = [self._ecs_chunk(tc, video)[0] for tc in t.split(self.cfg.sim_chunk)]
        return torch.cat(out) if out else t.new_zeros(0, video["experts"].shape[0])

    @staticmethod
    def _sub(feats: Features) -> Features:
        return {k[5:]: v for k, v in feats.items() if k.startswith("base.")}

    def similarity(self, text: Features, video: Features) -> Tensor:
        self._check(text, video)
        if self.cfg.representation:
            return self.base.similarity(self._sub(text), self._sub(video))
        s = self.ecs_similarity(text, video)                             # (Nt, Nv)
        if self.base is None:
            return s
        w = self.cfg.plugin_weight
        return (1 - w) * self.base.similarity(self._sub(text), self._sub(video)) + w * s

    def _routing_stats(self, out: dict[str, Tensor], probs_sum: Tensor, counts: Tensor, num: int) -> Tensor:
        bal, frac = load_balance_loss(probs_sum, counts, num, self.cfg.top_k)
        frac = frac.detach()
        out.update(loss_balance=bal.detach(), expert_util_max=frac.max())
        out.update({f"expert_frac_{m:02d}": frac[m] for m in range(self.cfg.num_experts)})
        return bal

    def loss(self, text: Features, video: Features) -> dict[str, Tensor]:
        self._check(text, video)
        M = self.cfg.num_experts
        out: dict[str, Tensor] = {}
        if self.cfg.representation:
            base_out = self.base.loss(self._sub(text), self._sub(video))
            g, p = video["ecs.gates"], video["ecs.probs"]                # (B, M), (B, M)
            bal = self._routing_stats(out, p.sum(dim=0), (g > 0).sum(dim=0), g.shape[0])
            out.update({f"base_{n}": v.detach() for n, v in base_out.items() if n != "loss"})
            out["loss_base"] = base_out["loss"].detach()
            out["loss"] = base_out["loss"] + self.cfg.balance_weight * bal
            return out
        t = text["text"]                                                 # (B, D)
        rows, probs_sum = [], t.new_zeros(M)
        counts = torch.zeros(M, dtype=torch.long, device=t.device)
        for tc in t.split(self.cfg.sim_chunk):
            s, p, idx = self._ecs_chunk(tc, video)                       # (c, B), (c, B, M), (c, B, k)
            rows.append(s)
            probs_sum = probs_sum + p.sum(dim=(0, 1))                    # (M,)
            counts += torch.bincount(idx.reshape(-1), minlength=M)       # (M,)
        s_ecs = torch.cat(rows)                                          # (B, B)
        bal = self._routing_stats(out, probs_sum, counts, s_ecs.numel())
        total = symmetric_ce(clip_logits(s_ecs, self.backbone.logit_scale))
        out["loss_ecs"] = total.detach()
        if self.base is not None:                                        # plugin='score': each objective once
            base_out = self.base.loss(self._sub(text), self._sub(video))
            total = total + base_out["loss"]
            out.update({f"base_{n}": v.detach() for n, v in base_out.items()})
        out["loss"] = total + self.cfg.balance_weight * bal
        return out

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        if self.base is not None and not any(p.requires_grad for p in self.backbone.parameters()):
            backbone_lr = lr                  # a frozen-backbone base (VoP): everything that trains is a head
        return backbone_head_groups(self, lr, backbone_lr, weight_decay)


def build(cfg: ExCaeCfg, backbone: ClipBackbone) -> ExCae:
    return ExCae(cfg, backbone)


SPEC = MethodSpec(name="excae", config_cls=ExCaeCfg, build=build,
                  summary="ExCae expertized caption selection: experts over frames + auxiliary captions, "
                          "alone or inside another method's video representation (Yang et al. 2025)")
