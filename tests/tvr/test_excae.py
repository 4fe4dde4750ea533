"""ExCae ECS: top-k text-conditioned routing, gradients only through active experts, the score and the
Switch/GShard load-balancing loss vs float64 loop re-computations, dense evaluation, top_k = 0, the
70-token cut, shapes, score fusion, and ECS inside every base method's representation (trained on
decoded synthetic clips with captions, one backbone pass per step)."""

from __future__ import annotations

import math

import pytest
import torch

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.methods import METHODS
from tvr.methods.excae import SPEC, VIEWS, ExCae, ExCaeCfg

B, T, K = 4, 3, 4


@pytest.fixture(scope="module")
def backbone_state():
    torch.manual_seed(0)
    return ClipBackbone(BackboneCfg(name="tvr-tiny")).state_dict()


def make(backbone_state, **cfg) -> ExCae:
    bb = ClipBackbone(BackboneCfg(name="tvr-tiny"))
    bb.load_state_dict(backbone_state)
    torch.manual_seed(1)
    cfg.setdefault("dropout", 0.0)
    return ExCae(ExCaeCfg(**cfg), bb)


def batch(model: ExCae, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(B, T, 3, 32, 32, generator=g)
    words = ["red", "blue", "green", "yellow", "small", "large", "ball", "cube", "left", "right"]
    caps = [" ".join(words[(i * 3 + j * 7 + k) % 10] for k in range(3)) for i in range(B) for j in range(K)]
    captions = model.backbone.tokenize(caps).view(B, K, -1)           # (B, K, L)
    captions[0, 2:] = 0                                               # padding rows
    captions[1, 0] = 0                                                # padding first
    text = model.backbone.tokenize([f"a {words[i]} {words[i + 5]} moving" for i in range(B)])
    return frames, captions, text


# -- float64 references ---------------------------------------------------------------------------
def router_ref(model: ExCae, t: list[float], u: list[float]) -> list[float]:
    r = model.router
    H = r.bias.shape[0]
    h = list(r.bias.double().tolist())
    if r.text_in is not None:
        W = r.text_in.weight.double().tolist()
        h = [h[a] + sum(W[a][d] * t[d] for d in range(len(t))) for a in range(H)]
    if r.video_in is not None:
        W = r.video_in.weight.double().tolist()
        h = [h[a] + sum(W[a][d] * u[d] for d in range(len(u))) for a in range(H)]
    h = [max(x, 0.0) for x in h]
    W2, b2 = r.out.weight.double().tolist(), r.out.bias.double().tolist()
    return [b2[m] + sum(W2[m][a] * h[a] for a in range(H)) for m in range(len(b2))]


def topk_ref(z: list[float], k: int) -> tuple[list[float], list[int]]:
    order = sorted(range(len(z)), key=lambda m: -z[m])[:k]
    den = sum(math.exp(z[m]) for m in order)
    g = [0.0] * len(z)
    for m in order:
        g[m] = math.exp(z[m]) / den
    return g, order


def score_ref(model: ExCae, tf, vf, dense: bool = False) -> tuple[list[list[float]], list[list[list[float]]], list[list[list[int]]]]:
    """s_ecs, full router probabilities and top-k sets, by loops in float64."""
    t = tf["text"].double().tolist()
    E, r, u = (vf[k].double().tolist() for k in ("experts", "residual", "route"))
    S, P, sel = [], [], []
    for i in range(len(t)):
        srow, prow, krow = [], [], []
        for j in range(len(E)):
            z = router_ref(model, t[i], u[j])
            g, order = topk_ref(z, model.cfg.top_k)
            mx = max(z)
            den = sum(math.exp(x - mx) for x in z)
            prow.append([math.exp(x - mx) / den for x in z])
            if dense:
                g = prow[-1]
            krow.append(order)
            D = len(r[j])
            v = [r[j][d] + sum(g[m] * E[j][m][d] for m in range(len(g))) for d in range(D)]
            nt = math.sqrt(sum(x * x for x in t[i]))
            nv = math.sqrt(sum(x * x for x in v))
            srow.append(sum(a * b for a, b in zip(t[i], v)) / (nt * nv))
        S.append(srow)
        P.append(prow)
        sel.append(krow)
    return S, P, sel


# -- tests ----------------------------------------------------------------------------------------
def test_spec_and_config_validation():
    assert SPEC.name == "excae" and SPEC.config_cls is ExCaeCfg
    with pytest.raises(ValueError, match="top_k"):
        ExCaeCfg(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="router"):
        ExCaeCfg(router="query")
    with pytest.raises(ValueError, match="base"):
        ExCaeCfg(base="excae")
    with pytest.raises(ValueError, match="plugin_weight"):
        ExCaeCfg(plugin_weight=0.0)
    with pytest.raises(ValueError, match="plugin"):
        ExCaeCfg(base="meanp", plugin="concat")
    with pytest.raises(ValueError, match="router"):             # evidence exists before the query
        ExCaeCfg(base="meanp", router="pair")
    with pytest.raises(ValueError, match="max_text_tokens"):
        ExCaeCfg(max_text_tokens=1)
    cfg = ExCaeCfg()               # issue 14: official objective and inference by default
    assert cfg.balance_weight == 0.0 and cfg.dense_eval and cfg.max_text_tokens == 70
    assert ExCaeCfg(top_k=0).top_k == 0
    assert ExCaeCfg().router_mode == "pair" and ExCaeCfg(base="xpool").router_mode == "video"
    assert ExCaeCfg(base="xpool", plugin="score").router_mode == "pair"


def test_router_activates_exactly_top_k_and_gradients_reach_only_them(backbone_state):
    model = make(backbone_state, num_experts=6, top_k=2)
    frames, captions, text = batch(model)
    model.train()
    tf, vf = model.encode_text(text[:1]), model.encode_video(frames[:1], captions[:1])
    logits = model.router(tf["text"], vf["route"])                    # (1, 1, M)
    gates, idx = model.gates(logits)
    assert int((gates != 0).sum()) == 2
    assert torch.allclose(gates.sum(-1), torch.ones(1, 1))
    active = set(idx.flatten().tolist())
    assert active == set(logits.flatten().topk(2).indices.tolist())
    model.similarity(tf, vf).sum().backward()
    with_grad = {m for m, e in enumerate(model.experts)
                 if any(p.grad is not None and p.grad.abs().sum() > 0 for p in e.parameters())}
    assert with_grad == active
    # every pair of a block routes to exactly k experts whose gates sum to one
    model.zero_grad()
    tf, vf = model.encode_text(text), model.encode_video(frames, captions)
    g, _ = model.gates(model.router(tf["text"], vf["route"]))          # (B, B, M)
    assert ((g > 0).sum(-1) == 2).all() and torch.allclose(g.sum(-1), torch.ones(B, B))


@pytest.mark.parametrize("router", ["pair", "text", "video"])
def test_similarity_matches_float64_reference_and_is_block_invariant(backbone_state, router):
    model = make(backbone_state, num_experts=5, top_k=2, router=router, router_hidden=16, sim_chunk=3,
                 dense_eval=False).eval()
    frames, captions, text = batch(model)
    with torch.no_grad():
        tf, vf = model.encode_text(text), model.encode_video(frames, captions)
        S = model.similarity(tf, vf)
        # residual r_j and video summary u_j: masked means over valid captions (+ frames)
        cls, _ = model.backbone.encode_frames(frames)
        for j in range(B):
            valid = [k for k in range(K) if captions[j, k].any()]
            c = [model.backbone.encode_text(captions[j, k:k + 1])[0][0].double() for k in valid]
            f = [cls[j, t].double() for t in range(T)]
            assert torch.allclose(vf["residual"][j].double(), sum(c + f) / (len(c) + T), atol=1e-5)
            assert torch.allclose(vf["route"][j].double(), torch.cat([sum(c) / len(c), sum(f) / T]), atol=1e-5)
        sub = model.similarity({"text": tf["text"][1:3]}, {k: v[2:] for k, v in vf.items()})
    ref, _, _ = score_ref(model, tf, vf)
    assert torch.allclose(S.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(sub, S[1:3, 2:], atol=1e-6)
    if router == "video":       # routing ignores the text: same experts for every text of a video
        g, _ = model.gates(model.router(tf["text"], vf["route"]))
        assert torch.equal(g[0], g[1])


def test_load_balance_loss_and_total_loss_vs_float64(backbone_state):
    model = make(backbone_state, num_experts=4, top_k=2, router_hidden=8, balance_weight=0.3, sim_chunk=2)
    model.train()
    frames, captions, text = batch(model)
    tf, vf = model.encode_text(text), model.encode_video(frames, captions)
    out = model.loss(tf, vf)
    S, P, sel = score_ref(model, tf, vf)
    M, k, n_pairs = 4, 2, B * B
    frac = [sum(m in sel[i][j] for i in range(B) for j in range(B)) / (n_pairs * k) for m in range(M)]
    mean_p = [sum(P[i][j][m] for i in range(B) for j in range(B)) / n_pairs for m in range(M)]
    bal = M * sum(f * p for f, p in zip(frac, mean_p))
    assert out["loss_balance"].item() == pytest.approx(bal, abs=1e-5)
    assert [out[f"expert_frac_{m:02d}"].item() for m in range(M)] == pytest.approx(frac, abs=1e-7)
    assert out["expert_util_max"].item() == pytest.approx(max(frac), abs=1e-7)
    scale = min(math.exp(model.backbone.logit_scale.item()), 100.0)
    ce = 0.0
    for i in range(B):                 # ½ [CE(S/τ) over videos + CE(Sᵀ/τ) over texts]
        row = [scale * S[i][j] for j in range(B)]
        col = [scale * S[j][i] for j in range(B)]
        ce += 0.5 * ((math.log(sum(math.exp(x) for x in row)) - row[i])
                     + (math.log(sum(math.exp(x) for x in col)) - col[i])) / B
    assert out["loss"].item() == pytest.approx(ce + 0.3 * bal, abs=1e-4)
    out["loss"].backward()
    assert model.router.out.weight.grad is not None and model.router.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("num_experts,top_k", [(3, 1), (7, 3)])
def test_expert_count_and_top_k_change_shapes(backbone_state, num_experts, top_k):
    model = make(backbone_state, num_experts=num_experts, top_k=top_k, router_hidden=8)
    frames, captions, text = batch(model)
    tf, vf = model.encode_text(text), model.encode_video(frames, captions)
    D = model.backbone.embed_dim
    assert vf["experts"].shape == (B, num_experts, D)
    assert vf["residual"].shape == (B, D) and vf["route"].shape == (B, 2 * D)
    assert model.views == [VIEWS[m % 3] for m in range(num_experts)]
    g, idx = model.gates(model.router(tf["text"], vf["route"]))
    assert g.shape == (B, B, num_experts) and idx.shape == (B, B, top_k)
    out = model.loss(tf, vf)
    assert sorted(k for k in out if k.startswith("expert_frac_")) == [f"expert_frac_{m:02d}"
                                                                      for m in range(num_experts)]
    assert sum(out[f"expert_frac_{m:02d}"].item() for m in range(num_experts)) == pytest.approx(1.0)
    assert all(v.ndim == 0 for v in out.values())


def test_dense_eval_and_videos_without_captions(backbone_state):
    model = make(backbone_state, num_experts=4, top_k=1, dense_eval=True, router_hidden=8).eval()
    frames, _, text = batch(model)
    with torch.no_grad():
        tf, vf = model.encode_text(text), model.encode_video(frames, None)
        g, _ = model.gates(model.router(tf["text"], vf["route"]))
        assert (g > 0).all()                                           # official dense inference
        cls, _ = model.backbone.encode_frames(frames)
        assert torch.allclose(vf["residual"], cls.mean(1), atol=1e-6)  # no captions: frames only
        assert torch.isfinite(model.similarity(tf, vf)).all()
    with pytest.raises(ValueError, match="captions"):
        model.encode_video(frames, torch.zeros(B, 2, dtype=torch.long))


def test_padding_captions_do_not_change_the_video(backbone_state):
    model = make(backbone_state, num_experts=3, top_k=2, router_hidden=8).eval()
    frames, captions, _ = batch(model)
    padded = torch.cat([captions, torch.zeros_like(captions[:, :2])], dim=1)   # two more empty rows
    with torch.no_grad():
        a, b = model.encode_video(frames, captions), model.encode_video(frames, padded)
    for key in ("experts", "residual", "route"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_plugin_shares_backbone_and_mixes_scores(backbone_state):
    model = make(backbone_state, num_experts=3, top_k=1, router_hidden=8, base="meanp", plugin="score",
                 plugin_weight=0.25)
    frames, captions, text = batch(model)
    calls = []
    original = type(model.backbone).encode_frames

    def counting(self, *a, **kw):
        calls.append(1)
        return original(self, *a, **kw)

    type(model.backbone).encode_frames = counting
    try:
        vf = model.encode_video(frames, captions)
    finally:
        type(model.backbone).encode_frames = original
    assert len(calls) == 1                                            # base and ECS share one pass
    assert "encode_frames" not in vars(model.backbone)                 # nothing left patched
    assert model.base.backbone is model.backbone
    tf = model.encode_text(text)
    assert set(vf) >= {"base.video", "experts"} and set(tf) == {"base.text", "text"}
    model.eval()
    with torch.no_grad():
        S = model.similarity(tf, vf)
        s_base = model.base.similarity({"text": tf["base.text"]}, {"video": vf["base.video"]})
        s_ecs = model.ecs_similarity(tf, vf)
    assert torch.allclose(S, 0.75 * s_base + 0.25 * s_ecs, atol=1e-6)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("base.backbone.") for n in names)     # shared params listed once
    groups = model.param_groups(1e-3, 1e-5, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(names)
    with pytest.raises(KeyError, match="base"):
        model.similarity(tf, {k: v for k, v in vf.items() if not k.startswith("base.")})


def fit(model: ExCae, steps: int) -> tuple[float, float]:
    frames, captions, text = batch(model, seed=3)
    opt = torch.optim.AdamW(model.param_groups(3e-3, 1e-4, 0.0))
    model.train()
    losses = []
    for _ in range(steps):
        out = model.loss(model.encode_text(text), model.encode_video(frames, captions))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(x) for x in losses)
    return losses[0], losses[-1]


def test_training_reduces_loss_alone(backbone_state):
    first, last = fit(make(backbone_state, num_experts=4, top_k=2, router_hidden=16), steps=12)
    assert last < first - 0.05


def test_score_fusion_trains_each_objective_once(backbone_state):
    """plugin='score': L = L_base + L_ecs (+ α L_bal), never the base's inference scoring in training."""
    model = make(backbone_state, num_experts=4, top_k=2, router_hidden=16, base="meanp", plugin="score")
    first, last = fit(model, steps=12)
    assert last < first - 0.05
    frames, captions, text = batch(model)
    tf, vf = model.encode_text(text), model.encode_video(frames, captions)
    out = model.loss(tf, vf)
    base = model.base.loss(model._sub(tf), model._sub(vf))["loss"]
    assert out["loss"].item() == pytest.approx(base.item() + out["loss_ecs"].item(), abs=1e-5)


@pytest.mark.skipif("xpool" not in METHODS, reason="xpool is not registered in tvr.methods.METHODS")
def test_plugin_over_xpool_trains_and_scores(backbone_state):
    model = make(backbone_state, num_experts=3, top_k=1, router_hidden=8, base="xpool", plugin="score",
                 base_options={"dropout": 0.0})
    first, last = fit(model, steps=6)
    assert last < first
    frames, captions, text = batch(model)
    model.eval()
    with torch.no_grad():
        tf, vf = model.encode_text(text), model.encode_video(frames, captions)
        S = model.similarity(tf, vf)
        s_base = model.base.similarity(model._sub(tf), model._sub(vf))
        assert torch.allclose(S, 0.5 * s_base + 0.5 * model.ecs_similarity(tf, vf), atol=1e-6)
    with pytest.raises(ValueError, match="base_options"):
        make(backbone_state, base="xpool", base_options={"no_such_key": 1})


# -- issue 14: dense evaluation by default, top_k = 0, the paper's 70 tokens ----------------------
def test_dense_evaluation_matches_float64_and_top_k_at_evaluation_is_an_option(backbone_state):
    model = make(backbone_state, num_experts=5, top_k=2, router_hidden=16).eval()     # dense_eval default
    frames, captions, text = batch(model)
    with torch.no_grad():
        tf, vf = model.encode_text(text), model.encode_video(frames, captions)
        S = model.similarity(tf, vf)
        model.cfg.dense_eval = False
        S_topk = model.similarity(tf, vf)
        model.cfg.dense_eval = True
    dense, _, _ = score_ref(model, tf, vf, dense=True)
    sparse, _, _ = score_ref(model, tf, vf, dense=False)
    assert torch.allclose(S.double(), torch.tensor(dense, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(S_topk.double(), torch.tensor(sparse, dtype=torch.float64), atol=1e-5)
    assert not torch.allclose(S, S_topk, atol=1e-4)
    model.train()                                                      # training is always top-k
    g, _ = model.gates(model.router(tf["text"], vf["route"]))
    assert ((g > 0).sum(-1) == 2).all()


def test_top_k_zero_scores_the_residual_alone_vs_float64(backbone_state):
    model = make(backbone_state, num_experts=3, top_k=0, router_hidden=8, balance_weight=0.5)
    frames, captions, text = batch(model)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        tf, vf = model.encode_text(text), model.encode_video(frames, captions)
        g, idx = model.gates(model.router(tf["text"], vf["route"]))
        assert not g.any() and idx.shape[-1] == 0                      # no expert active, dense eval too
        S = model.similarity(tf, vf).double()
        t = tf["text"].double().tolist()
        r = vf["residual"].double().tolist()
        ref = [[sum(a * b for a, b in zip(t[i], r[j])) / math.sqrt(sum(a * a for a in t[i]) * sum(b * b for b in r[j]))
                for j in range(B)] for i in range(B)]
        assert torch.allclose(S, torch.tensor(ref, dtype=torch.float64), atol=1e-5)
    model.train()
    out = model.loss(model.encode_text(text), model.encode_video(frames, captions))
    assert out["loss_balance"].item() == 0.0 and out["expert_util_max"].item() == 0.0
    out["loss"].backward()                                             # still a valid objective
    assert torch.isfinite(out["loss"])


def test_queries_and_captions_are_cut_at_the_papers_70_tokens():
    import open_clip

    from tvr.methods.excae import cut_tokens

    tok = open_clip.get_tokenizer("ViT-B-32")                          # 77-token CLIP context
    long = " ".join(f"word{i}" for i in range(60))                     # > 70 BPE tokens
    short = "a red circle moves left"
    ids = tok([long, short])                                           # (2, 77)
    cut = cut_tokens(ids, 70)
    ref = tok([long, short], context_length=70)                        # open_clip's own cut at 70 (EOT kept)
    assert cut.shape == ids.shape
    assert torch.equal(cut[:, :70], ref) and not cut[:, 70:].any()
    assert torch.equal(cut[1], ids[1])                                 # a short query is unchanged
    assert torch.equal(cut_tokens(ids, 0), ids)
    assert cut[0].argmax() == 69                                       # EOT pooling reads the last kept slot


def test_text_and_captions_reach_the_towers_cut(backbone_state):
    model = make(backbone_state, num_experts=3, top_k=1, router_hidden=8, max_text_tokens=6)
    frames, captions, text = batch(model)
    seen = []
    hook = model.backbone.text_tower.token_embedding.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    try:
        model.encode_text(text)
        model.encode_video(frames, captions)
    finally:
        hook.remove()
    assert len(seen) == 2 and all(not ids[:, 6:].any() for ids in seen)
    assert max(int((ids != 0).sum(-1).max()) for ids in seen) <= 6


# -- ECS inside every base method's representation -----------------------------------------------
FRAMES, CLIPS, KCAP = 4, 8, 2
BASES = {
    "meanp": {},
    "xpool": {"dropout": 0.0},
    "tmass": {"dropout": 0.0, "num_frames": FRAMES},
    "ucofia": {"max_frames": FRAMES + 1, "temporal_layers": 1, "topk_samples": 16, "topk": 2},
    "vop": {"variant": "P", "num_frames": FRAMES, "prompt_length": 2, "text_prompt_length": 2},
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Decoded synthetic clips (CLIPS, T, 3, 32, 32), a query per clip and KCAP auxiliary captions per
    clip (the clip's other true sentences, as generated captions would be)."""
    import json

    from tvr.data.frames import decode_frames, normalize
    from tvr.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, num_clips=CLIPS, seconds=1.0, size=32, seed=5, captions_per_clip=KCAP + 1)
    data = json.loads((out / "MSRVTT_data.json").read_text())
    sents: dict[str, list[str]] = {}
    for s in data["sentences"]:
        sents.setdefault(s["video_id"], []).append(s["caption"])
    ids = sorted(sents)
    frames = torch.stack([torch.from_numpy(normalize(
        decode_frames((out / "videos" / f"{v}.mp4").read_bytes(), FRAMES, size=32).frames)) for v in ids])
    return frames, [sents[v][0] for v in ids], [sents[v][1:KCAP + 1] for v in ids]


class PassCounter:
    """Forward hooks on the first block of each tower: one call = one pass of that tower."""

    def __init__(self, backbone: ClipBackbone):
        self.visual = self.text = 0
        self.handles = [
            backbone.clip.visual.transformer.resblocks[0].register_forward_hook(lambda *a: self._add("visual")),
            backbone.text_tower.transformer.resblocks[0].register_forward_hook(lambda *a: self._add("text"))]

    def _add(self, tower: str) -> None:
        setattr(self, tower, getattr(self, tower) + 1)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("base", list(BASES))
def test_ecs_inside_the_base_representation_trains_with_one_backbone_pass(backbone_state, clips, base):
    frames, queries, aux = clips
    width = {"expert_width": 16} if base == "vop" else {}                       # bottleneck experts over VoP
    model = make(backbone_state, num_experts=3, top_k=1, router_hidden=8, expert_heads=2, base=base,
                 base_options=BASES[base], **width)
    assert model.cfg.representation and model.router.text_in is None          # video-routed evidence
    text = model.backbone.tokenize(queries)                                    # (N, L)
    caps = model.backbone.tokenize([c for cs in aux for c in cs]).view(CLIPS, KCAP, -1)  # (N, K, L)
    opt = torch.optim.AdamW(model.param_groups(3e-3, 3e-3, 0.0))

    def loss() -> dict[str, torch.Tensor]:
        torch.manual_seed(7)                                                   # T-MASS's training noise
        return model.loss(model.encode_text(text), model.encode_video(frames, caps))

    model.eval()
    with torch.no_grad():
        before = float(loss()["loss"])
    model.train()
    counter = PassCounter(model.backbone)
    try:
        for step in range(6):
            counter.visual = counter.text = 0
            out = loss()
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            # the frames go through the backbone once; the text tower once for the queries, once for the captions
            assert (counter.visual, counter.text) == (1, 2), (step, counter.visual, counter.text)
    finally:
        counter.close()
    assert "loss_base" in out and "expert_frac_00" in out
    model.eval()
    with torch.no_grad():
        after = float(loss()["loss"])
        assert after < before - 0.02, (base, before, after)
        tf, vf = model.encode_text(text), model.encode_video(frames, caps)
        S = model.similarity(tf, vf)
        # evaluation runs the base's own inference path on the enriched features
        assert torch.equal(S, model.base.similarity(model._sub(tf), model._sub(vf)))
        # the captions are in the representation: other captions, other scores
        other = model.similarity(tf, model.encode_video(frames, caps.roll(1, dims=0)))
        assert not torch.allclose(S, other, atol=1e-6)
    if base == "ucofia":               # per-granularity SK of the base, reached through ExCae
        sims = model.granularity_similarities(tf, vf)
        assert set(sims) == {"video_sentence", "frame_sentence", "patch_word"}
        assert vf["base.frames"].shape[1] == FRAMES + 1
        assert torch.allclose(model.combine(sims, sinkhorn_iters=4),
                              model.base.combine(model.base.granularity_similarities(model._sub(tf), model._sub(vf)),
                                                 sinkhorn_iters=4))
    else:
        assert not hasattr(model, "combine")
    if base in ("xpool", "tmass"):     # the text attends over T frames + the evidence token
        assert vf["base.frames"].shape[1] == FRAMES + 1
    from tvr.methods.base import prepare_video
    with torch.no_grad():              # the base's prepared-video path (if any) gives the same scores
        model.eval()
        prepared = prepare_video(model, vf)
        assert torch.allclose(model.similarity(tf, prepared), S, atol=1e-5)
        assert hasattr(model, "prepare_video") == hasattr(model.base, "prepare_video")
    if base == "tmass":                # training noise in the loss, the seeded sampler at evaluation
        model.train()
        a, b = (model.base.loss(model._sub(tf), model._sub(vf))["loss"].item() for _ in range(2))
        assert a != b
        assert model.base.cfg.num_frames == FRAMES + 1
    if base == "vop":                  # frozen CLIP: only VoP's prompts and ECS's heads train
        trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"experts", "router", "base"}
        assert not any(p.requires_grad for p in model.backbone.parameters())
        n_train, n_all = model.trainable_parameters()
        assert n_train == sum(p.numel() for p in [*model.experts.parameters(), *model.router.parameters(),
                                                  *(p for n, p in model.base.named_parameters()
                                                    if not n.startswith("backbone."))])
        assert 0 < n_train / n_all < 0.5
        assert model.experts[0].down.out_features == 16 and model.experts[0].up.out_features == 32
        full = make(backbone_state, num_experts=3, top_k=1, router_hidden=8, expert_heads=2, base=base,
                    base_options=BASES[base])
        assert sum(p.numel() for p in model.experts.parameters()) < sum(p.numel() for p in full.experts.parameters())


def test_representation_plugin_bad_frame_budget_is_one_clear_error(backbone_state, clips):
    frames, _, _ = clips
    model = make(backbone_state, num_experts=3, top_k=1, router_hidden=8, expert_heads=2, base="ucofia",
                 base_options={"max_frames": FRAMES, "temporal_layers": 0})
    with pytest.raises(ValueError, match="max_frames >= 5"):
        model.encode_video(frames[:2])
    with pytest.raises(ValueError, match="plugin=score"):
        ExCaeCfg(base="no_such", plugin="representation")
