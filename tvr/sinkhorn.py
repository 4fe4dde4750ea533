"""Sinkhorn-Knopp (SK) normalisation of a text x video similarity matrix (inference only).

UCoFIA (Wang et al., ICCV 2023, github.com/Ziyang412/UCoFiA, ``sinkhorn_knopp`` in
``eval_t2v/main_ucofia.py``) balances each granularity's similarity matrix before summing them, so
that no video is over- or under-represented across the text queries. Any method (and
``tvr eval --sk``) may apply it to a full (N_t, N_v) matrix.

Form (with S (N_t, N_v) similarities and a temperature τ):

    K = exp(S / τ)                                               the Gibbs kernel
    b⁽⁰⁾ = 1 / (1ᵀ K)                                            (N_v,)  column normalisation
    repeat n_iter times:
        a = 1 / (K b)                                            (N_t,)  rows sum to 1
        b = 1 / (Kᵀ a)                                           (N_v,)  columns sum to 1
    P = diag(a) K diag(b)                                        the balanced "transport plan"

every iteration is a linear-space mat-vec on the kernel exponentiated once with per-row max
shifts, with the potentials max-shifted and kept as logs; any row or column sum that could have
underflowed is redone in log-space (``logsumexp``). So S/τ of a few hundred neither overflows nor
underflows (the official code works in linear space after subtracting the global max S, where
fp32 flushes every entry more than ~103 below it to zero), at the official loop's speed
(``benchmarks/bench_sinkhorn.py``).

:func:`sinkhorn_normalise` returns τ·log P, in the units of S:

    S'_ij = S_ij + τ·log a_i + τ·log b_j

- Marginals: the last update is on b, so every video's column of P = exp(S'/τ) sums to exactly 1
  (each video gets the same total mass over all texts); the rows sum to 1 only in the limit
  n_iter → ∞ (they converge geometrically for a strictly positive kernel).
- Ranking: within a row (text → video) τ·log a_i is constant, so the text → video ranking of S'
  equals that of S_ij + τ·log b_j — exactly the official ``sim + video_bias`` (the official
  ``log_softmax`` on log b only adds a constant). Within a column (video → text) the ranking of S'
  is that of S_ij + τ·log a_i, the symmetric text bias.
- Invariances (exact, for every n_iter ≥ 1): adding a constant to S (multiplying the kernel K by a
  constant) leaves S' unchanged, and so does adding any per-video offset c_j to column j (a
  column scaling of K is absorbed by b⁽⁰⁾). Per-text offsets are absorbed only in the limit.
  Multiplying S by a constant is NOT an invariance: that changes the temperature.
- ``n_iter = 0`` turns SK off and returns ``sims`` unchanged. ``n_iter`` counts the (a, b) update
  pairs after the initial column normalisation, exactly the official ``n_iters`` (default 4).

The official evaluation does not normalise the test matrix with itself: it runs SK on a *bank*
matrix (all training captions x test videos) and adds the resulting video bias
τ·log_softmax(log b) to the test scores (and, for video → text, the text bias from test texts x
training videos). ``bank=`` reproduces that form; without a bank the evaluated matrix is its own
bank (transductive, the usual choice when no training captions are at hand).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(sims: Tensor, name: str) -> None:
    if sims.ndim != 2 or sims.shape[0] == 0 or sims.shape[1] == 0:
        raise ValueError(f"sinkhorn_normalise: {name} must be a non-empty 2-D (N_text, N_video) matrix, "
                         f"got shape {tuple(sims.shape)}")
    if not torch.isfinite(sims).all():
        raise ValueError(f"sinkhorn_normalise: {name} contains inf/NaN; SK needs finite similarities "
                         "(mask invalid pairs by removing them, not with -inf)")


def _lse(E: Tensor, shift: Tensor, log_kernel: Tensor, pot: Tensor, dim: int) -> tuple[Tensor, int]:
    """log Σ_k exp(L + pot) along ``dim`` (1: over videos, per text; 0: over texts, per video) in
    linear space: with E = exp(L - shift) (shift: per-text row maxima r), it is

        dim 1:  r_i + m + log Σ_j E_ij exp(β_j - m),          m = max β       (one mat-vec)
        dim 0:  m + log Σ_i E_ij exp(r_i + α_i - m),          m = max(r + α)

    A sum below ``n · 2⁻⁸⁰`` (terms may have underflowed: fp32 exp flushes below e⁻¹⁰³) is
    recomputed in log space for that row / column, so the result is the log-space one to rounding.
    Returns (the log-sums, how many were recomputed).
    """
    n = E.shape[dim]
    if dim == 1:
        m = pot.max()
        s = E @ torch.exp(pot - m)                                               # (N_t,)
        out = shift + m + torch.log(s)
    else:
        g = shift + pot
        m = g.max()
        s = torch.exp(g - m) @ E                                                 # (N_v,)
        out = m + torch.log(s)
    bad = ~(s > n * 2.0 ** -80)                                                  # tiny, zero or NaN
    n_bad = int(bad.sum())
    if n_bad:
        if dim == 1:
            out[bad] = torch.logsumexp(log_kernel[bad] + pot[None, :], dim=1)
        else:
            out[bad] = torch.logsumexp(log_kernel[:, bad] + pot[:, None], dim=0)
    return out, n_bad


class _Kernel:
    """The log-kernel with absorbed potentials, L̃ = L + α̂ ⊕ β̂, and E = exp(L̃ - r), r = rowmax L̃."""

    def __init__(self, log_kernel: Tensor):
        self.L = log_kernel
        self.base_a = torch.zeros(log_kernel.shape[0], dtype=log_kernel.dtype, device=log_kernel.device)
        self.base_b = torch.zeros(log_kernel.shape[1], dtype=log_kernel.dtype, device=log_kernel.device)
        self.absorb(self.base_a, self.base_b, first=True)

    def absorb(self, log_a: Tensor, log_b: Tensor, first: bool = False) -> None:
        """Move the current potentials into the kernel, so later updates are small and stay in
        exp's range (log-domain absorption); exact: only the split between kernel and potentials moves."""
        if not first:
            self.L = self.L + (log_a - self.base_a)[:, None] + (log_b - self.base_b)[None, :]
            self.base_a, self.base_b = log_a.clone(), log_b.clone()
        self.r = self.L.amax(dim=1)                                              # (N_t,)
        self.E = (self.L - self.r[:, None]).exp_()                               # (N_t, N_v)

    def lse(self, pot: Tensor, dim: int) -> Tensor:
        """log Σ exp(L + pot) along dim for the ORIGINAL kernel L; absorbs when many sums underflowed."""
        base_pot, base_out = (self.base_b, self.base_a) if dim == 1 else (self.base_a, self.base_b)
        out, n_bad = _lse(self.E, self.r, self.L, pot - base_pot, dim)
        return out - base_out, n_bad


def sinkhorn_log_potentials(log_kernel: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
    """SK on K = exp(log_kernel) (N_t, N_v) -> (log a (N_t,), log b (N_v,)).

    ``n_iter`` ≥ 1 (a, b) update pairs after b⁽⁰⁾ = 1 / colsum(K) (module docstring). The kernel is
    exponentiated once, per-row max-shifted (E = exp(L - r), every row's largest entry 1), and each
    update is one mat-vec with max-shifted potentials (as fast as the official linear-space loop).
    Rows / columns whose sums would underflow are redone in log space (:func:`_lse`); when more
    than 1/64 of an update needed that, the potentials are absorbed into the kernel (re-shifted
    and exponentiated again), so S/τ of a few hundred neither overflows nor underflows and the
    result is :func:`sinkhorn_log_potentials_reference`'s to rounding.
    """
    if n_iter < 1:
        raise ValueError(f"sinkhorn_log_potentials: n_iter must be >= 1, got {n_iter}")
    k = _Kernel(log_kernel)
    log_a = torch.zeros_like(k.base_a)
    out, n_bad = k.lse(log_a, dim=0)
    log_b = -out                                                                 # (N_v,)
    for _ in range(n_iter):
        if n_bad * 64 > out.numel():
            k.absorb(log_a, log_b)
        out, n_bad = k.lse(log_b, dim=1)
        log_a = -out                                                             # (N_t,)
        if n_bad * 64 > out.numel():
            k.absorb(log_a, log_b)
        out, n_bad = k.lse(log_a, dim=0)
        log_b = -out                                                             # (N_v,)
    return log_a, log_b


def sinkhorn_log_potentials_reference(log_kernel: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
    """The straightforward log-space iteration (``logsumexp`` over the whole kernel at every update):
    what :func:`sinkhorn_log_potentials` computes, kept as its reference (tests, benchmarks)."""
    if n_iter < 1:
        raise ValueError(f"sinkhorn_log_potentials: n_iter must be >= 1, got {n_iter}")
    log_b = -torch.logsumexp(log_kernel, dim=0)                                  # (N_v,)
    log_a = torch.zeros(log_kernel.shape[0], dtype=log_kernel.dtype, device=log_kernel.device)
    for _ in range(n_iter):
        log_a = -torch.logsumexp(log_kernel + log_b[None, :], dim=1)             # (N_t,)
        log_b = -torch.logsumexp(log_kernel + log_a[:, None], dim=0)             # (N_v,)
    return log_a, log_b


def sinkhorn_normalise(sims: Tensor, n_iter: int, *, temperature: float | Tensor = 1.0,
                       bank: Tensor | None = None) -> Tensor:
    """SK-normalise a full similarity matrix ``sims`` (N_t, N_v) -> (N_t, N_v), same units and dtype.

    Without ``bank``: returns τ·log P = S + τ·log a + τ·log b, with P the SK-balanced plan of
    exp(S/τ) (columns of exp(S'/τ) sum to 1). With ``bank`` (N_bank, N_v), e.g. training captions
    x the same videos (the official UCoFIA evaluation): the video potentials come from the bank
    and only the video bias is added, S' = S + τ·log_softmax(log b).

    ``temperature`` τ > 0: for similarities in cosine units use CLIP's 1 / exp(logit_scale).
    ``n_iter = 0`` returns ``sims`` itself (SK off). Runs in float32 (float64 if ``sims`` is).
    """
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"sinkhorn_normalise: n_iter must be an int >= 0 (0 = off), got {n_iter!r}")
    if n_iter == 0:
        return sims
    _check(sims, "sims")
    tau = float(temperature)
    if not tau > 0.0:
        raise ValueError(f"sinkhorn_normalise: temperature must be > 0, got {tau}")
    work = torch.float64 if sims.dtype == torch.float64 else torch.float32
    s = sims.to(work)                                                            # (N_t, N_v)
    if bank is None:
        log_k = s / tau                                                          # (N_t, N_v)
        log_a, log_b = sinkhorn_log_potentials(log_k, n_iter)                    # (N_t,), (N_v,)
        out = tau * (log_k + log_a[:, None] + log_b[None, :])                    # (N_t, N_v)
        return out.to(sims.dtype)
    _check(bank, "bank")
    if bank.shape[1] != sims.shape[1]:
        raise ValueError(f"sinkhorn_normalise: bank has {bank.shape[1]} videos (columns) but sims has "
                         f"{sims.shape[1]}; the bank must score the same videos")
    _, log_b = sinkhorn_log_potentials(bank.to(device=s.device, dtype=work) / tau, n_iter)  # (N_v,)
    return (s + tau * F.log_softmax(log_b, dim=0)[None, :]).to(sims.dtype)      # (N_t, N_v)


__all__ = ["sinkhorn_log_potentials", "sinkhorn_log_potentials_reference", "sinkhorn_normalise"]
