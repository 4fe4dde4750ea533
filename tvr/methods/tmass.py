"""T-MASS: text is modelled as a stochastic embedding, Wang et al. CVPR 2024,
github.com/Jiamian-Wang/T-MASS-text-video-retrieval. Built on X-Pool (:mod:`tvr.methods.xpool`).

Symbols: t ∈ R^D raw CLIP sentence feature, f_k ∈ R^D CLIP CLS feature of frame k (k = 1..T'),
v_{j|i} the X-Pool embedding of video j conditioned on the *mean* text t_i, cos the cosine.

Similarity-aware radius (official ``modules/stochastic_module.py``, ``LinearCosRadius``), from the
frame-text cosines S = [S_1 .. S_T'], S_k = cos(t, f_k):

    radius="mean"         R = exp( (1/T') Σ_k S_k )                       scalar
    radius="scaled_mean"  R = exp( θ · (1/T') Σ_k S_k )                   scalar, θ learnable (init 1)
    radius="linear"       R = exp( S Wᵀ + b ),  W ∈ R^{D×T'}, b ∈ R^D     per dimension (official default)

The official code always uses "linear" (its ``learnable_scalar`` θ is allocated, uninitialised and
unused); W starts as ``eye_`` on the (D, T') matrix and b = 0, so initially R_d = exp(S_d) for
d < T' and R_d = 1 for d ≥ T'.

Stochastic text (re-parameterisation, official ``StochasticText``):

    t_s = t + ε ⊙ R,   ε ~ U[0, 1)^D (prior="uniform01", official default)
                       ε ~ N(0, σ² I) (prior="normal", σ = prior_std; official LSMDC run: σ = 3e-3)

The paper writes ε ~ N(0, I); the official default and its MSR-VTT / DiDeMo runs use U[0, 1).
The noise is added to the *unnormalised* CLIP feature, as in the official code.

Training (official ``trainer/trainer_stochastic.py``) on a batch of B pairs, R_i computed from text
i and the frames of its own video i:

    S^s_{ij}   = cos(t_s,i, v_{j|i})                         (B, B)
    L_s        = ½ [CE(S^s/τ, diag) + CE(S^sᵀ/τ, diag)]      symmetric, CLIP's τ
    v̄_i       = (1/B) Σ_k v_{i|k}                           (support_video="text_mean", official:
                                                             mean over the texts axis of the pooled
                                                             tensor) or v̄_i = v_{i|i} ("paired")
    t_sup,i    = t_i + (v̄_i − t_i) / ‖v̄_i − t_i‖ ⊙ R_i
    S^sup_{ij} = cos(t_sup,i, v_{j|i})
    L_sup      = ½ [CE(S^sup/τ, diag) + CE(S^supᵀ/τ, diag)]  symmetric as well
    L          = L_s + α · L_sup                              α = ``support_weight``
                                                             (``loss="s_sup"``, the paper's full form)

The mean text t gets no loss term of its own (it is trained through t_s, t_sup and the pooling).
α: the paper uses 1.2 (the default here); the official code's default is 0 and its MSR-VTT command
uses 0.8 (``jobs/repro/tmass_b32.yaml`` follows the command, since the published numbers come from it).

Loss ablation (paper Table 6a, row "L_ce + L_s"; ``loss="ce_s"``): the mean text gets the ordinary
X-Pool cross-entropy and the support term is dropped,

    S_{ij}     = cos(t_i, v_{j|i})
    L_ce       = ½ [CE(S/τ, diag) + CE(Sᵀ/τ, diag)]
    L          = L_ce + L_s                                   (α unused)

The official code has no such switch (it trains L_s + α L_sup only; α = 0 there gives L_s alone).

Inference (official ``_valid_epoch_step``): for every pair (i, j), R_ij is computed from text i and
the frames of the *candidate* video j, M = ``num_samples`` stochastic texts are drawn and the best
one is kept:

    s(t_i, v_j) = max_{m=1..M} cos(t_i + ε_im ⊙ R_ij, v_{j|i})

The official code does not keep the mean text t_i as a candidate (``keep_mean=False``); with
``keep_mean=True`` the candidate ε = 0, i.e. cos(t_i, v_{j|i}), joins the max. DSL (the official
``--DSL`` post-processing) lives in :func:`tvr.metrics.blockwise_ranks` (``dsl_temp``).

The sample axis is never materialised against D: with v̂ = v_{j|i} / ‖v_{j|i}‖ and R = R_ij,

    ⟨t_s, v̂⟩  = ⟨t, v̂⟩ + Σ_d ε_d R_d v̂_d
    ‖t_s‖²   = ‖t‖² + 2 Σ_d ε_d R_d t_d + Σ_d ε_d² R_d²

so each text chunk costs O(chunk · N_v · (D + M)) memory (three batched matmuls against ε).

Reproducibility and block invariance (a deviation from the official code, which draws fresh noise
for every (video, trial) from the global RNG): the noise ε_i ∈ R^{M×D} of text i depends only on
``eval_seed`` and a 62-bit hash of text i's non-padding token ids. ``encode_text`` returns the hash
as ``"key"`` (N, 8): its 8 bytes stored as floats in [0, 255], exact in fp32, bf16 and fp16, so it
survives the platform casting every feature to float. ε_i is drawn on the CPU with a generator
seeded per text, then moved to the device, so the score of pair (i, j) is the same whichever block
of texts and videos it is computed in, in any order, on any device. The same ε_i is shared by all
candidate videos of text i (common random numbers); R_ij still differs per pair. Training noise
comes from the global torch RNG.

Test-caption leak of the official evaluation (not copied here). After the M-sample selection the
official code scores with ``generate_embeds_per_video_id_stochastic`` + ``sim_matrix_inference_stochastic``
(``modules/metrics.py``, called from ``trainer/trainer_stochastic.py::_valid_epoch_step``). Tracing
its permutes and the diagonal ``sims[i, :, :, i]``, the score of query text q (the k-th caption of
video g) against candidate video j is

    official:  s(q, j) = cos( t_s*(q | j), v_{j | t_{j,k}} )

where t_s*(q | j) is the selected stochastic text (correctly drawn with R_qj and chosen against
v_{j|q}), but the video end v_{j | t_{j,k}} is video j pooled with *its own k-th ground-truth
caption* t_{j,k}, not with the query. Every candidate video is thus conditioned on the caption the
benchmark asks to retrieve it with: a test-caption leak that pulls wrong pairs apart (q ≠ t_{j,k}
sees a video attended towards another sentence). tvr scores

    tvr:       s(q, j) = max_m cos( t_q + ε_qm ⊙ R_qj, v_{j|q} )

which depends on the query and the candidate video only (``test_tmass.py`` checks that changing
caption j's text leaves s(i, j) unchanged for i ≠ j, and that the official form does not).
The published T-MASS numbers (docs/reference-results.md) come from the official code, so tvr's
T-MASS is expected to score below them; the leaky form is deliberately not offered.

Other deviations: pooled tensors are laid out (N_t, N_v, D); similarity is chunked over texts;
``prepare_video`` caches the text-independent frame tensors (X-Pool's K, V and the unit frames);
the official code picks the best of ``evals_per_epoch`` = 10 evaluations per epoch on the test
split itself (checkpoint selection on the test set), tvr reports the evaluation after training.

Training-recipe differences (``jobs/repro/tmass_b32.yaml / tmass_b16.yaml``; the full list, shared by every recipe, is in
docs/reference-results.md "What still differs"): as X-Pool's (:mod:`tvr.methods.xpool`),
plus α = 0.8 from the official command.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvr.backbone import ClipBackbone
from tvr.losses import clip_logits, symmetric_ce
from tvr.methods.base import Features, MethodSpec
from tvr.methods.xpool import XPool, XPoolCfg, pair_cosine

RADII = ("mean", "scaled_mean", "linear")
PRIORS = ("uniform01", "normal")
SUPPORT_VIDEOS = ("text_mean", "paired")
LOSSES = ("s_sup", "ce_s")

_P = 2**31 - 1                    # Mersenne prime for the two 31-bit token hashes
_MUL = (1_000_003, 998_244_353)
_KEY_BYTES = 8


@dataclass(kw_only=True)
class TMassCfg(XPoolCfg):
    """T-MASS stochastic text on top of X-Pool pooling (num_heads, dropout, sim_chunk as X-Pool)."""

    radius: str = "linear"
    """Radius R from the frame-text cosines S: "mean" exp(mean S), "scaled_mean" exp(θ mean S), "linear" exp(S W)."""
    num_frames: int = 8
    """Frames T' per video (the platform checks it equals data.num_frames); the "linear" radius maps T' cosines to D dims."""
    prior: str = "uniform01"
    """Noise prior for ε: "uniform01" U[0,1) (official default) or "normal" N(0, prior_std²)."""
    prior_std: float = 1.0
    """Standard deviation of the "normal" prior (official ``stochastic_prior_std``; unused by uniform01)."""
    support_weight: float = 1.2
    """α in L = L_s + α L_sup (paper 1.2; official MSR-VTT command 0.8)."""
    support_video: str = "text_mean"
    """Video end of the support direction: "text_mean" (official: mean over texts of v_{i|k}) or "paired" (v_{i|i})."""
    num_samples: int = 20
    """M stochastic texts per (text, video) pair at inference (official ``stochasic_trials`` = 20)."""
    keep_mean: bool = False
    """Also score the mean text t itself as a candidate at inference (the official code does not)."""
    eval_seed: int = 24
    """Seed of the inference noise (official seed 24); with the token hash it fixes ε per text."""
    loss: str = "s_sup"
    """Training objective: "s_sup" L_s + α L_sup (paper, official) or "ce_s" L_ce + L_s (paper Table 6a ablation)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for field, value, allowed in (("radius", self.radius, RADII), ("prior", self.prior, PRIORS),
                                      ("support_video", self.support_video, SUPPORT_VIDEOS),
                                      ("loss", self.loss, LOSSES)):
            if value not in allowed:
                raise ValueError(f"TMassCfg.{field}={value!r} is not valid; choose one of {list(allowed)}")
        if not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"TMassCfg.num_frames must be a positive integer, got {self.num_frames!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"TMassCfg.num_samples must be a positive integer, got {self.num_samples!r}")
        if not self.prior_std > 0:
            raise ValueError(f"TMassCfg.prior_std must be > 0, got {self.prior_std!r}")
        if not self.support_weight >= 0:
            raise ValueError(f"TMassCfg.support_weight must be >= 0, got {self.support_weight!r}")
        if not isinstance(self.eval_seed, int) or self.eval_seed < 0:
            raise ValueError(f"TMassCfg.eval_seed must be a non-negative integer, got {self.eval_seed!r}")


def token_keys(ids: Tensor) -> Tensor:
    """(B, L) token ids -> (B, 8) float32: the bytes of two 31-bit polynomial hashes of the
    non-padding (≠ 0) tokens, so a caption keeps its key whatever the padding, batch or block."""
    ids = ids.long()
    h = [torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device) for _ in _MUL]
    for col in ids.t():                                                  # (B,) per position
        real = col != 0
        h = [torch.where(real, (hk * m + col) % _P, hk) for hk, m in zip(h, _MUL)]
    key = h[0] * 2**31 + h[1]                                            # (B,) in [0, 2^62)
    shifts = 8 * torch.arange(_KEY_BYTES, device=ids.device)             # (8,)
    return ((key[:, None] >> shifts) & 255).float()                      # (B, 8)


def key_ints(keys: Tensor) -> list[int]:
    """(N, 8) byte-valued keys from :func:`token_keys` -> N Python ints."""
    if keys.ndim != 2 or keys.shape[1] != _KEY_BYTES or keys.is_complex():
        raise ValueError(f"TMass: text['key'] must be the (N, {_KEY_BYTES}) hash from TMass.encode_text, "
                         f"got shape {tuple(keys.shape)}")
    k = keys.detach().double().cpu()
    if k.numel() and (not torch.equal(k, k.round()) or k.min() < 0 or k.max() > 255):
        raise ValueError("TMass: text['key'] holds values that are not bytes; pass the features of "
                         "TMass.encode_text unchanged (a cast to fp32/bf16/fp16 is fine)")
    k = k.long()                                                         # (N, 8)
    return (k << (8 * torch.arange(_KEY_BYTES))).sum(dim=1).tolist()    # (N,)


class TMass(XPool):
    def __init__(self, cfg: TMassCfg, backbone: ClipBackbone):
        super().__init__(cfg, backbone)
        self.cfg: TMassCfg = cfg
        D = backbone.embed_dim
        if cfg.radius == "linear":
            self.radius_proj = nn.Linear(cfg.num_frames, D)              # W (D, T'), b (D,)
            nn.init.eye_(self.radius_proj.weight)
            nn.init.zeros_(self.radius_proj.bias)
        elif cfg.radius == "scaled_mean":
            self.radius_scale = nn.Parameter(torch.ones(()))             # θ

    # -- features ---------------------------------------------------------------------------------
    def encode_text(self, text: Tensor) -> Features:
        eos, _, _ = self.backbone.encode_text(text)                      # (B, D)
        return {"text": eos, "key": token_keys(text)}                    # (B, D), (B, 8)

    # -- radius -----------------------------------------------------------------------------------
    def radius(self, cos_tf: Tensor) -> Tensor:
        """Frame-text cosines S (..., T') -> R (..., D) ("linear") or (..., 1) (mean variants)."""
        if cos_tf.shape[-1] != self.cfg.num_frames and self.cfg.radius == "linear":
            raise ValueError(f"TMassCfg.num_frames={self.cfg.num_frames} but the videos have "
                             f"{cos_tf.shape[-1]} frames; set num_frames to the clip length")
        if self.cfg.radius == "linear":
            return torch.exp(self.radius_proj(cos_tf))                   # (..., D)
        mean = cos_tf.mean(dim=-1, keepdim=True)                         # (..., 1)
        if self.cfg.radius == "scaled_mean":
            mean = self.radius_scale * mean
        return torch.exp(mean)                                           # (..., 1)

    def _prior_like(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                    device: torch.device | None = None) -> Tensor:
        if self.cfg.prior == "uniform01":
            return torch.rand(shape, generator=generator, device=device)
        return torch.randn(shape, generator=generator, device=device) * self.cfg.prior_std

    def eval_noise(self, keys: Tensor) -> Tensor:
        """ε for inference: keys (N, 8) -> (N, M, D) float32 on the CPU, a function of (eval_seed, key) only."""
        M, D = self.cfg.num_samples, self.backbone.embed_dim
        ints = key_ints(keys)
        out = torch.empty(len(ints), M, D)
        g = torch.Generator()
        for n, key in enumerate(ints):
            g.manual_seed((self.cfg.eval_seed * 0x9E3779B97F4A7C15 + key) % (2**63 - 1))
            out[n] = self._prior_like((M, D), generator=g)               # (M, D)
        return out

    # -- inference --------------------------------------------------------------------------------
    def _check_text(self, text: Features) -> None:
        if "key" not in text:
            raise KeyError(f"TMass.similarity needs the 'key' feature from TMass.encode_text, got {sorted(text)}")

    def prepare_video(self, video: Features) -> Features:
        """Inference: X-Pool's frame keys / values plus the unit frames ``frames_unit`` (N_v, T, D)
        of the radius' cosines; all depend only on the frames (computed once per evaluation / index)."""
        out = super().prepare_video(video)
        return {**out, "frames_unit": F.normalize(self._frames(video), dim=-1)}

    def _chunk_similarity(self, t: Tensor, keys: Tensor, f: Tensor, kv: tuple[Tensor, Tensor],
                          f_unit: Tensor) -> Tensor:
        """t (c, D), keys (c, 8), frames f (Nv, T, D) with their K, V and unit frames -> (c, Nv)."""
        dt = torch.promote_types(t.dtype, torch.float32)                 # at least fp32 for the scores
        pooled = self.pool(t, f, kv)                                     # (c, Nv, D)
        tf = t.to(dt)                                                    # (c, D)
        v_hat = F.normalize(pooled.to(dt), dim=-1)                       # (c, Nv, D)
        cos_tf = torch.einsum("cd,nkd->cnk", F.normalize(t, dim=-1), f_unit)  # (c, Nv, T)
        R = self.radius(cos_tf).to(dt).expand_as(v_hat)                  # (c, Nv, D)
        eps = self.eval_noise(keys).to(t.device, dt)                     # (c, M, D)
        if self.cfg.keep_mean:
            eps = torch.cat([eps.new_zeros(eps.shape[0], 1, eps.shape[2]), eps], dim=1)  # (c, M+1, D)
        dot0 = torch.einsum("cd,cnd->cn", tf, v_hat)                     # ⟨t, v̂⟩      (c, Nv)
        dot_e = torch.einsum("cmd,cnd->cnm", eps, R * v_hat)             # Σ ε R v̂     (c, Nv, M)
        cross = torch.einsum("cmd,cnd->cnm", eps, R * tf[:, None, :])    # Σ ε R t     (c, Nv, M)
        sq = torch.einsum("cmd,cnd->cnm", eps.square(), R.square())      # Σ ε² R²     (c, Nv, M)
        norm2 = tf.square().sum(-1)[:, None, None] + 2 * cross + sq      # ‖t_s‖²      (c, Nv, M)
        cos = (dot0[..., None] + dot_e) / norm2.clamp_min(1e-24).sqrt()  # (c, Nv, M)
        return cos.amax(dim=-1)                                          # (c, Nv)

    def similarity(self, text: Features, video: Features) -> Tensor:
        t, f = self._check(text, video)                                  # (Nt, D), (Nv, T, D)
        self._check_text(text)
        c = self.cfg.sim_chunk
        kv = self.frame_kv(video, f)                                     # once per call (or prepared)
        f_unit = video["frames_unit"].to(f.dtype) if "frames_unit" in video else F.normalize(f, dim=-1)
        out = [self._chunk_similarity(t[s:s + c], text["key"][s:s + c], f, kv, f_unit)
               for s in range(0, t.shape[0], c)]
        return torch.cat(out) if out else t.new_zeros(0, f.shape[0])     # (Nt, Nv)

    # -- training ---------------------------------------------------------------------------------
    def loss(self, text: Features, video: Features) -> dict[str, Tensor]:
        t, f = self._check(text, video)                                  # (B, D), (B, T, D)
        if t.shape[0] != f.shape[0]:
            raise ValueError(f"TMass.loss needs paired batches, got {t.shape[0]} texts and {f.shape[0]} videos")
        pooled = self.pool(t, f)                                         # v_{j|i}  (B, B, D)
        cos_tf = torch.einsum("bd,bkd->bk", F.normalize(t, dim=-1),
                              F.normalize(f, dim=-1))                    # S_i      (B, T)
        R = self.radius(cos_tf)                                          # (B, D) or (B, 1)
        t_s = t + self._prior_like(tuple(t.shape), device=t.device).to(t.dtype) * R  # (B, D)
        loss_s = symmetric_ce(clip_logits(pair_cosine(t_s, pooled), self.backbone.logit_scale))
        if self.cfg.loss == "ce_s":                                      # Table 6a: L_ce + L_s
            loss_ce = symmetric_ce(clip_logits(pair_cosine(t, pooled), self.backbone.logit_scale))
            return {"loss": loss_ce + loss_s, "loss_ce": loss_ce.detach(), "loss_stochastic": loss_s.detach(),
                    "radius_mean": R.detach().mean()}
        if self.cfg.support_video == "text_mean":
            v_bar = pooled.mean(dim=0)                                   # mean over texts (B, D)
        else:
            v_bar = pooled.diagonal(dim1=0, dim2=1).t()                  # v_{i|i}  (B, D)
        t_sup = t + F.normalize(v_bar - t, dim=-1) * R                   # (B, D)
        loss_sup = symmetric_ce(clip_logits(pair_cosine(t_sup, pooled), self.backbone.logit_scale))
        return {"loss": loss_s + self.cfg.support_weight * loss_sup,
                "loss_stochastic": loss_s.detach(), "loss_support": loss_sup.detach(),
                "radius_mean": R.detach().mean()}


SPEC = MethodSpec(name="tmass", config_cls=TMassCfg, build=TMass,
                  summary="T-MASS stochastic text embeddings with similarity-aware radius on X-Pool (Wang et al. 2024)")
