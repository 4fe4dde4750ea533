"""UCoFIA: Unified Coarse-to-Fine Alignment (Wang et al., ICCV 2023; github.com/Ziyang412/UCoFiA).

Notation: D embedding dim, T frames, P patches per frame, K kept patches per frame, L word positions.
Hats are L2-normalised vectors; A, B, C, E ∈ R^{D×D} and all W ∈ R^{n×n} are learned matrices
initialised to the identity (the official ``*_mat_weight`` parameters).

Features (all from the shared CLIP backbone)
    s ∈ R^D           sentence feature (EOS token)
    w_l ∈ R^D         word tokens, mask m_l ∈ {0,1} (1 from SOT to EOS, 0 at padding)
    f_t ∈ R^D         per-frame CLS features, t = 1..T
    p_{t,j} ∈ R^D     patch tokens of frame t, j = 1..P
    g = TemporalEncoder(f)                             CLIP4Clip seqTransf, (B, T, D)
    v = norm((1/T) Σ_t norm(g_t))                      video feature

Three alignments (text i, video j)
    video-sentence    S_vs = (ŝ A) · (v̂ B)
    frame-sentence    c_t = ŝ · f̂_t  (T,)           S_fs = ISA(c; W_f)
    patch-word        M_{n,l} = (ŵ_l C) · (û_n E)  (N, L), over the N = T·K' selected tokens u_n
                      S_pw = Bi-ISA(M)

Patch selection (TS2-Net style, official ``VisualTokenSelection``)
    φ(x) = GELU(W_in LN(x))                                          (D -> D/2)
    σ_{t,j} = tanh(w₂ᵀ GELU(W₁ [φ(p_{t,j}); φ(f_t); φ(f̄)]))         f̄ = (1/T) Σ_t f_t
    keep the K highest σ per frame (indices in ascending order) and prepend the frame's CLS f_t
    (official), so each frame contributes K' = K + 1 tokens u. In training the hard top-K is
    replaced by the perturbed-optimiser top-K of Berthet et al. 2020 (official ``PerturbedTopK``):
        Y = E_Z[onehot(topK(σ + εZ))],  Z ~ N(0, I),  u_{t,k} = Σ_j Y_{k,j} p_{t,j}
    with two backward estimators (``topk_backward``, n_s Monte-Carlo samples, G = ∂L/∂Y (K, P)):
        "official" (default, the official ``PerturbedTopKFuntion.backward``): only the diagonal of
                   the Jacobian, ∂Y_{k,j}/∂σ_j:   ∂L/∂σ_j ≈ Σ_k G_{k,j} E_Z[onehot_{k,j} Z_j] / ε
        "full"     (Berthet et al.'s estimator):  ∂L/∂σ_j ≈ E_Z[⟨G, onehot(topK(σ + εZ))⟩ Z_j] / ε

Interactive Similarity Aggregation of a similarity vector x ∈ R^n (mask μ ∈ {0,1}^n optional)
    a = softmax_μ(x / τ)           softmax over the unmasked entries (masked entries: weight 0)
    b = softmax_μ((a W) / τ)       W ∈ R^{n×n} mixes the attention across the entries
    ISA(x; W) = Σ_i b_i x_i

Bi-ISA of the patch-word matrix M ∈ R^{N×L} (rows: patches, columns: words)
    r_n = ISA(M_{n,:}; W₁, μ=m)       along each row (over words)      -> r ∈ R^N
    q_l = ISA(M_{:,l}; W₂)            along each column (over patches) -> q ∈ R^L
    Bi-ISA(M) = ½ [ ISA(r; W₃) + ISA(q; W₄, μ=m) ]                  (then across)

Unification over the granularities G ⊆ {vs, fs, pw} (``granularities``; the paper's all three)
    training:   logits = e^θ · (1/|G|) Σ_g S_g   -> symmetric InfoNCE (official: no SK)
    inference:  S = (1/|G|) Σ_g SK_τ(S_g),  τ = e^{-θ}  (θ = CLIP logit_scale, e^θ clamped at 100)
    with SK_τ the Sinkhorn-Knopp normalisation of :mod:`tvr.sinkhorn` (``sinkhorn_iters``, 0 = off).
    The platform applies exactly this SK at every evaluation (training-time, Tune, ``tvr eval``,
    ``tvr bench``), driven by ``model.ucofia.sinkhorn_iters``; ``eval.sinkhorn_iters`` (the generic
    SK of other methods) is refused for UCoFIA.

Ablations of the paper (config values)
    ``granularities``     drop any of video_sentence / frame_sentence / patch_word
    ``aggregation``       "isa" (the paper) | "mean" (plain mean of x, masked) | "softmax"
                          (Σ softmax_μ(x/τ)_i x_i: attention without the interactive W mixing)
    ``bi_isa_order``      "both" (the paper: ½[ISA(r) + ISA(q)]) | "row" (words first, ISA(r; W₃))
                          | "column" (patches first, ISA(q; W₄))

How evaluation applies SK: ``similarity(text, video)`` is the plain combination *without* SK, so it
works on any block. SK needs the full matrices, so a full evaluation asks for the per-granularity
matrices block by block with :meth:`UCoFIA.granularity_similarities`, concatenates them into
three (N_t, N_v) matrices, and calls :meth:`UCoFIA.combine` on them, which normalises each one
(``sinkhorn_iters``) and averages. ``combine(..., bank=...)`` takes the official bank form.

Memory: the patch-word part touches every (text, video, token, word) quadruple. It is computed in
tiles of ``chunk_size`` texts x ``chunk_size`` videos, so at inference at most a few
(chunk, chunk, N, L') tensors are alive at once, never (N_t, N_v, N, L). In training autograd keeps
every tile's activations unless ``checkpoint_tiles`` recomputes them in backward. Word positions are
trimmed to the longest caption of the block (exact: masked words get zero attention and the mixing
rows of padded positions are never used).

Official defaults (scripts/train_msrvtt.sh, modeling_ucofia.py, differential_topk.py):
ViT-B/32, 12 frames, 32 words, top-K = 3 patches + CLS per frame (``num_pixel = 4``),
ISA τ = 0.01, perturbed top-K with 500 samples and σ = 0.05, seqTransf with 4 layers,
SK 4 iterations at evaluation only, lr 1e-4 (head) and 1e-7 (CLIP, coef_lr 1e-3), batch 128,
15 epochs, weight decay 0.2.

Deviations from the official code (all deliberate):
1. Selected patch tokens are L2-normalised and the patch-word score is scaled by e^θ like the other
   two (official: raw projected tokens and no logit scale on S_pw), so the three granularities
   share one unit and one SK temperature.
2. Word padding is masked in Bi-ISA (official attends over all ``max_words`` positions).
3. Evaluation uses the hard top-K (the noise-free limit of the perturbed top-K); the official code
   runs the random perturbed top-K at evaluation too, which is not deterministic.
4. The patch scorer sees the frame CLS *and* the video mean f̄ (``selector_video_context``; set it
   False for the official ``PredictorLG``, which sees the frame CLS only).
5. ``E`` (``local_mat_weight1``) is applied at evaluation as in training (the official eval script
   drops it).
6. SK at evaluation is transductive by default (the evaluated matrix is its own bank) and returns
   the doubly-balanced plan; the official code (``eval_t2v/main_ucofia.py``, ``eval_epoch``) uses
   the training captions x test videos as the bank: ``eval.sinkhorn_bank=train`` in ``tvr eval``
   (reports name the form). Text -> video rankings are identical to the official form for the same
   bank (see :mod:`tvr.sinkhorn`).
7. The temporal encoder is :class:`tvr.temporal.TemporalEncoder` (pre-norm, zero-init output, so
   v = mean of frames at step 0); ``temporal_layers = 0`` gives the official ``meanP`` header.
8. No video padding mask: every clip has T real frames (the platform samples fixed T).

Training-recipe differences (``jobs/repro/ucofia.yaml``; the list shared by every recipe is in
docs/reference-results.md "What still differs"): one caption per clip per epoch (300 tvr epochs
for the official 15 over all pairs); torch AdamW instead of BertAdam (b2 0.98, eps 1e-6, no bias
correction) with a cosine decay after the warm-up instead of ``warmup_cosine``; 77 caption tokens
(official ``max_words 32``); bf16 autocast (official fp16 CLIP weights); the last epoch is reported
(official: best checkpoint on the test split, then the SK evaluation script).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tvr.backbone import ClipBackbone
from tvr.losses import clip_logits, symmetric_ce
from tvr.methods.base import Features, MethodSpec, backbone_head_groups
from tvr.sinkhorn import sinkhorn_normalise
from tvr.temporal import TemporalEncoder

GRANULARITIES = ("video_sentence", "frame_sentence", "patch_word")
TOPK_BACKWARDS = ("official", "full")
AGGREGATIONS = ("isa", "mean", "softmax")
BI_ISA_ORDERS = ("both", "row", "column")


@dataclass(kw_only=True)
class UCoFIACfg:
    topk: int = 3
    """Patches kept per frame by the selector (official VisualTokenSelection(topk=3))."""
    keep_cls_token: bool = True
    """Prepend each frame's CLS to its kept patches (official: K + 1 = 4 tokens per frame)."""
    max_frames: int = 12
    """Largest T the ISA frame/patch mixing matrices are sized for (official max_frames 12)."""
    temporal_layers: int = 4
    """seqTransf layers of the temporal encoder (official cross_num_hidden_layers 4); 0 = meanP."""
    isa_temperature: float = 0.01
    """τ of both softmaxes in ISA / Bi-ISA (official 1e-2)."""
    topk_samples: int = 500
    """Monte-Carlo samples of the perturbed top-K in training (official 500)."""
    topk_sigma: float = 0.05
    """Noise scale ε of the perturbed top-K (official 0.05)."""
    selector_video_context: bool = True
    """Condition the patch scorer on the video mean as well as the frame CLS (False = official)."""
    topk_backward: str = "official"
    """Perturbed top-K gradient: "official" (diagonal terms only, as the official code) or "full"."""
    granularities: list[str] = field(default_factory=lambda: list(GRANULARITIES))
    """Alignments averaged in training and inference (ablation: drop any; the paper uses all three)."""
    aggregation: str = "isa"
    """Similarity aggregation in the frame-sentence and patch-word parts: isa (paper) | mean | softmax."""
    bi_isa_order: str = "both"
    """Bi-ISA of the patch-word matrix: both (paper) | row (words first) | column (patches first)."""
    sinkhorn_iters: int = 4
    """SK iterations applied by :meth:`UCoFIA.combine` at full evaluation (official 4); 0 = off."""
    chunk_size: int = 64
    """Texts and videos per tile of the fine-grained scoring (memory ~ chunk² · N · L floats)."""
    tile_mib: int = 0
    """Inference only (no grad): 0 = tiles of ``chunk_size``; > 0 = the tile side chosen so that a
    tile's working set (``TILE_TEMPS`` (side, side, N, L') float tensors) fits this many MiB
    (:func:`tile_side`), and the tiles write into preallocated (N_t, N_v) outputs. Scores are the
    same to float rounding (every pair is scored independently)."""
    checkpoint_tiles: bool = False
    """In training, recompute every tile in backward (torch.utils.checkpoint): activation memory of
    the fine-grained part drops from O(B² · N · L) to O(chunk² · N · L) for ~1.3x its compute."""

    def __post_init__(self) -> None:
        if isinstance(self.tile_mib, bool) or not isinstance(self.tile_mib, int) or self.tile_mib < 0:
            raise ValueError(f"model.ucofia.tile_mib must be an integer >= 0, got {self.tile_mib!r}")
        for name in ("topk", "max_frames", "topk_samples", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.ucofia.{name} must be an integer >= 1, got {value!r}")
        for name in ("temporal_layers", "sinkhorn_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"model.ucofia.{name} must be an integer >= 0, got {value!r}")
        for name, value, allowed in (("topk_backward", self.topk_backward, TOPK_BACKWARDS),
                                     ("aggregation", self.aggregation, AGGREGATIONS),
                                     ("bi_isa_order", self.bi_isa_order, BI_ISA_ORDERS)):
            if value not in allowed:
                raise ValueError(f"model.ucofia.{name}={value!r}; choose one of {list(allowed)}")
        bad = [g for g in self.granularities if g not in GRANULARITIES]
        if bad or not self.granularities or len(set(self.granularities)) != len(self.granularities):
            raise ValueError(f"model.ucofia.granularities={list(self.granularities)!r}: a non-empty list of "
                             f"distinct names from {list(GRANULARITIES)}")
        for name in ("isa_temperature", "topk_sigma"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"model.ucofia.{name} must be a number > 0, got {value!r}")

    @property
    def tokens_per_frame(self) -> int:
        """K' = K (+1 with the frame CLS)."""
        return self.topk + int(self.keep_cls_token)


TILE_TEMPS = 4
"""(a, b, N, L') float tensors alive at once in one fine-grained tile (the einsum result, the ISA
logits / softmax / mixed temporaries, the transposed copy of the column path), an estimate used
by :func:`tile_side`; ``benchmarks/bench_ucofia.py`` reports the measured peak."""


def tile_side(tile_mib: int, tokens: int, words: int, bytes_per: int = 4) -> int:
    """Largest tile side s (texts = videos = s) with ``TILE_TEMPS · s² · tokens · words · bytes``
    within ``tile_mib`` MiB (at least 1)."""
    per_pair = TILE_TEMPS * tokens * max(words, 1) * bytes_per
    return max(1, int((tile_mib * 2**20 / per_pair) ** 0.5))


# -- Interactive Similarity Aggregation ----------------------------------------------------------

def isa(x: Tensor, weight: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    """ISA over the last dim: x (..., n), weight (n', n') with n' >= n (top-left block used),
    mask broadcastable to x, True = real entry -> (...,).

        a = softmax_μ(x/τ);  b = softmax_μ(aW/τ);  ISA = Σ_i b_i x_i

    Masked entries get -inf logits in both softmaxes, hence weight exactly 0 (x must be finite
    there). 1/τ is folded into W, and the masks are applied in place, to save passes over the
    (chunk, chunk, N, L) tensors.
    """
    n = x.shape[-1]
    inv_tau = 1.0 / temperature
    w = weight[:n, :n] * inv_tau                                                 # (n, n) = W/τ
    neg = None if mask is None else ~mask
    logits = x * inv_tau                                                         # (..., n)
    if neg is not None:
        logits.masked_fill_(neg, float("-inf"))
    a = torch.softmax(logits, dim=-1)                                            # (..., n)
    del logits
    mixed = a @ w                                                                # (..., n) = aW/τ
    del a
    if neg is not None:
        mixed.masked_fill_(neg, float("-inf"))
    b = torch.softmax(mixed, dim=-1)                                             # (..., n)
    return (b * x).sum(dim=-1)                                                   # (...,)


def aggregate(x: Tensor, weight: Tensor, temperature: float, mask: Tensor | None = None,
              mode: str = "isa") -> Tensor:
    """Aggregate x (..., n) -> (...,): "isa" (:func:`isa`), "mean" (masked mean) or "softmax"
    (Σ_i softmax_μ(x/τ)_i x_i, ISA without the W mixing step)."""
    if mode == "isa":
        return isa(x, weight, temperature, mask)
    if mode == "mean":
        if mask is None:
            return x.mean(dim=-1)
        m = mask.to(x.dtype).expand_as(x)
        return (x * m).sum(dim=-1) / m.sum(dim=-1)
    logits = x / temperature
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return (torch.softmax(logits, dim=-1) * x).sum(dim=-1)


def bi_isa(m: Tensor, w_row: Tensor, w_col: Tensor, w_row_across: Tensor, w_col_across: Tensor,
           temperature: float, word_mask: Tensor | None = None, *, mode: str = "isa",
           order: str = "both") -> Tensor:
    """Bi-ISA of patch-word matrices m (..., N, L) (rows = patches, columns = words) -> (...,).

    r = ISA over words of each row (W₁ = w_row, masked); q = ISA over patches of each column
    (W₂ = w_col); result ½ [ISA(r; W₃ = w_row_across) + ISA(q; W₄ = w_col_across, masked)].
    ``word_mask`` (..., L) bool, True at real words, broadcastable against m[..., 0, :].
    ``mode``: the aggregation of every step (:func:`aggregate`); ``order``: "both", or only the
    "row" (words first) or "column" (patches first) path.
    """
    row_mask = None if word_mask is None else word_mask.unsqueeze(-2)           # (..., 1, L)
    if order in ("both", "row"):
        r = aggregate(m, w_row, temperature, row_mask, mode)                     # (..., N)
        s_r = aggregate(r, w_row_across, temperature, None, mode)                # (...,)
        if order == "row":
            return s_r
    q = aggregate(m.transpose(-1, -2).contiguous(), w_col, temperature, None, mode)  # (..., L)
    s_q = aggregate(q, w_col_across, temperature, word_mask, mode)               # (...,)
    return s_q if order == "column" else 0.5 * (s_r + s_q)


# -- differentiable top-K ------------------------------------------------------------------------

class _PerturbedTopK(torch.autograd.Function):
    """Perturbed-optimiser top-K (Berthet et al. 2020). Forward as the official
    ``PerturbedTopKFuntion``; backward the official diagonal estimator or the full one (module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int, noise: Tensor, sigma: float, backward: str = "official") -> Tensor:
        # x (M, P) scores, noise (M, S, P) standard normal
        perturbed = x.unsqueeze(1) + sigma * noise                               # (M, S, P)
        idx = perturbed.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values  # (M, S, K)
        onehot = F.one_hot(idx, num_classes=x.shape[-1]).to(x.dtype)             # (M, S, K, P)
        ctx.save_for_backward(onehot, noise)
        ctx.sigma, ctx.mode = sigma, backward
        return onehot.mean(dim=1)                                                # (M, K, P)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        onehot, noise = ctx.saved_tensors                                        # (M,S,K,P), (M,S,P)
        scale = noise.shape[1] * ctx.sigma
        if ctx.mode == "official":
            # diagonal terms only: Σ_k G_kp E[onehot_kp Z_p] / σ
            jac = torch.einsum("mskp,msp->mkp", onehot, noise)                   # (M, K, P)
            return (grad_out * jac).sum(dim=1) / scale, None, None, None, None
        # full estimator: E[<G, onehot> Z] / σ
        g = torch.einsum("mkp,mskp->ms", grad_out, onehot)                       # (M, S)
        grad_x = torch.einsum("ms,msd->md", g, noise) / scale                    # (M, P)
        return grad_x, None, None, None, None


def perturbed_topk(x: Tensor, k: int, *, num_samples: int, sigma: float,
                   noise: Tensor | None = None, backward: str = "official") -> Tensor:
    """Soft top-K indicators x (M, P) -> (M, K, P): slot k holds the frequency with which each
    entry is the k-th smallest index among the top-K of x + σZ. Every slot sums to 1.
    ``noise`` (M, num_samples, P) may be given (tests); by default drawn from the global RNG.
    ``backward``: "official" (diagonal Jacobian terms, the official code) or "full"."""
    if backward not in TOPK_BACKWARDS:
        raise ValueError(f"perturbed_topk: backward must be one of {TOPK_BACKWARDS}, got {backward!r}")
    if noise is None:
        noise = torch.randn(x.shape[0], num_samples, x.shape[1], dtype=x.dtype, device=x.device)
    return _PerturbedTopK.apply(x, k, noise, sigma, backward)


def hard_topk(x: Tensor, k: int) -> Tensor:
    """Hard top-K indicators x (M, P) -> (M, K, P) one-hot, slots in ascending index order."""
    idx = x.topk(k, dim=-1).indices.sort(dim=-1).values                          # (M, K)
    return F.one_hot(idx, num_classes=x.shape[-1]).to(x.dtype)                   # (M, K, P)


class PatchSelector(nn.Module):
    """Scores patches from [φ(patch); φ(frame CLS); φ(video mean)] and keeps the top-K per frame."""

    def __init__(self, *, dim: int, topk: int, video_context: bool, num_samples: int, sigma: float,
                 backward: str = "official"):
        super().__init__()
        hidden = max(1, dim // 2)
        self.topk, self.video_context, self.backward = topk, video_context, backward
        self.num_samples, self.sigma = num_samples, sigma
        self.inp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden, bias=False), nn.GELU())
        n_in = hidden * (3 if video_context else 2)
        self.out = nn.Sequential(nn.Linear(n_in, hidden, bias=False), nn.GELU(),
                                 nn.Linear(hidden, 1, bias=False), nn.Tanh())

    def scores(self, cls: Tensor, patches: Tensor) -> Tensor:
        """cls (B, T, D), patches (B, T, P, D) -> saliency σ (B, T, P) in (-1, 1)."""
        B, T, P, _ = patches.shape
        h_p = self.inp(patches)                                                  # (B, T, P, H)
        ctx = [self.inp(cls).unsqueeze(2).expand(B, T, P, -1)]                   # (B, T, P, H)
        if self.video_context:
            h_v = self.inp(cls.mean(dim=1))                                      # (B, H)
            ctx.append(h_v[:, None, None, :].expand(B, T, P, -1))                # (B, T, P, H)
        return self.out(torch.cat([h_p, *ctx], dim=-1)).squeeze(-1)              # (B, T, P)

    def forward(self, cls: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """-> selected tokens (B, T, K, D) and indicators (B, T, K, P) (one-hot in eval mode)."""
        B, T, P, D = patches.shape
        if self.topk > P:
            raise ValueError(f"model.ucofia.topk={self.topk} exceeds the {P} patches per frame of this "
                             "backbone; lower topk")
        sigma = self.scores(cls, patches).flatten(0, 1)                          # (B*T, P)
        if self.training:
            ind = perturbed_topk(sigma, self.topk, num_samples=self.num_samples, sigma=self.sigma,
                                 backward=self.backward)
        else:
            ind = hard_topk(sigma, self.topk)                                    # (B*T, K, P)
        ind = ind.view(B, T, self.topk, P)                                       # (B, T, K, P)
        selected = torch.einsum("btkp,btpd->btkd", ind.to(patches.dtype), patches)  # (B, T, K, D)
        return selected, ind


# -- the method ----------------------------------------------------------------------------------

def _eye(n: int) -> nn.Parameter:
    return nn.Parameter(torch.eye(n))


class UCoFIA(nn.Module):
    def __init__(self, cfg: UCoFIACfg, backbone: ClipBackbone):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        D, L = backbone.embed_dim, backbone.context_length
        N = cfg.max_frames * cfg.tokens_per_frame
        self.temporal = (None if cfg.temporal_layers == 0 else
                         TemporalEncoder(dim=D, num_frames=cfg.max_frames, layers=cfg.temporal_layers))
        self.selector = PatchSelector(dim=D, topk=cfg.topk, video_context=cfg.selector_video_context,
                                      num_samples=cfg.topk_samples, sigma=cfg.topk_sigma,
                                      backward=cfg.topk_backward)
        # coarse: A, B (official global_mat_weight, global_mat_weight_1)
        self.sentence_mat, self.video_mat = _eye(D), _eye(D)
        # frame-sentence ISA: W_f (official frame_logit_weight)
        self.frame_isa = _eye(cfg.max_frames)
        # patch-word: C, E (local_mat_weight, local_mat_weight1); W₁..W₄ (word_mat_weight,
        # pixel_mat_weight, pixel_mat_weight2, word_mat_weight2)
        self.word_mat, self.patch_mat = _eye(D), _eye(D)
        self.word_isa, self.patch_isa = _eye(L), _eye(N)
        self.patch_isa_across, self.word_isa_across = _eye(N), _eye(L)

    # -- encoders -------------------------------------------------------------------------------
    def encode_text(self, text: Tensor) -> Features:
        eos, words, mask = self.backbone.encode_text(text, tokens=True)          # (B,D), (B,L,D), (B,L)
        return {"sentence": F.normalize(eos, dim=-1),                            # (B, D)
                "words": F.normalize(words, dim=-1),                             # (B, L, D)
                "word_mask": mask.to(words.dtype)}                               # (B, L) 1 = real word

    def encode_video(self, frames: Tensor, captions: Tensor | None = None) -> Features:
        T = frames.shape[1]
        if T > self.cfg.max_frames:
            raise ValueError(f"clips have {T} frames but model.ucofia.max_frames={self.cfg.max_frames}; "
                             "raise max_frames (it sizes the ISA matrices) or sample fewer frames")
        cls, patches = self.backbone.encode_frames(frames, patches=True)         # (B,T,D), (B,T,P,D)
        g = cls if self.temporal is None else self.temporal(cls)                 # (B, T, D)
        video = F.normalize(F.normalize(g, dim=-1).mean(dim=1), dim=-1)         # (B, D)
        selected, _ = self.selector(cls, patches)                                # (B, T, K, D)
        if self.cfg.keep_cls_token:
            selected = torch.cat([cls.unsqueeze(2), selected], dim=2)            # (B, T, K+1, D)
        tokens = F.normalize(selected, dim=-1).flatten(1, 2)                     # (B, T*K', D)
        return {"video": video,                                                  # (B, D)
                "frames": F.normalize(cls, dim=-1),                              # (B, T, D)
                "patches": tokens}                                               # (B, T*K', D)

    # -- similarities ---------------------------------------------------------------------------
    def _check(self, text: Features, video: Features) -> None:
        if not (text["word_mask"] > 0.5).any(dim=1).all():
            raise ValueError("UCoFIA: a text has no real word (word_mask all 0); every caption needs at "
                             "least its SOT/EOS tokens")
        T, N = video["frames"].shape[1], video["patches"].shape[1]
        if T > self.cfg.max_frames:
            raise ValueError(f"video features carry {T} frames but model.ucofia.max_frames="
                             f"{self.cfg.max_frames}")
        if N > self.patch_isa.shape[0]:
            raise ValueError(f"video features carry {N} patch tokens but model.ucofia.max_frames="
                             f"{self.cfg.max_frames} x tokens_per_frame={self.cfg.tokens_per_frame} "
                             f"allows {self.patch_isa.shape[0]}")

    def _fine_tile(self, s: Tensor, words: Tensor, mask: Tensor, frames: Tensor, patches: Tensor
                   ) -> tuple[Tensor, Tensor]:
        """One tile: s (a, D), words (a, L, D) projected, mask (a, L) bool, frames (b, T, D),
        patches (b, N, D) projected -> frame-sentence (a, b), patch-word (a, b)."""
        tau, mode, used = self.cfg.isa_temperature, self.cfg.aggregation, self.cfg.granularities
        skipped = s.new_zeros(s.shape[0], frames.shape[0])                       # a dropped granularity
        s_fs = s_pw = skipped
        if "frame_sentence" in used:
            c = torch.einsum("ad,btd->abt", s, frames)                           # (a, b, T)
            s_fs = aggregate(c, self.frame_isa, tau, None, mode)                 # (a, b)
        if "patch_word" in used:
            m = torch.einsum("ald,bnd->abnl", words, patches)                    # (a, b, N, L)
            s_pw = bi_isa(m, self.word_isa, self.patch_isa, self.patch_isa_across, self.word_isa_across,
                          tau, mask[:, None, :], mode=mode, order=self.cfg.bi_isa_order)  # (a, b)
        return s_fs, s_pw

    def _tile(self, *args: Tensor) -> tuple[Tensor, Tensor]:
        if self.cfg.checkpoint_tiles and torch.is_grad_enabled():
            return checkpoint(self._fine_tile, *args, use_reentrant=False)
        return self._fine_tile(*args)

    def granularity_similarities(self, text: Features, video: Features) -> dict[str, Tensor]:
        """Per-granularity (N_t, N_v) similarities (cosine units, no SK), computed in tiles; only the
        configured ``granularities`` (a dropped one is not computed)."""
        self._check(text, video)
        mask = text["word_mask"] > 0.5                                           # (Nt, L)
        real = mask.any(dim=0).nonzero()
        L = int(real.max()) + 1 if real.numel() else 1                           # longest caption
        s = text["sentence"]                                                     # (Nt, D)
        words = text["words"][:, :L] @ self.word_mat                             # (Nt, L, D)
        mask = mask[:, :L]                                                       # (Nt, L)
        patches = video["patches"] @ self.patch_mat                              # (Nv, N, D)
        frames = video["frames"]                                                 # (Nv, T, D)
        s_vs = (s @ self.sentence_mat) @ (video["video"] @ self.video_mat).t()   # (Nt, Nv)
        n_t, n_v, step = s.shape[0], frames.shape[0], self.cfg.chunk_size
        if self.cfg.tile_mib and not torch.is_grad_enabled():            # bounded by a memory budget
            step = tile_side(self.cfg.tile_mib, patches.shape[1], L, patches.element_size())
            out_fs = s.new_zeros(n_t, n_v)                                       # (Nt, Nv), written in place
            out_pw = s.new_zeros(n_t, n_v)
            for i in range(0, n_t, step):
                ti = slice(i, i + step)
                for j in range(0, n_v, step):
                    t_fs, t_pw = self._fine_tile(s[ti], words[ti], mask[ti], frames[j:j + step],
                                                 patches[j:j + step])
                    out_fs[ti, j:j + step] = t_fs
                    out_pw[ti, j:j + step] = t_pw
                    del t_fs, t_pw
            out = {"video_sentence": s_vs, "frame_sentence": out_fs, "patch_word": out_pw}
            return {g: out[g] for g in self.cfg.granularities}
        rows_fs, rows_pw = [], []
        for i in range(0, n_t, step):
            ti = slice(i, i + step)
            tiles = [self._tile(s[ti], words[ti], mask[ti], frames[j:j + step], patches[j:j + step])
                     for j in range(0, n_v, step)]
            rows_fs.append(torch.cat([t[0] for t in tiles], dim=1))              # (a, Nv)
            rows_pw.append(torch.cat([t[1] for t in tiles], dim=1))              # (a, Nv)
        out = {"video_sentence": s_vs,
               "frame_sentence": torch.cat(rows_fs, dim=0),                      # (Nt, Nv)
               "patch_word": torch.cat(rows_pw, dim=0)}                          # (Nt, Nv)
        return {g: out[g] for g in self.cfg.granularities}

    def sinkhorn_temperature(self) -> float:
        """τ = 1 / e^θ (CLIP's learned temperature, e^θ clamped at 100 as in the loss)."""
        return 1.0 / float(self.backbone.logit_scale.detach().exp().clamp(max=100.0))

    def combine(self, sims: dict[str, Tensor], sinkhorn_iters: int | None = None,
                bank: dict[str, Tensor] | None = None) -> Tensor:
        """Average the granularities, each SK-normalised first: (1/|G|) Σ_g SK_τ(S_g) -> (N_t, N_v).

        ``sinkhorn_iters`` None = ``cfg.sinkhorn_iters``; 0 = plain mean. SK needs the *full*
        matrices (all evaluated texts x all videos). ``bank``: optional per-granularity
        (N_bank, N_v) matrices for the official bank form (see :func:`tvr.sinkhorn.sinkhorn_normalise`).
        """
        used = self.cfg.granularities
        missing = [g for g in used if g not in sims]
        if missing:
            raise KeyError(f"UCoFIA.combine: missing granularities {missing}; pass the dict returned "
                           "by granularity_similarities")
        n_iter = self.cfg.sinkhorn_iters if sinkhorn_iters is None else sinkhorn_iters
        tau = self.sinkhorn_temperature() if n_iter else 1.0
        out = [sinkhorn_normalise(sims[g], n_iter, temperature=tau,
                                  bank=None if bank is None else bank[g]) for g in used]
        return torch.stack(out).mean(dim=0)                                      # (N_t, N_v)

    def similarity(self, text: Features, video: Features) -> Tensor:
        """Blockwise inference scores (N_t, N_v): the granularity mean without SK."""
        return self.combine(self.granularity_similarities(text, video), sinkhorn_iters=0)

    def loss(self, text: Features, video: Features) -> dict[str, Tensor]:
        sims = self.granularity_similarities(text, video)
        scale = self.backbone.logit_scale
        total = symmetric_ce(clip_logits(self.combine(sims, sinkhorn_iters=0), scale))
        out = {"loss": total}
        with torch.no_grad():
            for g in self.cfg.granularities:
                out[f"ce_{g}"] = symmetric_ce(clip_logits(sims[g], scale))
        return out

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return backbone_head_groups(self, lr, backbone_lr, weight_decay)


SPEC = MethodSpec(name="ucofia", config_cls=UCoFIACfg, build=UCoFIA,
                  summary="UCoFIA: video-sentence + frame-sentence + patch-word alignment, ISA/Bi-ISA, SK")
