"""VoP (tvr.methods.vop, tvr.prompts) on the tiny random-init backbone."""

from __future__ import annotations

import copy

import pytest
import torch

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.methods.vop import SPEC, VARIANTS, VoP, VoPCfg
from tvr.prompts import trainable_parameters

W = 64            # tvr-tiny width of both towers
LAYERS = 2        # tvr-tiny layers of both towers
PATCHES = 16      # 32 px / 8 px patches -> 4 x 4
EOT = 49407       # CLIP tokenizer end-of-text id


def tiny_cfg(variant: str, **kw) -> VoPCfg:
    base = dict(variant=variant, prompt_length=2, text_prompt_length=3, num_frames=3, context_dim=8,
                intra_layers=1)
    return VoPCfg(**{**base, **kw})


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return ClipBackbone(BackboneCfg(name="tvr-tiny"))


def fresh(backbone: ClipBackbone, cfg: VoPCfg, seed: int = 1) -> VoP:
    torch.manual_seed(seed)
    return VoP(cfg, copy.deepcopy(backbone))


def frames_batch(B=4, T=3, seed=2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, 32, 32, generator=g)


CAPTIONS = ["a dog runs on the grass", "a man is cooking pasta", "two cats sleep", "a red car drives fast"]


# -- config ----------------------------------------------------------------------------------------

def test_config_validation(backbone):
    with pytest.raises(ValueError, match="base, P, C, F, F\\+C, full"):
        VoPCfg(variant="PC")
    with pytest.raises(ValueError, match="prompt_length"):
        VoPCfg(prompt_length=-1)
    with pytest.raises(ValueError, match="prompt_depth"):
        VoPCfg(prompt_depth=-2)
    with pytest.raises(ValueError, match=r"intra_layers \(K_s\)=3 exceeds"):
        VoP(tiny_cfg("F", intra_layers=3), copy.deepcopy(backbone))
    with pytest.raises(ValueError, match="prompt_depth=5 exceeds"):
        VoP(tiny_cfg("base", prompt_depth=5), copy.deepcopy(backbone))
    with pytest.raises(TypeError):
        VoPCfg("base")                                                   # keyword-only
    assert SPEC.name == "vop" and SPEC.config_cls is VoPCfg and SPEC.build is VoP


# -- exact reduction to CLIP -------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(prompt_depth=0), dict(prompt_length=0, text_prompt_length=0)])
def test_no_prompts_reproduce_plain_backbone(backbone, kw):
    model = fresh(backbone, tiny_cfg("base", **kw))
    frames, ids = frames_batch(2), backbone.tokenize(CAPTIONS[:2])
    with torch.no_grad():
        # the same (frozen) ClipBackbone's own encoders, bitwise
        assert torch.equal(model.encode_frames(frames), model.backbone.encode_frames(frames)[0])
        assert torch.equal(model.encode_text(ids)["text"], model.backbone.encode_text(ids)[0])
    assert model.trainable_parameters()[0] == 0


# -- text prompts and EOS pooling ---------------------------------------------------------------------

def reference_text(model: VoP, ids: torch.Tensor) -> torch.Tensor:
    """float64 loop: [SOT, prompts, words] + positions, hand-built causal mask, EOS found by id."""
    clip, P = model.backbone.clip, model.text_prompts.double()          # (depth, n, w)
    n = P.shape[1]
    out = []
    for row in ids:
        row = row[:clip.positional_embedding.shape[0] - n]               # trailing padding makes room
        eos = int((row == EOT).nonzero()[0, 0])
        x = clip.token_embedding(row[None]).double()                     # (1, L, w)
        for layer, block in enumerate(clip.transformer.resblocks):
            words = x[:, :1], x[:, (1 if layer == 0 else 1 + n):]
            x = torch.cat([words[0], P[layer][None], words[1]], dim=1)
            S = x.shape[1]
            if layer == 0:
                x = x + clip.positional_embedding[:S].double()
            mask = torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1)
            x = block(x, attn_mask=mask)
        x = clip.ln_final(x)[0, eos + n]                                 # EOS sits n slots later
        out.append(x @ clip.text_projection.double())
    return torch.stack(out)


def test_text_prompts_pool_the_eos_token(backbone):
    model = fresh(backbone, tiny_cfg("base")).double()
    ids = backbone.tokenize(CAPTIONS)
    with torch.no_grad():
        got = model.encode_text(ids)["text"]
        assert torch.allclose(got, reference_text(model, ids), atol=1e-10)
        # the pooled state sees the last word (causal) but no padding after EOS
        eos = int(ids[0].argmax())
        last_word, pad = ids.clone(), ids.clone()
        last_word[0, eos - 1] = 1000
        pad[0, eos + 1] = 320
        assert not torch.allclose(model.encode_text(last_word)["text"][0], got[0])
        assert torch.allclose(model.encode_text(pad)["text"][0], got[0], atol=1e-12)
        # the prompts do change the sentence feature
        assert not torch.allclose(got, model.backbone.encode_text(ids)[0])


def test_text_truncated_to_fit_prompts_keeps_eos(backbone):
    model = fresh(backbone, tiny_cfg("base")).double()
    long = " ".join(["word"] * 60)
    full = backbone.tokenize([long])                                     # (1, 32), EOS at slot 31
    assert int(full.argmax()) == 31
    fitted = backbone.tokenizer([long], context_length=32 - 3)           # tokenizer's own truncation
    with torch.no_grad():
        assert torch.allclose(model.encode_text(full)["text"], reference_text(model, fitted), atol=1e-10)


# -- video prompts ------------------------------------------------------------------------------------

def test_visual_prompts_sit_beside_cls_and_patches(backbone):
    model = fresh(backbone, tiny_cfg("base"))
    hidden: list[torch.Tensor] = []
    with torch.no_grad():
        out = model.encode_frames(frames_batch(2), hidden=hidden)
    assert out.shape == (2, 3, 32)
    assert [tuple(h.shape) for h in hidden] == [(2, 3, 1 + 2 + PATCHES, W)] * LAYERS


def test_position_prompts_shared_at_equal_relative_positions(backbone):
    model = fresh(backbone, tiny_cfg("P"))
    x, y, z = frames_batch(3, 1, seed=5).unbind(0)                       # three frames (1, 3, H, W)
    clips = torch.stack([torch.cat([x, y, z]), torch.cat([x, z, y]), torch.cat([y, x, z])])  # (3, T, ...)
    with torch.no_grad():
        f = model.encode_frames(clips)                                   # (3, T, D)
        p = model.frame_prompt_tokens(0, 2, 3)                           # (B, T, n, w)
    assert torch.equal(p[0], p[1]) and not torch.equal(p[0, 0], p[0, 1])
    assert torch.allclose(f[0, 0], f[1, 0], atol=1e-6)                   # same frame, same position
    assert torch.allclose(f[0, 2], f[2, 2], atol=1e-6)
    assert not torch.allclose(f[0, 0], f[2, 1], atol=1e-4)               # same frame, other position
    # relative positions: a 6-frame clip uses set floor(f * 3 / 6)
    p6 = model.frame_prompt_tokens(1, 1, 6)[0]                           # (6, n, w)
    assert torch.equal(p6[0], p6[1]) and torch.equal(p6[4], model.frame_prompts[1, 2])


def test_function_intra_layers_do_not_mix_frames(backbone):
    model = fresh(backbone, tiny_cfg("F"))
    clip = frames_batch(1)
    changed = clip.clone()
    changed[0, 0] += 1.0
    h1, h2 = [], []
    with torch.no_grad():
        model.encode_frames(clip, hidden=h1)
        model.encode_frames(changed, hidden=h2)
    assert torch.equal(h1[0][0, 1:], h2[0][0, 1:])                       # layer 0 < K_s: frames 1, 2 untouched
    assert not torch.allclose(h1[1][0, 1:], h2[1][0, 1:])                # layer 1 >= K_s: joint attention


def test_inter_frame_attention_on_a_static_clip_equals_per_frame(backbone):
    # duplicated keys/values leave softmax averages unchanged: a clip of one repeated frame gives
    # the same features with joint (inter-frame) attention as with per-frame attention
    f_model = fresh(backbone, tiny_cfg("F", prompt_depth=1)).double()
    b_model = fresh(backbone, tiny_cfg("base", prompt_depth=1)).double()
    with torch.no_grad():
        b_model.frame_prompts.copy_(f_model.frame_prompts)
        b_model.text_prompts.copy_(f_model.text_prompts)
        still = frames_batch(1, 1).double().expand(1, 3, -1, -1, -1)
        assert torch.allclose(f_model.encode_frames(still), b_model.encode_frames(still), atol=1e-10)
        moving = frames_batch(1).double()
        assert not torch.allclose(f_model.encode_frames(moving), b_model.encode_frames(moving), atol=1e-6)


def test_context_prompts_carry_other_frames(backbone):
    model = fresh(backbone, tiny_cfg("C"))
    with torch.no_grad():
        for gen in model.context:
            torch.nn.init.normal_(gen.up.weight, std=0.1)                # as after some training
            torch.nn.init.normal_(gen.temporal.out.weight, std=0.1)
        clip = frames_batch(1)
        changed = clip.clone()
        changed[0, 2] += 1.0
        a, b = model.encode_frames(clip), model.encode_frames(changed)
    assert not torch.allclose(a[0, 0], b[0, 0], atol=1e-6)               # frame 0 sees frame 2's change


# -- pooling, similarity, loss ----------------------------------------------------------------------

def test_video_feature_similarity_and_loss(backbone):
    model = fresh(backbone, tiny_cfg("full"))
    frames, ids = frames_batch(), backbone.tokenize(CAPTIONS)
    with torch.no_grad():
        f = model.encode_frames(frames).double()                         # (B, T, D)
        t = model.encode_text(ids)
        v = model.encode_video(frames)
        out = model.loss(t, v)
    assert out["loss"].shape == () and set(out) == {"loss", "logit_scale"}
    ref_v = torch.stack([sum(f[b, i] / f[b, i].norm() for i in range(3)) / 3 for b in range(4)])
    assert torch.allclose(v["video"].double(), ref_v, atol=1e-6)
    tt = t["text"].double()
    sims = torch.tensor([[float(tt[i] @ ref_v[j] / (tt[i].norm() * ref_v[j].norm())) for j in range(4)]
                         for i in range(4)], dtype=torch.float64)
    assert torch.allclose(model.similarity(t, v).double(), sims, atol=1e-6)
    logits = sims * backbone.clip.logit_scale.detach().double().exp()
    ref = 0.5 * (-torch.log_softmax(logits, 1).diag().mean() - torch.log_softmax(logits, 0).diag().mean())
    assert abs(float(out["loss"]) - float(ref)) < 1e-5


# -- parameter efficiency -----------------------------------------------------------------------------

def generator_count(w: int, r: int, T: int) -> int:
    down, up = w * r + r, r * w + w
    temporal = T * r + (3 * r * r + 3 * r) + (r * r + r) + (r * 4 * r + 4 * r) + (4 * r * r + r) + 2 * 2 * r + (r * r + r)
    return down + temporal + up


@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_count_matches_formula(backbone, variant):
    model = fresh(backbone, tiny_cfg(variant))
    n, n_t, T, r, K = 2, 3, 3, 8, 1
    text = LAYERS * n_t * W
    expected = {
        "base": text + LAYERS * n * W,
        "P": text + LAYERS * T * n * W,
        "C": text + LAYERS * n * W + LAYERS * generator_count(W, r, T),
        "F": text + K * n * W + (LAYERS - K) * n * W,
        "F+C": text + K * n * W + (LAYERS - K) * n * W + K * generator_count(W, r, T),
        "full": text + K * T * n * W + (LAYERS - K) * n * W + K * generator_count(W, r, T),
    }[variant]
    n_train, n_total = trainable_parameters(model)
    backbone_total = sum(p.numel() for p in backbone.parameters())
    assert n_train == expected and n_total == backbone_total + expected
    assert model.trainable_parameters() == (n_train, n_total)
    with_tau = fresh(backbone, tiny_cfg(variant, train_logit_scale=True))
    assert with_tau.trainable_parameters()[0] == expected + 1


# -- training: frozen backbone, loss goes down, tiny checkpoints --------------------------------------

# F+C is the union of two covered paths (as full); its real-size step runs in tests/test_repro_recipes.py.
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "F+C"])
def test_training_moves_only_prompts_and_lowers_loss(backbone, variant):
    model = fresh(backbone, tiny_cfg(variant))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    groups = model.param_groups(lr=1e-2, backbone_lr=1e-5, weight_decay=0.1)
    grouped = [p for g in groups for p in g["params"]]
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["lr"] == 1e-2 for g in groups)
    opt = torch.optim.Adam(groups)
    frames, ids = frames_batch(), model.backbone.tokenize(CAPTIONS)
    losses = []
    for _ in range(15):
        loss = model.loss(model.encode_text(ids), model.encode_video(frames))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05 and losses[-1] < losses[1] - 0.05, losses
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)        # bitwise frozen


def test_trainable_state_dict_roundtrip(backbone):
    cfg = tiny_cfg("full")
    model = fresh(backbone, cfg, seed=3)
    state = model.trainable_state_dict()
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(k.startswith("backbone.") for k in state)
    assert sum(v.numel() for v in state.values()) == model.trainable_parameters()[0]
    other = fresh(backbone, cfg, seed=4)
    frames, ids = frames_batch(2), backbone.tokenize(CAPTIONS[:2])
    with torch.no_grad():
        assert not torch.allclose(other.encode_video(frames)["video"], model.encode_video(frames)["video"])
        other.load_trainable_state_dict(state)
        assert torch.equal(other.encode_video(frames)["video"], model.encode_video(frames)["video"])
        assert torch.equal(other.encode_text(ids)["text"], model.encode_text(ids)["text"])
    with pytest.raises(KeyError, match="missing"):
        fresh(backbone, tiny_cfg("C")).load_trainable_state_dict(fresh(backbone, tiny_cfg("base")).trainable_state_dict())
    bad = dict(state, text_prompts=torch.zeros(1, 1, 1))
    with pytest.raises(ValueError, match="text_prompts"):
        other.load_trainable_state_dict(bad)


def test_grad_checkpointing_gives_the_same_gradients(backbone):
    frames, ids = frames_batch(2), backbone.tokenize(CAPTIONS[:2])
    grads = []
    for ckpt in (False, True):
        model = fresh(backbone, tiny_cfg("full"))
        for tower in (model.backbone.clip.visual, model.backbone.clip):
            tower.transformer.grad_checkpointing = ckpt
        model.loss(model.encode_text(ids), model.encode_video(frames))["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
