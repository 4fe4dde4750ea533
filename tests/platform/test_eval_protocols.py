"""Evaluation protocols: UCoFIA's one SK (per granularity, the method's key) on every evaluation
path, the bank form, and what reports name (SK form, caption protocol, v2t rank)."""

from __future__ import annotations

import pytest
import torch

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.methods.ucofia import UCoFIA, UCoFIACfg
from tvr.metrics import ranks_from_matrix
from tvr_platform.config import ConfigError, load_job
from tvr_platform.evaluation import evaluate, own_sinkhorn, sinkhorn_form
from tvr_platform.report.scoring import evaluate_method
from tvr_platform.train.step import RetrievalStep

WORDS = ["dog", "cat", "car", "room", "beach", "pasta", "red", "night", "two", "someone", "runs"]


@pytest.fixture(scope="module")
def ucofia_feats():
    torch.manual_seed(0)
    model = UCoFIA(UCoFIACfg(max_frames=4, temporal_layers=1, topk=2, sinkhorn_iters=4),
                   ClipBackbone(BackboneCfg(name="tvr-tiny"))).eval()
    with torch.no_grad():
        model.backbone.logit_scale.fill_(2.0)       # τ = e^-2: SK visibly re-ranks a random model
        caps = [f"a {WORDS[i % 11]} and a {WORDS[(3 * i + 1) % 11]}" for i in range(19)]
        text = model.encode_text(model.backbone.tokenize(caps))
        video = model.encode_video(torch.rand(7, 4, 3, 32, 32))
        bank = model.encode_text(model.backbone.tokenize([f"the {w}" for w in WORDS]))
    g = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6])
    return model, text, video, bank, g


def test_ucofia_sk_is_the_methods_own_on_every_path(ucofia_feats):
    model, text, video, _, g = ucofia_feats
    with torch.no_grad():
        sims = model.granularity_similarities(text, video)
        want = ranks_from_matrix(model.combine(sims).float(), g)            # cfg.sinkhorn_iters = 4
        plain = ranks_from_matrix(model.combine(sims, sinkhorn_iters=0).float(), g)
    assert not torch.equal(want.t2v, plain.t2v)                              # SK changes the ranks here
    # training-time evaluation and Tune (the worker's evaluate on the RetrievalStep) ...
    _, r_train = evaluate(RetrievalStep(model, gather=lambda x: x), text, video, g, block=5)
    # ... and tvr eval / tvr bench (evaluate_method), all the same SK
    _, r_eval = evaluate_method(model, text, video, g, block=5, dsl=False)
    for r in (r_train, r_eval):
        assert torch.equal(r.t2v, want.t2v) and torch.equal(r.v2t, want.v2t)
    _, r_off = evaluate_method(model, text, video, g, block=5, dsl=False, sinkhorn_iters=0)
    assert torch.equal(r_off.t2v, plain.t2v)
    with pytest.raises(ValueError, match="model.ucofia.sinkhorn_iters"):
        evaluate(RetrievalStep(model, gather=lambda x: x), text, video, g, sinkhorn_iters=4)
    assert own_sinkhorn(model) and own_sinkhorn(RetrievalStep(model, gather=lambda x: x))


def test_bank_form_uses_the_bank_potentials(ucofia_feats):
    model, text, video, bank, g = ucofia_feats
    with torch.no_grad():
        want = model.combine(model.granularity_similarities(text, video),
                             bank=model.granularity_similarities(bank, video))
    _, r = evaluate_method(model, text, video, g, block=4, dsl=False, bank_text=bank)
    ref = ranks_from_matrix(want.float(), g)
    assert torch.equal(r.t2v, ref.t2v) and torch.equal(r.v2t, ref.v2t)
    assert sinkhorn_form(model, sinkhorn_iters=0, bank=True) == "per-granularity x4, bank (training captions)"
    assert sinkhorn_form(model, sinkhorn_iters=0, own_iters=0) == "off"


def test_config_refuses_the_generic_sk_for_ucofia_and_names_protocols(tmp_path):
    from tvr_platform.recipes import protocol_name, sinkhorn_override

    with pytest.raises(ConfigError, match="model.ucofia.sinkhorn_iters"):
        load_job(None, ["model.method=ucofia", "eval.sinkhorn_iters=4"])
    spec = tmp_path / "u.yaml"
    spec.write_text("model:\n  method: ucofia\n")
    assert sinkhorn_override(str(spec), [], 3) == "model.ucofia.sinkhorn_iters=3"
    assert sinkhorn_override(str(spec), ["model.method=meanp"], 3) == "eval.sinkhorn_iters=3"
    job = load_job(None, ["data.eval_captions=first"])
    assert protocol_name(job).startswith("one caption per clip (first; MSR-VTT 1k-A); v2t rank over videos")
    job = load_job(None, ["data.format=didemo", "eval.v2t_rank=texts", "eval.dsl=true"])
    assert "paragraph-to-video" in protocol_name(job) and "DSL v2t over texts" in protocol_name(job)
