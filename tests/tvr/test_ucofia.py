"""UCoFIA (tvr.methods.ucofia): ISA / Bi-ISA / perturbed top-K against float64 loop re-computations,
patch selection, blockwise scoring, SK combination, shapes and a short optimisation on tvr-tiny."""

from __future__ import annotations

import math

import pytest
import torch

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.methods.ucofia import (
    GRANULARITIES,
    SPEC,
    PatchSelector,
    UCoFIA,
    UCoFIACfg,
    bi_isa,
    hard_topk,
    isa,
    perturbed_topk,
)
from tvr.sinkhorn import sinkhorn_normalise

CAPTIONS = ["a dog runs on the beach", "a cat", "two people are dancing in a dark room at night",
            "a red car", "someone cooks pasta"]


# -- float64 references (plain Python loops over the paper's formulas) ---------------------------

def _softmax(vals: list[float]) -> list[float]:
    m = max(vals)
    e = [math.exp(v - m) for v in vals]
    z = sum(e)
    return [x / z for x in e]


def ref_isa(x: list[float], W, tau: float, mask: list[bool] | None = None) -> float:
    """a = softmax(x/τ); b = softmax(aW/τ); Σ b_i x_i, over the real entries only."""
    idx = [i for i in range(len(x)) if mask is None or mask[i]]
    a = dict(zip(idx, _softmax([x[i] / tau for i in idx])))
    mixed = [sum(a[i] * float(W[i][j]) for i in idx) / tau for j in idx]
    b = _softmax(mixed)
    return sum(bj * x[j] for bj, j in zip(b, idx))


def ref_bi_isa(M: list[list[float]], W1, W2, W3, W4, tau: float, mask: list[bool]) -> float:
    N, L = len(M), len(M[0])
    r = [ref_isa(M[n], W1, tau, mask) for n in range(N)]                # over words, per patch
    q = [ref_isa([M[n][w] for n in range(N)], W2, tau) for w in range(L)]  # over patches, per word
    return 0.5 * (ref_isa(r, W3, tau) + ref_isa(q, W4, tau, mask))


def _tolist(t: torch.Tensor):
    return t.double().tolist()


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return ClipBackbone(BackboneCfg(name="tvr-tiny"))


def _model(backbone, **kw) -> UCoFIA:
    torch.manual_seed(1)
    cfg = UCoFIACfg(**{"max_frames": 4, "temporal_layers": 1, "topk_samples": 50, **kw})
    return UCoFIA(cfg, backbone).eval()


def _perturb_mats(model: UCoFIA, seed: int = 7) -> None:
    """Move the identity-initialised matrices away from I so the references exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("sentence_mat", "video_mat", "word_mat", "patch_mat", "frame_isa", "word_isa",
                     "patch_isa", "patch_isa_across", "word_isa_across"):
            p = getattr(model, name)
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _frames(n: int, T: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, T, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- ISA / Bi-ISA --------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.5, 0.01])
def test_isa_matches_reference(tau):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 6, generator=g, dtype=torch.float64) * 2 - 1
    W = torch.eye(8, dtype=torch.float64) + 0.5 * torch.randn(8, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False], [True, False, True, True, False, True]])
    got = isa(x, W, tau)
    got_m = isa(x, W, tau, mask)
    for r in range(3):
        assert got[r].item() == pytest.approx(ref_isa(_tolist(x[r]), _tolist(W[:6, :6]), tau), abs=1e-10)
        assert got_m[r].item() == pytest.approx(
            ref_isa(_tolist(x[r]), _tolist(W[:6, :6]), tau, mask[r].tolist()), abs=1e-10)


def test_bi_isa_matches_reference_with_word_mask():
    g = torch.Generator().manual_seed(1)
    N, L = 5, 7
    M = torch.rand(2, N, L, generator=g, dtype=torch.float64) * 2 - 1
    Ws = [torch.eye(n, dtype=torch.float64) + 0.4 * torch.randn(n, n, generator=g, dtype=torch.float64)
          for n in (L, N, N, L)]
    mask = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
    tau = 0.05
    got = bi_isa(M, *Ws, tau, mask)
    for b in range(2):
        want = ref_bi_isa(_tolist(M[b]), *[_tolist(W) for W in Ws], tau, mask[b].tolist())
        assert got[b].item() == pytest.approx(want, abs=1e-10)
    # the padded words do not matter at all
    M2 = M.clone()
    M2[0, :, 4:] = 5.0
    torch.testing.assert_close(bi_isa(M2, *Ws, tau, mask)[0], got[0], rtol=0, atol=1e-12)


def test_isa_and_bi_isa_gradients():
    g = torch.Generator().manual_seed(5)
    M = (torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    Ws = [(torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64)
           ).requires_grad_() for n in (4, 3, 3, 4)]
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    assert torch.autograd.gradcheck(lambda m, *w: bi_isa(m, *w, 0.5, mask), (M, *Ws))
    x = torch.rand(3, 5, generator=g, dtype=torch.float64).requires_grad_()
    W = torch.randn(5, 5, generator=g, dtype=torch.float64).requires_grad_()
    xmask = torch.tensor([[True] * 5, [True, False, True, False, True], [False, True, True, True, True]])
    assert torch.autograd.gradcheck(lambda x, w: isa(x, w, 0.3, xmask), (x, W))


# -- top-K selection -----------------------------------------------------------------------------

def test_perturbed_topk_forward_and_gradient_match_reference():
    g = torch.Generator().manual_seed(2)
    Mr, P, K, S, sigma = 3, 6, 2, 40, 0.3
    x = torch.randn(Mr, P, generator=g, dtype=torch.float64, requires_grad=True)
    Z = torch.randn(Mr, S, P, generator=g, dtype=torch.float64)
    G = torch.randn(Mr, K, P, generator=g, dtype=torch.float64)
    y = perturbed_topk(x, K, num_samples=S, sigma=sigma, noise=Z, backward="full")
    (y * G).sum().backward()
    x_off = x.detach().clone().requires_grad_(True)
    (perturbed_topk(x_off, K, num_samples=S, sigma=sigma, noise=Z) * G).sum().backward()   # default
    want_y = torch.zeros(Mr, K, P, dtype=torch.float64)
    want_grad = torch.zeros(Mr, P, dtype=torch.float64)
    want_official = torch.zeros(Mr, P, dtype=torch.float64)
    for m in range(Mr):
        for s in range(S):
            pert = [float(x.detach()[m, d] + sigma * Z[m, s, d]) for d in range(P)]
            top = sorted(sorted(range(P), key=lambda d: -pert[d])[:K])   # top-K set, ascending index
            onehot = torch.zeros(K, P, dtype=torch.float64)
            for k, d in enumerate(top):
                onehot[k, d] = 1.0
            want_y[m] += onehot / S
            # ∂L/∂x ≈ E[<G, onehot> Z] / σ
            want_grad[m] += float((G[m] * onehot).sum()) * Z[m, s] / (S * sigma)
            # official (PerturbedTopKFuntion.backward): only ∂Y_kd/∂x_d, Σ_k G_kd onehot_kd Z_d / σ
            for d in range(P):
                want_official[m, d] += sum(float(G[m, k, d] * onehot[k, d]) for k in range(K)) \
                    * float(Z[m, s, d]) / (S * sigma)
    torch.testing.assert_close(y.detach(), want_y, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, want_grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(x_off.grad, want_official, rtol=0, atol=1e-10)
    assert (x_off.grad - x.grad).abs().max() > 1e-3                     # the two estimators differ
    torch.testing.assert_close(y.detach().sum(-1), torch.ones(Mr, K, dtype=torch.float64))
    # in the noise-free limit it is the hard top-K
    y0 = perturbed_topk(x.detach(), K, num_samples=5, sigma=1e-9)
    torch.testing.assert_close(y0, hard_topk(x.detach(), K))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_patch_selector_keeps_exactly_k_per_frame(k):
    torch.manual_seed(0)
    B, T, P, D = 2, 3, 9, 16
    sel = PatchSelector(dim=D, topk=k, video_context=True, num_samples=20, sigma=0.05)
    cls, patches = torch.randn(B, T, D), torch.randn(B, T, P, D)
    sel.eval()
    selected, ind = sel(cls, patches)
    assert selected.shape == (B, T, k, D) and ind.shape == (B, T, k, P)
    scores = sel.scores(cls, patches)
    for b in range(B):
        for t in range(T):
            idx = ind[b, t].argmax(dim=-1).tolist()
            assert ind[b, t].sum() == k and len(set(idx)) == k and idx == sorted(idx)
            assert set(idx) == set(scores[b, t].topk(k).indices.tolist())
            torch.testing.assert_close(selected[b, t], patches[b, t, idx])
    sel.train()
    selected, ind = sel(cls, patches)
    assert selected.shape == (B, T, k, D)
    torch.testing.assert_close(ind.sum(-1), torch.ones(B, T, k))   # each slot a convex combination


def test_selection_is_differentiable_in_training(backbone):
    model = _model(backbone).train()
    ids = backbone.tokenize(CAPTIONS[:3])
    out = model.loss(model.encode_text(ids), model.encode_video(_frames(3, 2)))
    out["loss"].backward()
    grads = [p.grad for p in model.selector.parameters()]
    assert all(gr is not None for gr in grads) and sum(float(gr.abs().sum()) for gr in grads) > 0
    model.zero_grad(set_to_none=True)


# -- the method ----------------------------------------------------------------------------------

def test_shapes_with_tvr_tiny(backbone):
    model = _model(backbone, topk=3)
    B, T = 3, 4
    with torch.no_grad():
        t = model.encode_text(backbone.tokenize(CAPTIONS[:B]))
        v = model.encode_video(_frames(B, T))
    D, L = backbone.embed_dim, backbone.context_length
    assert t["sentence"].shape == (B, D) and t["words"].shape == (B, L, D) and t["word_mask"].shape == (B, L)
    assert v["video"].shape == (B, D) and v["frames"].shape == (B, T, D)
    assert v["patches"].shape == (B, T * 4, D)                       # (K + CLS) tokens per frame
    # the first token of every frame is the frame's CLS feature
    torch.testing.assert_close(v["patches"].view(B, T, 4, D)[:, :, 0], v["frames"])
    with torch.no_grad():
        sims = model.granularity_similarities(t, v)
        assert set(sims) == set(GRANULARITIES)
        assert all(s.shape == (B, B) for s in sims.values())
        assert model.similarity(t, v).shape == (B, B)
        out = model.loss(t, v)
    assert out["loss"].ndim == 0 and {f"ce_{g}" for g in GRANULARITIES} <= set(out)


def test_similarity_matches_reference_formulas(backbone):
    model = _model(backbone, topk=2)
    _perturb_mats(model)
    tau = model.cfg.isa_temperature
    with torch.no_grad():
        t = model.encode_text(backbone.tokenize(CAPTIONS[:3]))
        v = model.encode_video(_frames(2, 3))
        got = model.granularity_similarities(t, v)
    A, Bm, C, E = (_tolist(getattr(model, n)) for n in ("sentence_mat", "video_mat", "word_mat", "patch_mat"))
    T, N, L = 3, 3 * 3, backbone.context_length

    def mat(vec, W):  # row vector @ W
        return [sum(vec[i] * W[i][j] for i in range(len(vec))) for j in range(len(W[0]))]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    for i in range(3):
        s = _tolist(t["sentence"][i])
        words = [mat(_tolist(t["words"][i, w]), C) for w in range(L)]
        mask = (t["word_mask"][i] > 0.5).tolist()
        for j in range(2):
            vs = dot(mat(s, A), mat(_tolist(v["video"][j]), Bm))
            c = [dot(s, _tolist(v["frames"][j, k])) for k in range(T)]
            fs = ref_isa(c, _tolist(model.frame_isa[:T, :T]), tau)
            u = [mat(_tolist(v["patches"][j, n]), E) for n in range(N)]
            Mx = [[dot(words[w], u[n]) for w in range(L)] for n in range(N)]
            pw = ref_bi_isa(Mx, _tolist(model.word_isa), _tolist(model.patch_isa[:N, :N]),
                            _tolist(model.patch_isa_across[:N, :N]), _tolist(model.word_isa_across),
                            tau, mask)
            assert got["video_sentence"][i, j].item() == pytest.approx(vs, abs=1e-5)
            assert got["frame_sentence"][i, j].item() == pytest.approx(fs, abs=1e-5)
            assert got["patch_word"][i, j].item() == pytest.approx(pw, abs=1e-4)


def test_blockwise_scores_equal_full_computation(backbone, monkeypatch):
    full_model = _model(backbone, chunk_size=64)
    _perturb_mats(full_model)
    chunked = _model(backbone, chunk_size=2)
    chunked.load_state_dict(full_model.state_dict())
    with torch.no_grad():
        t = full_model.encode_text(backbone.tokenize(CAPTIONS))          # 5 texts, varied lengths
        v = full_model.encode_video(_frames(7, 3))                        # 7 videos
        full = full_model.granularity_similarities(t, v)
        tiled = chunked.granularity_similarities(t, v)
        for g in GRANULARITIES:
            torch.testing.assert_close(tiled[g], full[g], rtol=0, atol=1e-6)
        # evaluation blocks of the platform: arbitrary slices of texts and videos
        S = full_model.similarity(t, v)
        ts, vs = slice(1, 4), slice(2, 7)
        block = chunked.similarity({k: x[ts] for k, x in t.items()}, {k: x[vs] for k, x in v.items()})
        torch.testing.assert_close(block, S[ts, vs], rtol=0, atol=1e-6)
        assert torch.equal(full_model.similarity(t, v), S)               # deterministic
        # tiles sized from a memory budget, written into preallocated outputs: the same scores
        from tvr.methods import ucofia

        N, L = v["patches"].shape[1], int((t["word_mask"] > 0.5).any(0).nonzero().max()) + 1
        side = ucofia.tile_side(1, N, L)
        assert ucofia.TILE_TEMPS * side ** 2 * N * L * 4 <= 2**20 < ucofia.TILE_TEMPS * (side + 1) ** 2 * N * L * 4
        budgeted = _model(backbone, chunk_size=2, tile_mib=1)
        budgeted.load_state_dict(full_model.state_dict())
        for temps in (ucofia.TILE_TEMPS, 10**9):                          # one tile for all / 1 x 1 tiles
            monkeypatch.setattr(ucofia, "TILE_TEMPS", temps)
            got = budgeted.granularity_similarities(t, v)
            for g in GRANULARITIES:
                torch.testing.assert_close(got[g], full[g], rtol=0, atol=1e-6)
        assert ucofia.tile_side(1, N, L) == 1

def test_word_padding_is_ignored(backbone):
    model = _model(backbone)
    with torch.no_grad():
        t = model.encode_text(backbone.tokenize(CAPTIONS[:2]))
        v = model.encode_video(_frames(2, 2))
        S = model.similarity(t, v)
        n_real = int(t["word_mask"][1].sum())
        t2 = dict(t, words=t["words"].clone())
        t2["words"][1, n_real:] = torch.randn_like(t2["words"][1, n_real:])  # padded positions
        torch.testing.assert_close(model.similarity(t2, v), S, rtol=0, atol=1e-6)
        t2["words"][1, :n_real] = -t2["words"][1, :n_real]                    # the real words
        assert not torch.allclose(model.similarity(t2, v)[1], S[1], atol=1e-6)


def test_combine_applies_sinkhorn_per_granularity(backbone):
    model = _model(backbone, sinkhorn_iters=3)
    with torch.no_grad():
        t = model.encode_text(backbone.tokenize(CAPTIONS))
        v = model.encode_video(_frames(5, 2))
        sims = model.granularity_similarities(t, v)
        tau = 1.0 / min(100.0, math.exp(float(model.backbone.logit_scale)))
        expected = sum(sinkhorn_normalise(sims[g], 3, temperature=tau) for g in GRANULARITIES) / 3
        torch.testing.assert_close(model.combine(sims), expected)
        torch.testing.assert_close(model.combine(sims, sinkhorn_iters=0), model.similarity(t, v))
        # every granularity's video marginals over all texts are balanced before the average
        for g in GRANULARITIES:
            col = (sinkhorn_normalise(sims[g], 3, temperature=tau).double() / tau).exp().sum(0)
            torch.testing.assert_close(col, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-4)
        with pytest.raises(KeyError, match="patch_word"):
            model.combine({g: sims[g] for g in GRANULARITIES[:2]})


def test_optimisation_reduces_loss():
    torch.manual_seed(0)
    bb = ClipBackbone(BackboneCfg(name="tvr-tiny"))
    model = UCoFIA(UCoFIACfg(max_frames=3, temporal_layers=1, topk_samples=20), bb).train()
    ids = bb.tokenize(CAPTIONS[:4])
    frames = _frames(4, 3, seed=11)
    opt = torch.optim.Adam(model.param_groups(lr=1e-3, backbone_lr=1e-3, weight_decay=0.0))
    losses = []
    for _ in range(15):
        loss = model.loss(model.encode_text(ids), model.encode_video(frames))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_config_validation_and_spec(backbone):
    for bad in ({"topk": 0}, {"max_frames": 0}, {"isa_temperature": 0.0}, {"topk_sigma": -1.0},
                {"sinkhorn_iters": -1}, {"chunk_size": 0}, {"temporal_layers": 1.5}, {"topk_samples": True}):
        with pytest.raises(ValueError, match="model.ucofia." + next(iter(bad))):
            UCoFIACfg(**bad)
    with pytest.raises(TypeError):
        UCoFIACfg(3)  # keyword-only
    assert UCoFIACfg().tokens_per_frame == 4 and UCoFIACfg(keep_cls_token=False).tokens_per_frame == 3
    assert SPEC.name == "ucofia" and SPEC.config_cls is UCoFIACfg
    model = SPEC.build(UCoFIACfg(temporal_layers=0), backbone)
    assert isinstance(model, UCoFIA) and model.temporal is None
    names = {g["name"] for g in model.param_groups(1e-4, 1e-7, 0.2)}
    assert {"backbone", "head"} <= names


def test_bad_inputs_name_the_field(backbone):
    model = _model(backbone, max_frames=2)
    with pytest.raises(ValueError, match="max_frames"):
        model.encode_video(_frames(1, 3))
    too_many = _model(backbone, topk=17)   # tvr-tiny has 16 patches per frame
    with pytest.raises(ValueError, match="topk=17"):
        too_many.encode_video(_frames(1, 2))


def test_checkpointed_tiles_give_the_same_loss_and_gradients(backbone):
    plain = _model(backbone, chunk_size=2)
    _perturb_mats(plain)
    ckpt = _model(backbone, chunk_size=2, checkpoint_tiles=True)
    ckpt.load_state_dict(plain.state_dict())
    ids = backbone.tokenize(CAPTIONS[:3])
    frames = _frames(3, 2)
    grads = []
    for model in (plain, ckpt):   # eval mode: hard top-K, so both see identical features
        model.zero_grad(set_to_none=True)
        loss = model.loss(model.encode_text(ids), model.encode_video(frames))["loss"]
        loss.backward()
        grads.append((loss.detach(), model.word_isa.grad.clone(), model.patch_isa.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain.zero_grad(set_to_none=True)
    ckpt.zero_grad(set_to_none=True)


# -- ablations from config -----------------------------------------------------------------------

def ref_aggregate(x: list[float], W, tau: float, mode: str, mask: list[bool] | None = None) -> float:
    idx = [i for i in range(len(x)) if mask is None or mask[i]]
    if mode == "isa":
        return ref_isa(x, W, tau, mask)
    if mode == "mean":
        return sum(x[i] for i in idx) / len(idx)
    a = _softmax([x[i] / tau for i in idx])
    return sum(ai * x[i] for ai, i in zip(a, idx))


def ref_bi(M, W1, W2, W3, W4, tau: float, mask: list[bool], mode: str, order: str) -> float:
    N, L = len(M), len(M[0])
    r = [ref_aggregate(M[n], W1, tau, mode, mask) for n in range(N)]
    q = [ref_aggregate([M[n][w] for n in range(N)], W2, tau, mode) for w in range(L)]
    s_r, s_q = ref_aggregate(r, W3, tau, mode), ref_aggregate(q, W4, tau, mode, mask)
    return {"both": 0.5 * (s_r + s_q), "row": s_r, "column": s_q}[order]


@pytest.mark.parametrize("mode", ["isa", "mean", "softmax"])
@pytest.mark.parametrize("order", ["both", "row", "column"])
def test_aggregation_and_bi_isa_order_ablations_match_reference(mode, order):
    g = torch.Generator().manual_seed(5)
    N, L, tau = 5, 7, 0.2
    M = torch.randn(2, N, L, generator=g, dtype=torch.float64)
    W = [torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64)
         for n in (L, N, N, L)]
    mask = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
    got = bi_isa(M, *W, tau, mask, mode=mode, order=order)
    want = [ref_bi(_tolist(M[b]), *[_tolist(w) for w in W], tau, mask[b].tolist(), mode, order) for b in range(2)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-10)


def test_dropping_a_granularity_and_ablation_config(backbone):
    full = _model(backbone, topk=2)
    drop = _model(backbone, topk=2, granularities=["video_sentence", "frame_sentence"])
    drop.load_state_dict(full.state_dict())
    with torch.no_grad():
        t = full.encode_text(backbone.tokenize(CAPTIONS[:3]))
        v = full.encode_video(_frames(3, 4))
        all_sims = full.granularity_similarities(t, v)
        sims = drop.granularity_similarities(t, v)
        assert set(sims) == {"video_sentence", "frame_sentence"}
        torch.testing.assert_close(drop.similarity(t, v), (all_sims["video_sentence"] + all_sims["frame_sentence"]) / 2)
        assert set(drop.loss(t, v)) == {"loss", "ce_video_sentence", "ce_frame_sentence"}
        mean = _model(backbone, topk=2, aggregation="mean")
        mean.load_state_dict(full.state_dict())
        c = torch.einsum("ad,btd->abt", t["sentence"], v["frames"])
        torch.testing.assert_close(mean.granularity_similarities(t, v)["frame_sentence"], c.mean(-1))
    for bad in ({"granularities": []}, {"granularities": ["patch_word", "patch_word"]},
                {"granularities": ["pixels"]}, {"aggregation": "max"}, {"bi_isa_order": "diagonal"},
                {"topk_backward": "exact"}):
        with pytest.raises(ValueError, match=f"model.ucofia.{next(iter(bad))}"):
            UCoFIACfg(**bad)
