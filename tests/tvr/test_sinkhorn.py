"""Sinkhorn-Knopp normalisation (tvr.sinkhorn) against a float64 linear-space re-computation."""

from __future__ import annotations

import math

import pytest
import torch

from tvr.sinkhorn import sinkhorn_log_potentials, sinkhorn_log_potentials_reference, sinkhorn_normalise


def reference_sk(S: torch.Tensor, n_iter: int, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain loops in float64, linear space (as the official ``sinkhorn_knopp``): returns a, b and
    the balanced plan P = diag(a) K diag(b), with K = exp(S/τ - max)."""
    S = S.double()
    n_t, n_v = S.shape
    mx = max(float(S[i, j]) for i in range(n_t) for j in range(n_v)) / tau
    K = [[math.exp(float(S[i, j]) / tau - mx) for j in range(n_v)] for i in range(n_t)]
    b = [1.0 / sum(K[i][j] for i in range(n_t)) for j in range(n_v)]
    a = [1.0] * n_t
    for _ in range(n_iter):
        a = [1.0 / sum(K[i][j] * b[j] for j in range(n_v)) for i in range(n_t)]
        b = [1.0 / sum(a[i] * K[i][j] for i in range(n_t)) for j in range(n_v)]
    P = torch.tensor([[a[i] * K[i][j] * b[j] for j in range(n_v)] for i in range(n_t)], dtype=torch.float64)
    # express b for the kernel exp(S/τ) without the max shift: b_true = b · exp(-mx)
    log_b = torch.tensor(b, dtype=torch.float64).log() - mx
    return torch.tensor(a, dtype=torch.float64), log_b, P


@pytest.mark.parametrize("n_iter", [1, 4, 9])
def test_matches_linear_space_reference(n_iter):
    g = torch.Generator().manual_seed(0)
    S = torch.rand(5, 7, generator=g, dtype=torch.float64) * 2 - 1
    tau = 0.2
    _, _, P = reference_sk(S, n_iter, tau)
    out = sinkhorn_normalise(S, n_iter, temperature=tau)
    torch.testing.assert_close(out, tau * P.log(), rtol=0, atol=1e-10)


def test_video_marginals_exact_and_text_marginals_converge():
    g = torch.Generator().manual_seed(1)
    S = torch.randn(12, 12, generator=g, dtype=torch.float64)
    tau = 0.5
    errs = []
    for n_iter in (1, 4, 16, 64):
        P = (sinkhorn_normalise(S, n_iter, temperature=tau) / tau).exp()
        # every video's mass over all texts is exactly balanced after any n_iter >= 1
        torch.testing.assert_close(P.sum(dim=0), torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-12)
        errs.append(float((P.sum(dim=1) - 1).abs().max()))
    assert errs[0] > 1e-3                      # one iteration is not yet balanced on the rows
    assert errs == sorted(errs, reverse=True)  # row marginals improve monotonically here
    assert errs[-1] < 1e-8


def test_zero_iterations_is_identity():
    S = torch.randn(3, 4)
    assert sinkhorn_normalise(S, 0, temperature=0.01) is S


def test_invariant_to_constant_and_per_video_offsets_not_to_scale():
    g = torch.Generator().manual_seed(2)
    S = torch.randn(6, 9, generator=g, dtype=torch.float64)
    tau = 0.3
    base = sinkhorn_normalise(S, 4, temperature=tau)
    # S + c (kernel times a constant): unchanged
    torch.testing.assert_close(sinkhorn_normalise(S + 7.5, 4, temperature=tau), base, rtol=0, atol=1e-10)
    # S + c_j per video (column scaling of the kernel): unchanged
    c = torch.randn(1, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sinkhorn_normalise(S + c, 4, temperature=tau), base, rtol=0, atol=1e-10)
    # multiplying S changes the temperature: not an invariance
    assert not torch.allclose(sinkhorn_normalise(2 * S, 4, temperature=tau), 2 * base, atol=1e-3)


def test_t2v_ranking_equals_official_video_bias():
    g = torch.Generator().manual_seed(3)
    S = torch.randn(8, 6, generator=g, dtype=torch.float64)
    tau = 0.1
    _, log_b, _ = reference_sk(S, 4, tau)
    official = S / tau + torch.log_softmax(log_b, dim=0)[None, :]   # sim + video_bias (logit units)
    ours = sinkhorn_normalise(S, 4, temperature=tau)
    # per row the two differ by a constant (τ·log a_i and the log_softmax shift)
    diff = ours / tau - official
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), rtol=0, atol=1e-9)


def test_bank_form_matches_official():
    g = torch.Generator().manual_seed(4)
    bank = torch.randn(10, 5, generator=g, dtype=torch.float64)
    S = torch.randn(3, 5, generator=g, dtype=torch.float64)
    tau = 0.25
    _, log_b, _ = reference_sk(bank, 4, tau)
    expected = S + tau * torch.log_softmax(log_b, dim=0)[None, :]
    torch.testing.assert_close(sinkhorn_normalise(S, 4, temperature=tau, bank=bank), expected,
                               rtol=0, atol=1e-10)


def test_log_space_is_stable_at_low_temperature():
    g = torch.Generator().manual_seed(5)
    S = torch.rand(20, 30, generator=g) * 2 - 1        # cosines
    out = sinkhorn_normalise(S, 4, temperature=1 / 1000)  # |S/τ| up to 1000: exp under/overflows
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    col = torch.logsumexp(out.double() * 1000, dim=0)
    torch.testing.assert_close(col, torch.zeros(30, dtype=torch.float64), rtol=0, atol=1e-3)


def test_potentials_shapes_and_errors():
    log_a, log_b = sinkhorn_log_potentials(torch.zeros(3, 5), 2)
    assert log_a.shape == (3,) and log_b.shape == (5,)
    with pytest.raises(ValueError, match="n_iter"):
        sinkhorn_log_potentials(torch.zeros(3, 5), 0)
    with pytest.raises(ValueError, match="n_iter"):
        sinkhorn_normalise(torch.zeros(3, 5), -1)
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_normalise(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="inf/NaN"):
        sinkhorn_normalise(torch.tensor([[0.0, float("-inf")]]), 2)
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_normalise(torch.zeros(2, 2), 2, temperature=0.0)
    with pytest.raises(ValueError, match="bank has 4 videos"):
        sinkhorn_normalise(torch.zeros(2, 3), 2, bank=torch.zeros(5, 4))


@pytest.mark.parametrize("case", ["cosines", "text_offsets", "dead_video", "dead_text"])
def test_fast_potentials_equal_log_space_reference_in_fp32(case):
    """The mat-vec SK (per-row shifted kernel, log-space redo of underflowing sums) against the
    straightforward log-space loop in float64: scores S' to 1e-6 in S units, fp32 input, τ = 0.01,
    including matrices whose fp32 kernel has whole rows / columns below exp's range."""
    g = torch.Generator().manual_seed(7)
    S = torch.rand(37, 23, generator=g) * 0.8 - 0.3
    if case == "text_offsets":
        S = S - torch.rand(37, 1, generator=g) * 3.0            # up to 300 nats between texts
    elif case == "dead_video":
        S[:, 5] -= 1.5                                           # 150 nats below every text's best
    elif case == "dead_text":
        S[4] -= 2.0
    tau = 0.01
    for bank in (None, S + 0.01 * torch.randn(S.shape, generator=g)):
        out = sinkhorn_normalise(S, 4, temperature=tau, bank=bank)
        ref = sinkhorn_normalise(S.double(), 4, temperature=tau, bank=None if bank is None else bank.double())
        la, lb = sinkhorn_log_potentials_reference((S if bank is None else bank).double() / tau, 4)
        if bank is None:
            ref2 = S.double() + tau * (la[:, None] + lb[None, :])
        else:
            ref2 = S.double() + tau * torch.log_softmax(lb, dim=0)[None, :]
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref2, rtol=0, atol=1e-6)
        torch.testing.assert_close(ref, ref2, rtol=0, atol=1e-9)
    la, lb = sinkhorn_log_potentials(S / tau, 4)
    ra, rb = sinkhorn_log_potentials_reference(S.double() / tau, 4)
    torch.testing.assert_close(la.double(), ra, rtol=1e-6, atol=1e-4)   # potentials of ~100 nats
    torch.testing.assert_close(lb.double(), rb, rtol=1e-6, atol=1e-4)
