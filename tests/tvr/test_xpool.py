"""X-Pool: text-conditioned attention pooling vs a float64 loop re-computation of the official
``modules/transformer.py``, the cosine score, the symmetric InfoNCE loss and a short fit."""

from __future__ import annotations

import math

import pytest
import torch

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.methods.xpool import SPEC, TextConditionedPool, XPool, XPoolCfg


@pytest.fixture(scope="module")
def backbone_state():
    torch.manual_seed(0)
    return ClipBackbone(BackboneCfg(name="tvr-tiny")).state_dict()


def make_method(backbone_state, **cfg) -> XPool:
    bb = ClipBackbone(BackboneCfg(name="tvr-tiny"))
    bb.load_state_dict(backbone_state)
    return XPool(XPoolCfg(**cfg), bb)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its (identity / unit) init so the reference sees real weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1.0 + 0.2 * noise if ("ln" in name and name.endswith("weight")) else 0.3 * noise)


# -- float64 loop reference of the official Transformer ---------------------------------------------
def ln_ref(x, ln):
    mu = sum(x) / len(x)
    var = sum((xi - mu) ** 2 for xi in x) / len(x)
    w, b = ln.weight.tolist(), ln.bias.tolist()
    return [(xi - mu) / math.sqrt(var + ln.eps) * wi + bi for xi, wi, bi in zip(x, w, b)]


def linear_ref(x, lin):
    W, b = lin.weight.tolist(), lin.bias.tolist()
    return [sum(wr[c] * x[c] for c in range(len(x))) + br for wr, br in zip(W, b)]


def pool_ref(pool: TextConditionedPool, t, frames):
    """t: list (D,), frames: list of T lists (D,) -> v_{j|i} as a list (D,)."""
    D, H = len(t), pool.num_heads
    dh = D // H
    q = linear_ref(ln_ref(t, pool.ln1), pool.q_proj)
    fn = [ln_ref(f, pool.ln1) for f in frames]
    K = [linear_ref(f, pool.k_proj) for f in fn]
    V = [linear_ref(f, pool.v_proj) for f in fn]
    heads = []
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)
        logits = [sum(a * b for a, b in zip(q[sl], k[sl])) / math.sqrt(dh) for k in K]
        m = max(logits)
        e = [math.exp(x - m) for x in logits]
        a = [x / sum(e) for x in e]
        heads += [sum(a[k] * V[k][sl][d] for k in range(len(V))) for d in range(dh)]
    z = ln_ref(linear_ref(heads, pool.out_proj), pool.ln2)
    lin = linear_ref(z, pool.linear_proj)
    return ln_ref([a + b for a, b in zip(z, lin)], pool.ln3)


def cos_ref(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# -- tests ------------------------------------------------------------------------------------------
def test_config_defaults_follow_official_code_and_validation():
    cfg = XPoolCfg()
    assert (cfg.num_heads, cfg.dropout) == (1, 0.3)
    assert SPEC.name == "xpool" and SPEC.config_cls is XPoolCfg and SPEC.build is XPool
    for bad in ({"num_heads": 0}, {"dropout": 1.0}, {"dropout": -0.1}, {"sim_chunk": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            XPoolCfg(**bad)
    with pytest.raises(TypeError):
        XPoolCfg(1)  # keyword-only
    with pytest.raises(ValueError, match="must divide"):
        TextConditionedPool(dim=10, num_heads=3)


def test_pool_official_init_identity_projections():
    pool = TextConditionedPool(dim=8, num_heads=2)
    for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.out_proj, pool.linear_proj):
        assert torch.equal(lin.weight, torch.eye(8)) and torch.equal(lin.bias, torch.zeros(8))


@pytest.mark.parametrize("heads", [1, 2])
def test_pool_matches_loop_reference(heads):
    torch.manual_seed(1)
    D, T, Nt, Nv = 6, 3, 3, 2
    pool = TextConditionedPool(dim=D, num_heads=heads, dropout=0.3).double().eval()
    randomize(pool, seed=heads)
    t = torch.randn(Nt, D, dtype=torch.float64)
    f = torch.randn(Nv, T, D, dtype=torch.float64)
    out = pool(t, f)
    assert out.shape == (Nt, Nv, D)
    for i in range(Nt):
        for j in range(Nv):
            ref = pool_ref(pool, t[i].tolist(), f[j].tolist())
            torch.testing.assert_close(out[i, j], torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_pool_dropout_acts_only_in_training_mode():
    torch.manual_seed(2)
    t, f = torch.randn(3, 8), torch.randn(2, 4, 8)
    pool = TextConditionedPool(dim=8, dropout=0.5)
    randomize(pool)
    pool.eval()
    ref = pool(t, f)
    torch.testing.assert_close(pool(t, f), ref)
    pool.train()
    assert not torch.allclose(pool(t, f), ref)
    pool.dropout.p = 0.0
    torch.testing.assert_close(pool(t, f), ref)


def test_similarity_matches_reference_and_is_block_invariant(backbone_state):
    torch.manual_seed(3)
    m = make_method(backbone_state, num_heads=2, sim_chunk=2).double().eval()
    randomize(m.pool, seed=3)
    D = m.backbone.embed_dim
    t = torch.randn(5, D, dtype=torch.float64)
    f = torch.randn(4, 3, D, dtype=torch.float64)
    S = m.similarity({"text": t}, {"frames": f})
    assert S.shape == (5, 4)
    ref = torch.tensor([[cos_ref(t[i].tolist(), pool_ref(m.pool, t[i].tolist(), f[j].tolist()))
                         for j in range(4)] for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-10)
    # Any block of texts x videos gives the same scores as the full matrix, whatever the chunk.
    for chunk in (1, 3, 100):
        m.cfg.sim_chunk = chunk
        blocks = torch.cat([torch.cat([m.similarity({"text": t[ts]}, {"frames": f[vs]})
                                       for vs in (slice(0, 1), slice(1, 4))], dim=1)
                            for ts in (slice(0, 2), slice(2, 5))], dim=0)
        torch.testing.assert_close(blocks, S, rtol=1e-12, atol=1e-12)


def test_loss_is_symmetric_infonce_with_clip_scale(backbone_state):
    torch.manual_seed(4)
    m = make_method(backbone_state).double().eval()
    randomize(m.pool, seed=4)
    with torch.no_grad():
        m.backbone.logit_scale.fill_(math.log(20.0))
    D, B = m.backbone.embed_dim, 4
    t = torch.randn(B, D, dtype=torch.float64)
    f = torch.randn(B, 3, D, dtype=torch.float64)
    S = [[20.0 * cos_ref(t[i].tolist(), pool_ref(m.pool, t[i].tolist(), f[j].tolist())) for j in range(B)]
         for i in range(B)]
    t2v = -sum(S[i][i] - math.log(sum(math.exp(x) for x in S[i])) for i in range(B)) / B
    v2t = -sum(S[j][j] - math.log(sum(math.exp(S[i][j]) for i in range(B))) for j in range(B)) / B
    out = m.loss({"text": t}, {"frames": f})
    assert set(out) == {"loss"}
    assert out["loss"].item() == pytest.approx(0.5 * (t2v + v2t), rel=1e-10)
    with pytest.raises(KeyError, match="frames"):
        m.loss({"text": t}, {"video": f})


def test_shapes_and_param_groups_with_tiny_backbone(backbone_state):
    m = make_method(backbone_state)
    ids = m.backbone.tokenize(["a cat plays", "a dog runs", "rain"])
    frames = torch.randn(2, 4, 3, 32, 32)
    text, video = m.encode_text(ids), m.encode_video(frames)
    assert text["text"].shape == (3, 32) and video["frames"].shape == (2, 4, 32)
    m.eval()
    with torch.no_grad():
        assert m.similarity(text, video).shape == (3, 2)
    groups = m.param_groups(lr=3e-5, backbone_lr=1e-6, weight_decay=0.2)
    by_name = {id(p): g for g in groups for p in g["params"]}
    for name, p in m.named_parameters():
        g = by_name[id(p)]
        assert g["lr"] == (1e-6 if name.startswith("backbone.") else 3e-5), name
    assert by_name[id(m.pool.q_proj.weight)]["weight_decay"] == 0.2
    assert by_name[id(m.pool.ln1.weight)]["weight_decay"] == 0.0


def test_adam_steps_decrease_loss(backbone_state):
    torch.manual_seed(5)
    m = make_method(backbone_state, dropout=0.0)
    ids = m.backbone.tokenize(["a red car", "a man cooking", "two dogs", "a sunset sea"])
    frames = torch.randn(4, 4, 3, 32, 32)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)

    def step_loss():
        return m.loss(m.encode_text(ids), m.encode_video(frames))["loss"]

    first = step_loss().item()
    for _ in range(15):
        opt.zero_grad()
        loss = step_loss()
        loss.backward()
        opt.step()
    last = step_loss().item()
    assert math.isfinite(last) and last < 0.7 * first, (first, last)


def test_missing_text_features_error():
    m = XPool(XPoolCfg(), ClipBackbone(BackboneCfg(name="tvr-tiny")))
    with pytest.raises(KeyError, match="encode_text"):
        m.similarity({}, {"frames": torch.zeros(1, 2, 32)})
    with pytest.raises(ValueError, match="N_v, T, D"):
        m.similarity({"text": torch.zeros(1, 32)}, {"frames": torch.zeros(1, 32)})


def test_fp32_features_meet_a_bf16_head():
    """The platform stores features as fp32; a bf16 (DeepSpeed) head must still score them."""
    torch.manual_seed(6)
    m = XPool(XPoolCfg(), ClipBackbone(BackboneCfg(name="tvr-tiny"))).eval()
    t, f = torch.randn(3, 32), torch.randn(2, 4, 32)
    ref = m.similarity({"text": t}, {"frames": f})
    m.bfloat16()
    S = m.similarity({"text": t}, {"frames": f})
    assert S.shape == (3, 2)
    torch.testing.assert_close(S.float(), ref, rtol=0, atol=0.05)
