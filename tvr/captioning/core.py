"""ExCae CSI (caption self-improvement): interfaces, the prompt score, and the loop (Algorithm 1).

Yang, Chen, Li, Yao, "Expertized Caption Auto-Enhancement for Video-Text Retrieval", arXiv
2502.02885. Three roles, each a small Protocol so any backend plugs in:

- a **captioner**        frames of B videos + prompt P  -> B lists of (up to) K captions
- a **prompt engineer**  best prompt + example (video, text, captions, score) records + history
                                                         -> a rewritten prompt (or None)
- a **semantic extractor** ψ   texts -> embeddings (N, E)

Prompt score on a fixed sample of N training videos (the same sample every round, so scores are
comparable). Video i has original texts {τ_i1 .. τ_iL_i} and generated captions {c_i1 .. c_iK_i};
with unit vectors ĉ = ψ(c)/‖ψ(c)‖ and τ̂ = ψ(τ)/‖ψ(τ)‖:

    sim_i    = (1 / (K_i L_i)) Σ_k Σ_l ⟨ĉ_ik, τ̂_il⟩                   relevance to the real texts
    S_i[p,q] = ⟨ĉ_ip, ĉ_iq⟩                                           caption-caption similarity
    div_i    = 1 − (2 / (K_i (K_i − 1))) Σ_{p<q} S_i[p,q]             each unordered pair once
                                                                      (div_i = 0 when K_i < 2)
    score(P) = (1/N) Σ_i ( sim_i + λ · div_i )                        λ = ``diversity_weight``

A video for which the captioner returned nothing contributes sim_i = div_i = 0 (a prompt that
makes the captioner fail is penalised, not ignored). The paper states the score as "similarity to
the original texts plus a diversity term from the pairwise similarity matrix"; the exact weighting
is not published: λ = 1 (a plain sum) is the default here.

Algorithm 1 (as implemented by :func:`self_improve`), n = ``candidates_per_round``:

    P* ← P₀;  s* ← score(P₀);  pool ← [(P₀, s*)];  stale ← 0
    for r = 1 .. max_rounds:
        entered ← false
        repeat n times:
            P ← engineer(P*, examples(P*), history)    examples: the worst-scored videos of P*
            if P is None or P was tried before: continue
            s ← score(P)
            if s > s*:  pool ← pool + [(P, s)];  P* ← P;  s* ← s;  entered ← true    (beats the pool)
        stale ← 0 if entered else stale + 1
        callback(round report)
        if stale ≥ patience: stop                       no new candidate entered the pool
        if the budget is spent: stop                    (a candidate scored on a cut-short caption
                                                         run is recorded, never accepted)
    return P*, pool (the best ``pool_size`` entries), history

The paper's stop rule is the default: ``patience = 1``, i.e. the loop ends at the first round in
which no new candidate enters the pool; the paper reports convergence after about 400 iterations,
so ``max_rounds`` (default 400 in ``captions.max_rounds``) is sized to let that happen and is a
safety cap, not the expected stop. ``patience > 1`` tolerates that many barren rounds in a row.

Only a prompt that beats every prompt in the pool enters it, so the pool is the chain of
successive best prompts; ``pool_size`` keeps its last (best) entries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

PAPER_INITIAL_PROMPT = "Generate {k} captions from different perspectives about this video."
"""The paper's iteration-0 prompt (supplementary Table 1), with K filled in."""


def initial_prompt(k: int, prompt: str = "") -> str:
    """The configured initial prompt, or the paper's with K substituted (no format() on user text)."""
    return prompt.strip() or PAPER_INITIAL_PROMPT.replace("{k}", str(k))


# -- interfaces -------------------------------------------------------------------------------------

@runtime_checkable
class Captioner(Protocol):
    def caption(self, frames: Tensor, prompt: str, k: int, *,
                video_ids: Sequence[str] | None = None) -> list[list[str]]:
        """frames (B, T, 3, H, W), CLIP-normalised -> B lists of at most k captions.

        ``video_ids`` lets a backend exclude the videos' own annotations (retrieval captioner)."""
        ...


@runtime_checkable
class SemanticExtractor(Protocol):
    def embed(self, texts: Sequence[str]) -> Tensor:
        """N texts -> (N, E) float embeddings (need not be normalised)."""
        ...


@dataclass
class Example:
    """One scored video of a prompt's evaluation, as shown to the prompt engineer."""

    video_id: str
    texts: list[str]
    captions: list[str]
    similarity: float
    diversity: float
    score: float


@dataclass
class Candidate:
    """A prompt tried by the loop and its score components (None = not evaluated: a repeat)."""

    prompt: str
    round: int
    score: float | None = None
    similarity: float | None = None
    diversity: float | None = None
    accepted: bool = False


@runtime_checkable
class PromptEngineer(Protocol):
    def rewrite(self, prompt: str, examples: Sequence[Example], history: Sequence[Candidate]) -> str | None:
        """Best prompt so far + its worst-scored examples + every tried candidate -> a new prompt."""
        ...


@dataclass
class VideoSample:
    """A training video for CSI: frames (T, 3, H, W) CLIP-normalised and its original texts."""

    video_id: str
    frames: Tensor
    texts: list[str]

    def __post_init__(self) -> None:
        if self.frames.ndim != 4 or self.frames.shape[1] != 3:
            raise ValueError(f"VideoSample {self.video_id!r}: frames must be (T, 3, H, W), "
                             f"got {tuple(self.frames.shape)}")
        if not self.texts:
            raise ValueError(f"VideoSample {self.video_id!r}: needs at least one original text")


# -- the score ---------------------------------------------------------------------------------------

@dataclass
class PromptScore:
    score: float
    similarity: float
    diversity: float
    examples: list[Example]
    num_captions: int
    num_empty: int

    def components(self) -> dict[str, float]:
        return {"score": self.score, "similarity": self.similarity, "diversity": self.diversity,
                "num_captions": float(self.num_captions), "num_empty": float(self.num_empty)}


def pair_mean_offdiag(s: Tensor) -> Tensor:
    """Mean of S[p, q] over unordered pairs p < q of a (K, K) matrix (K ≥ 2)."""
    K = s.shape[0]
    p, q = torch.triu_indices(K, K, offset=1, device=s.device)          # K(K-1)/2 pairs
    return s[p, q].mean()


def score_captions(extractor: SemanticExtractor, texts: Sequence[Sequence[str]],
                   captions: Sequence[Sequence[str]], *, diversity_weight: float = 1.0,
                   video_ids: Sequence[str] | None = None) -> PromptScore:
    """score(P) of the module docstring for N videos' original ``texts`` and generated ``captions``."""
    if len(texts) != len(captions):
        raise ValueError(f"score_captions: {len(texts)} text lists but {len(captions)} caption lists")
    ids = list(video_ids) if video_ids is not None else [str(i) for i in range(len(texts))]
    uniq: dict[str, int] = {}
    for group in [*texts, *captions]:
        for s in group:
            uniq.setdefault(s, len(uniq))
    emb = F.normalize(extractor.embed(list(uniq)).double(), dim=-1) if uniq else torch.zeros(0, 1)
    sims, divs, examples, n_caps, n_empty = [], [], [], 0, 0
    for vid, tx, cs in zip(ids, texts, captions):
        if not tx:
            raise ValueError(f"score_captions: video {vid!r} has no original text")
        if not cs:
            sim_i, div_i = 0.0, 0.0
            n_empty += 1
        else:
            c = emb[[uniq[s] for s in cs]]                               # (K_i, E)
            t = emb[[uniq[s] for s in tx]]                               # (L_i, E)
            sim_i = float((c @ t.t()).mean())                            # (1/(K L)) Σ_k Σ_l
            div_i = float(1.0 - pair_mean_offdiag(c @ c.t())) if len(cs) >= 2 else 0.0
        n_caps += len(cs)
        sims.append(sim_i)
        divs.append(div_i)
        examples.append(Example(vid, list(tx), list(cs), sim_i, div_i, sim_i + diversity_weight * div_i))
    n = max(len(sims), 1)
    sim, div = sum(sims) / n, sum(divs) / n
    return PromptScore(sim + diversity_weight * div, sim, div, examples, n_caps, n_empty)


# -- the loop ----------------------------------------------------------------------------------------

@dataclass
class RoundReport:
    """What the per-round callback receives."""

    round: int
    candidate: Candidate
    components: dict[str, float]
    best_prompt: str
    best_score: float
    pool_size: int
    stale: int
    examples: list[Example] = field(default_factory=list)


@dataclass
class CSIResult:
    best: Candidate
    pool: list[Candidate]
    history: list[Candidate]
    rounds: int
    stop_reason: str

    def to_dict(self) -> dict:
        return {"best": asdict(self.best), "pool": [asdict(c) for c in self.pool],
                "history": [asdict(c) for c in self.history], "rounds": self.rounds,
                "stop_reason": self.stop_reason}


def caption_samples(captioner: Captioner, samples: Sequence[VideoSample], prompt: str, k: int,
                    batch_size: int = 8) -> list[list[str]]:
    """Caption every sample with ``prompt`` in batches (frames of different T go one by one)."""
    out: list[list[str]] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        shapes = {tuple(s.frames.shape) for s in chunk}
        groups = [chunk] if len(shapes) == 1 else [[s] for s in chunk]
        for g in groups:
            frames = torch.stack([s.frames for s in g])                  # (b, T, 3, H, W)
            caps = captioner.caption(frames, prompt, k, video_ids=[s.video_id for s in g])
            if len(caps) != len(g):
                raise RuntimeError(f"captioner returned {len(caps)} caption lists for {len(g)} videos")
            out.extend([list(c)[:k] for c in caps])
    return out


def self_improve(samples: Sequence[VideoSample], *, captioner: Captioner, engineer: PromptEngineer,
                 extractor: SemanticExtractor, k: int = 10, initial: str = "", max_rounds: int = 400,
                 patience: int = 1, pool_size: int = 8, diversity_weight: float = 1.0,
                 num_examples: int = 4, batch_size: int = 8, candidates_per_round: int = 1,
                 callback: Callable[[RoundReport], None] | None = None,
                 evaluate: Callable[[str], PromptScore] | None = None,
                 budget_spent: Callable[[], bool] | None = None) -> CSIResult:
    """Run Algorithm 1 (module docstring). ``evaluate`` replaces caption+score (for tests/backends);
    ``budget_spent`` is asked after every evaluation and rewrite (True: stop, reason "budget")."""
    if not samples and evaluate is None:
        raise ValueError("self_improve: no sample videos; set captions.sample_size >= 1")
    if max_rounds < 0 or patience < 1 or pool_size < 1 or k < 1 or candidates_per_round < 1:
        raise ValueError("self_improve: need max_rounds >= 0, patience >= 1, pool_size >= 1, k >= 1, "
                         "candidates_per_round >= 1")
    spent = budget_spent or (lambda: False)

    def _evaluate(prompt: str) -> PromptScore:
        if evaluate is not None:
            return evaluate(prompt)
        caps = caption_samples(captioner, samples, prompt, k, batch_size)
        return score_captions(extractor, [s.texts for s in samples], caps,
                              diversity_weight=diversity_weight, video_ids=[s.video_id for s in samples])

    def _examples(ps: PromptScore) -> list[Example]:
        return sorted(ps.examples, key=lambda e: (e.score, e.video_id))[:num_examples]

    def _report(r: int, cand: Candidate, ps: PromptScore | None, stale: int) -> None:
        comps = ps.components() if ps is not None else {}
        comps["accepted"] = float(cand.accepted)
        if callback is not None:
            callback(RoundReport(r, cand, comps, best.prompt, float(best.score), len(pool), stale,
                                 _examples(best_eval)))

    p0 = initial_prompt(k, initial)
    best_eval = _evaluate(p0)
    best = Candidate(p0, 0, best_eval.score, best_eval.similarity, best_eval.diversity, accepted=True)
    pool, history = [best], [best]
    tried = {p0}
    _report(0, best, best_eval, 0)
    stale, stop, r = 0, "max_rounds", 0
    if spent():
        return CSIResult(best, pool, history, 0, "budget")
    for r in range(1, max_rounds + 1):
        entered, shown, shown_ps, out_of_budget = False, None, None, False
        for _ in range(candidates_per_round):
            proposal = engineer.rewrite(best.prompt, _examples(best_eval), list(history))
            cand = Candidate(proposal or "", r)
            ps = None
            if not proposal or proposal in tried:
                log.info("CSI round %d: no new prompt from the engineer (%s)", r,
                         "none" if not proposal else "repeat")
                out_of_budget = spent()
            else:
                tried.add(proposal)
                ps = _evaluate(proposal)
                cand.score, cand.similarity, cand.diversity = ps.score, ps.similarity, ps.diversity
                out_of_budget = spent()           # captions cut short by the budget: never accepted
                if ps.score > float(best.score) and not out_of_budget:
                    cand.accepted = True
                    best, best_eval = cand, ps
                    pool = [*pool, cand][-pool_size:]
                    entered = True
            history.append(cand)
            if shown is None or cand.accepted or (ps is not None and shown_ps is None):
                shown, shown_ps = cand, ps
            if out_of_budget:
                break
        stale = 0 if entered else stale + 1
        _report(r, shown, shown_ps, stale)
        if out_of_budget:
            stop = "budget"
            break
        if stale >= patience:
            stop = "patience"
            break
    return CSIResult(best, pool, history, r, stop)
