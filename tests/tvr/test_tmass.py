"""T-MASS: radius variants, stochastic / support text losses and the M-sample max inference, each
against a float64 loop re-computation of the official formulas; seed determinism, block invariance,
shapes with the tiny backbone and a short fit.

The X-Pool pooling v_{j|i} itself is verified against its own loop reference in test_xpool.py; here
the references take ``m.pool``'s output as given and re-compute everything T-MASS adds on top."""

from __future__ import annotations

import math

import pytest
import torch

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.methods.tmass import SPEC, TMass, TMassCfg, key_ints, token_keys

D = 32  # tvr-tiny embedding width


def keys_for(*tokens: int) -> torch.Tensor:
    """Distinct text keys (N, 8), as encode_text would give for one-token captions."""
    return token_keys(torch.tensor(tokens)[:, None])


@pytest.fixture(scope="module")
def backbone_state():
    torch.manual_seed(0)
    return ClipBackbone(BackboneCfg(name="tvr-tiny")).state_dict()


def make_method(backbone_state, **cfg) -> TMass:
    bb = ClipBackbone(BackboneCfg(name="tvr-tiny"))
    bb.load_state_dict(backbone_state)
    return TMass(TMassCfg(**cfg), bb)


def randomize_head(m: TMass, seed: int) -> None:
    """Move the pooling and radius parameters off their identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("backbone."):
                continue
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name == "radius_scale":
                p.fill_(0.7)
            elif "ln" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)


def cos_ref(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def radius_ref(m: TMass, S: list[float]) -> list[float]:
    """R as a list over D from the frame-text cosines S (T')."""
    if m.cfg.radius == "linear":
        W, b = m.radius_proj.weight.tolist(), m.radius_proj.bias.tolist()
        return [math.exp(sum(W[d][k] * S[k] for k in range(len(S))) + b[d]) for d in range(D)]
    theta = m.radius_scale.item() if m.cfg.radius == "scaled_mean" else 1.0
    return [math.exp(theta * sum(S) / len(S))] * D


def sym_ce_ref(S, scale):
    n = len(S)
    t2v = -sum(scale * S[i][i] - math.log(sum(math.exp(scale * x) for x in S[i])) for i in range(n)) / n
    v2t = -sum(scale * S[j][j] - math.log(sum(math.exp(scale * S[i][j]) for i in range(n)))
               for j in range(n)) / n
    return 0.5 * (t2v + v2t)


# -- config -----------------------------------------------------------------------------------------
def test_config_defaults_and_validation():
    cfg = TMassCfg()
    assert (cfg.radius, cfg.prior, cfg.num_samples, cfg.keep_mean, cfg.eval_seed) == \
        ("linear", "uniform01", 20, False, 24)
    assert (cfg.support_weight, cfg.num_heads, cfg.dropout) == (1.2, 1, 0.3)
    assert SPEC.name == "tmass" and SPEC.config_cls is TMassCfg and SPEC.build is TMass
    with pytest.raises(ValueError, match=r"radius='cosine'.*'mean', 'scaled_mean', 'linear'"):
        TMassCfg(radius="cosine")
    with pytest.raises(ValueError, match=r"prior='laplace'.*'uniform01', 'normal'"):
        TMassCfg(prior="laplace")
    with pytest.raises(ValueError, match=r"support_video.*'text_mean', 'paired'"):
        TMassCfg(support_video="x")
    for bad in ({"num_samples": 0}, {"num_frames": 0}, {"prior_std": 0.0}, {"support_weight": -1.0},
                {"eval_seed": -1}, {"dropout": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TMassCfg(**bad)


# -- radius -----------------------------------------------------------------------------------------
def test_linear_radius_official_identity_init(backbone_state):
    m = make_method(backbone_state, num_frames=4).double()
    S = torch.rand(3, 4, dtype=torch.float64) * 2 - 1
    R = m.radius(S)
    assert R.shape == (3, D)
    torch.testing.assert_close(R[:, :4], S.exp())
    torch.testing.assert_close(R[:, 4:], torch.ones(3, D - 4, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["mean", "scaled_mean", "linear"])
def test_radius_variants_match_reference(backbone_state, variant):
    m = make_method(backbone_state, radius=variant, num_frames=3).double()
    randomize_head(m, seed=1)
    S = torch.rand(4, 3, dtype=torch.float64) * 2 - 1
    R = m.radius(S).expand(4, D)
    ref = torch.tensor([radius_ref(m, S[n].tolist()) for n in range(4)], dtype=torch.float64)
    torch.testing.assert_close(R, ref, rtol=1e-12, atol=1e-12)
    if variant == "linear":  # W is (D, T'): other clip lengths are a config error
        with pytest.raises(ValueError, match="num_frames=3 but the videos have 5 frames"):
            m.radius(torch.rand(2, 5, dtype=torch.float64))
    else:                    # the mean variants accept any clip length
        assert m.radius(torch.rand(2, 5, dtype=torch.float64)).shape == (2, 1)


# -- training losses --------------------------------------------------------------------------------
def pinned_loss(backbone_state, seed: int, **cfg):
    """The method's loss on random float64 (t, f) with the training noise ε pinned, and the float64
    references every loss form shares: (out, B, t as lists, v_{j|i} as pooled[i][j], R, L_s)."""
    torch.manual_seed(seed)
    m = make_method(backbone_state, num_frames=3, support_weight=0.8, **cfg).double().eval()
    randomize_head(m, seed=seed)
    with torch.no_grad():
        m.backbone.logit_scale.fill_(math.log(10.0))
    B, T = 3, 3
    t = torch.randn(B, D, dtype=torch.float64)
    f = torch.randn(B, T, D, dtype=torch.float64)
    eps = torch.rand(B, D, dtype=torch.float64)
    m._prior_like = lambda shape, generator=None, device=None: eps.clone()  # pin the training noise
    out = m.loss({"text": t}, {"frames": f})

    pooled, tl = m.pool(t, f).tolist(), t.tolist()                       # v_{j|i} at [i][j]
    R = [radius_ref(m, [cos_ref(tl[i], f[i, k].tolist()) for k in range(T)]) for i in range(B)]
    t_s = [[tl[i][d] + eps[i, d].item() * R[i][d] for d in range(D)] for i in range(B)]
    L_s = sym_ce_ref([[cos_ref(t_s[i], pooled[i][j]) for j in range(B)] for i in range(B)], 10.0)
    return out, B, tl, pooled, R, L_s


@pytest.mark.parametrize("variant,support_video", [("linear", "text_mean"), ("mean", "paired"),
                                                   ("scaled_mean", "text_mean")])
def test_loss_terms_match_reference(backbone_state, variant, support_video):
    out, B, tl, pooled, R, L_s = pinned_loss(backbone_state, 2, radius=variant, support_video=support_video)
    t_sup = []
    for i in range(B):
        vbar = ([sum(pooled[k][i][d] for k in range(B)) / B for d in range(D)]
                if support_video == "text_mean" else pooled[i][i])
        diff = [vbar[d] - tl[i][d] for d in range(D)]
        n = math.sqrt(sum(x * x for x in diff))
        t_sup.append([tl[i][d] + diff[d] / n * R[i][d] for d in range(D)])
    L_sup = sym_ce_ref([[cos_ref(t_sup[i], pooled[i][j]) for j in range(B)] for i in range(B)], 10.0)

    assert out["loss_stochastic"].item() == pytest.approx(L_s, rel=1e-10)
    assert out["loss_support"].item() == pytest.approx(L_sup, rel=1e-10)
    assert out["loss"].item() == pytest.approx(L_s + 0.8 * L_sup, rel=1e-10)
    assert out["radius_mean"].item() == pytest.approx(sum(map(sum, R)) / (B * D), rel=1e-10)


def test_loss_ablation_ce_plus_s_matches_reference(backbone_state):
    """loss="ce_s" (paper Table 6a, L_ce + L_s): the mean text's X-Pool CE plus the stochastic CE, no support term."""
    out, B, tl, pooled, _, L_s = pinned_loss(backbone_state, 12, loss="ce_s")
    L_ce = sym_ce_ref([[cos_ref(tl[i], pooled[i][j]) for j in range(B)] for i in range(B)], 10.0)
    assert set(out) == {"loss", "loss_ce", "loss_stochastic", "radius_mean"}
    assert out["loss_ce"].item() == pytest.approx(L_ce, rel=1e-10)
    assert out["loss_stochastic"].item() == pytest.approx(L_s, rel=1e-10)
    assert out["loss"].item() == pytest.approx(L_ce + L_s, rel=1e-10)
    assert TMassCfg().loss == "s_sup"
    with pytest.raises(ValueError, match=r"loss='ce'.*'s_sup', 'ce_s'"):
        TMassCfg(loss="ce")


def test_loss_uses_configured_prior_and_trains_radius(backbone_state):
    m = make_method(backbone_state, num_frames=3)
    u = m._prior_like((4000, 8))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02
    m = make_method(backbone_state, num_frames=3, prior="normal", prior_std=0.1)
    n = m._prior_like((4000, 8))
    assert abs(n.std().item() - 0.1) < 0.005 and abs(n.mean().item()) < 0.005
    ev = m.eval_noise(keys_for(*range(1, 51)))
    assert ev.shape == (50, 20, D) and abs(ev.std().item() - 0.1) < 0.005
    torch.manual_seed(3)
    t, f = torch.randn(3, D), torch.randn(3, 3, D)
    m.loss({"text": t}, {"frames": f})["loss"].backward()
    assert m.radius_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="paired batches"):
        m.loss({"text": t}, {"frames": f[:2]})


# -- inference --------------------------------------------------------------------------------------
def similarity_ref(m: TMass, t, keys, f, keep_mean: bool):
    eps = m.eval_noise(keys).double().tolist()                            # (N, M, D)
    pooled = m.pool(t, f).tolist()
    tl, T = t.tolist(), f.shape[1]
    out = []
    for i in range(len(tl)):
        row = []
        for j in range(f.shape[0]):
            R = radius_ref(m, [cos_ref(tl[i], f[j, k].tolist()) for k in range(T)])
            cands = [cos_ref([tl[i][d] + e[d] * R[d] for d in range(D)], pooled[i][j]) for e in eps[i]]
            if keep_mean:
                cands.append(cos_ref(tl[i], pooled[i][j]))
            row.append(max(cands))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("variant,prior,keep_mean", [("linear", "uniform01", False),
                                                     ("scaled_mean", "normal", True),
                                                     ("mean", "uniform01", True)])
def test_similarity_is_max_over_samples(backbone_state, variant, prior, keep_mean):
    torch.manual_seed(4)
    m = make_method(backbone_state, radius=variant, prior=prior, prior_std=0.5, num_frames=3,
                    num_samples=5, keep_mean=keep_mean, sim_chunk=2).double().eval()
    randomize_head(m, seed=4)
    t = torch.randn(4, D, dtype=torch.float64)
    keys = keys_for(11, 22, 33, 44)
    f = torch.randn(3, 3, D, dtype=torch.float64)
    S = m.similarity({"text": t, "key": keys}, {"frames": f})
    torch.testing.assert_close(S, similarity_ref(m, t, keys, f, keep_mean), rtol=1e-10, atol=1e-10)
    # float32 (the usual inference dtype) agrees with the float64 reference to fp32 accuracy.
    m32 = m.float()
    S32 = m32.similarity({"text": t.float(), "key": keys}, {"frames": f.float()})
    torch.testing.assert_close(S32.double(), S, rtol=0, atol=2e-5)


def official_leaky_similarity(m: TMass, t, keys, f):
    """The official ``_valid_epoch_step`` + ``sim_matrix_inference_stochastic`` score, one caption per
    video (caption j describes video j), float64: t_s* is chosen against v_{j|q}, but the score takes
    video j pooled with its *own* caption t_j: s(q, j) = cos(t_s*(q | j), v_{j|t_j})."""
    eps = m.eval_noise(keys).double().tolist()
    pooled = m.pool(t, f).tolist()                                        # [q][j] = v_{j|q}
    tl, T, N = t.tolist(), f.shape[1], f.shape[0]
    out = []
    for q in range(len(tl)):
        row = []
        for j in range(N):
            R = radius_ref(m, [cos_ref(tl[q], f[j, k].tolist()) for k in range(T)])
            cands = [[tl[q][d] + e[d] * R[d] for d in range(D)] for e in eps[q]]
            best = max(cands, key=lambda c: cos_ref(c, pooled[q][j]))
            row.append(cos_ref(best, pooled[j][j]))                        # v_{j|t_j}: the leak
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def test_score_does_not_depend_on_the_candidate_videos_own_caption(backbone_state):
    """tvr's s(i, j) is a function of text i and video j only: rewriting caption j (the ground truth of
    video j) leaves s(i, j) unchanged for i != j. The official evaluation's score does change (it pools
    video j with caption j); on the diagonal the two forms agree."""
    torch.manual_seed(13)
    m = make_method(backbone_state, num_frames=3, num_samples=4).double().eval()
    randomize_head(m, seed=13)
    N, j = 4, 2
    t, keys, f = torch.randn(N, D, dtype=torch.float64), keys_for(1, 2, 3, 4), torch.randn(N, 3, D, dtype=torch.float64)
    t2, keys2 = t.clone(), keys.clone()
    t2[j], keys2[j] = torch.randn(D, dtype=torch.float64), keys_for(99)[0]  # caption j rewritten
    with torch.no_grad():
        S = m.similarity({"text": t, "key": keys}, {"frames": f})
        S2 = m.similarity({"text": t2, "key": keys2}, {"frames": f})
    others = [i for i in range(N) if i != j]
    torch.testing.assert_close(S2[others], S[others], rtol=0, atol=0)    # column j included
    torch.testing.assert_close(S, similarity_ref(m, t, keys, f, keep_mean=False), rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        off, off2 = official_leaky_similarity(m, t, keys, f), official_leaky_similarity(m, t2, keys2, f)
    torch.testing.assert_close(off.diagonal(), S.diagonal(), rtol=1e-10, atol=1e-10)
    assert (off2[others, j] - off[others, j]).abs().min() > 1e-6         # the leak: s(i, j) moved with caption j


def test_keep_mean_adds_the_mean_text_candidate(backbone_state):
    torch.manual_seed(5)
    m = make_method(backbone_state, num_frames=3, num_samples=3).double().eval()
    randomize_head(m, seed=5)
    t, keys, f = torch.randn(5, D, dtype=torch.float64), keys_for(1, 2, 3, 4, 5), torch.randn(4, 3, D, dtype=torch.float64)
    S = m.similarity({"text": t, "key": keys}, {"frames": f})
    m.cfg.keep_mean = True
    S_keep = m.similarity({"text": t, "key": keys}, {"frames": f})
    pooled = m.pool(t, f)
    mean_cos = torch.tensor([[cos_ref(t[i].tolist(), pooled[i, j].tolist()) for j in range(4)] for i in range(5)],
                            dtype=torch.float64)
    torch.testing.assert_close(S_keep, torch.maximum(S, mean_cos), rtol=1e-12, atol=1e-12)


def test_similarity_block_invariant_and_seed_deterministic(backbone_state):
    torch.manual_seed(6)
    m = make_method(backbone_state, num_frames=3, num_samples=6, sim_chunk=3).eval()
    randomize_head(m, seed=6)
    t, keys, f = torch.randn(7, D), keys_for(*range(100, 107)), torch.randn(5, 3, D)
    with torch.no_grad():
        S = m.similarity({"text": t, "key": keys}, {"frames": f})
        torch.manual_seed(999)  # the global RNG state must not matter
        torch.testing.assert_close(m.similarity({"text": t, "key": keys}, {"frames": f}), S, rtol=0, atol=0)
        for chunk in (1, 2, 64):
            m.cfg.sim_chunk = chunk
            blocks = torch.cat([
                torch.cat([m.similarity({"text": t[ts], "key": keys[ts]}, {"frames": f[vs]})
                           for vs in (slice(0, 2), slice(2, 3), slice(3, 5))], dim=1)
                for ts in (slice(0, 1), slice(1, 4), slice(4, 7))], dim=0)
            torch.testing.assert_close(blocks, S, rtol=0, atol=1e-6)
        # Reordered texts carry their scores with them (noise follows the key, not the position).
        perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
        torch.testing.assert_close(m.similarity({"text": t[perm], "key": keys[perm]}, {"frames": f}), S[perm],
                                   rtol=0, atol=1e-6)
        m.cfg.eval_seed = 7
        assert not torch.allclose(m.similarity({"text": t, "key": keys}, {"frames": f}), S)
    torch.testing.assert_close(m.eval_noise(keys[[2, 0]]), m.eval_noise(keys)[[2, 0]], rtol=0, atol=0)


def test_token_keys_follow_caption_not_padding_or_batch(backbone_state):
    bb = ClipBackbone(BackboneCfg(name="tvr-tiny"))
    ids = bb.tokenize(["a cat plays piano", "a dog runs", "a cat plays piano", "rain"])
    keys = token_keys(ids)
    assert keys.dtype == torch.float32 and keys.shape == (4, 8)
    assert torch.equal(keys[0], keys[2]) and len({tuple(k) for k in keys.tolist()}) == 3
    # bytes survive any float cast the platform applies to features
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert key_ints(keys.to(dtype)) == key_ints(keys)
    assert len(set(key_ints(keys))) == 3 and all(0 <= k < 2**62 for k in key_ints(keys))
    with pytest.raises(ValueError, match=r"\(N, 8\) hash"):
        key_ints(keys[:, :4])
    with pytest.raises(ValueError, match="not bytes"):
        key_ints(keys + 0.5)
    padded = torch.cat([ids, torch.zeros(4, 9, dtype=ids.dtype)], dim=1)
    assert torch.equal(token_keys(padded), keys)
    assert torch.equal(token_keys(bb.tokenize(["rain"])), keys[3:])


# -- tiny backbone ----------------------------------------------------------------------------------
def test_shapes_and_param_groups_with_tiny_backbone(backbone_state):
    m = make_method(backbone_state, num_frames=4, num_samples=4)
    ids = m.backbone.tokenize(["a cat plays", "a dog runs", "rain"])
    frames = torch.randn(3, 4, 3, 32, 32)
    text, video = m.encode_text(ids), m.encode_video(frames)
    assert text["text"].shape == (3, D) and text["key"].shape == (3, 8) and video["frames"].shape == (3, 4, D)
    out = m.loss(text, video)
    assert set(out) == {"loss", "loss_stochastic", "loss_support", "radius_mean"}
    assert all(v.ndim == 0 for v in out.values())
    m.eval()
    with torch.no_grad():
        assert m.similarity(text, {"frames": video["frames"][:2]}).shape == (3, 2)
    with pytest.raises(KeyError, match="key"):
        m.similarity({"text": text["text"]}, video)
    groups = m.param_groups(lr=3e-5, backbone_lr=1e-6, weight_decay=0.2)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(m.radius_proj.weight)]["lr"] == 3e-5
    assert by_id[id(m.backbone.logit_scale)]["lr"] == 1e-6
    assert all(by_id[id(p)]["lr"] == 1e-6 for n, p in m.named_parameters() if n.startswith("backbone."))


@pytest.mark.parametrize("variant", ["linear", "scaled_mean"])
def test_adam_steps_decrease_loss(backbone_state, variant):
    torch.manual_seed(7)
    m = make_method(backbone_state, radius=variant, num_frames=4, dropout=0.0)
    ids = m.backbone.tokenize(["a red car", "a man cooking", "two dogs", "a sunset sea"])
    frames = torch.randn(4, 4, 3, 32, 32)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)

    def measured():
        torch.manual_seed(123)  # same noise draw before and after training
        with torch.no_grad():
            return m.loss(m.encode_text(ids), m.encode_video(frames))["loss"].item()

    first = measured()
    for _ in range(15):
        opt.zero_grad()
        m.loss(m.encode_text(ids), m.encode_video(frames))["loss"].backward()
        opt.step()
    last = measured()
    assert math.isfinite(last) and last < 0.7 * first, (first, last)


def test_fp32_features_meet_a_bf16_head(backbone_state):
    """The platform stores features as fp32 (keys included); a bf16 (DeepSpeed) model still scores them."""
    torch.manual_seed(8)
    m = make_method(backbone_state, num_frames=3, num_samples=4).eval()
    t, keys, f = torch.randn(3, D), keys_for(5, 6, 7), torch.randn(2, 3, D)
    ref = m.similarity({"text": t, "key": keys}, {"frames": f})
    m.bfloat16()
    S = m.similarity({"text": t, "key": keys.bfloat16()}, {"frames": f})
    assert S.dtype == torch.float32 and S.shape == (3, 2)
    torch.testing.assert_close(S, ref, rtol=0, atol=0.05)
