"""Offline CSI backends (no network): a retrieval captioner and a rule-based prompt engineer.

The paper uses a multimodal LLM as captioner and an LLM as prompt engineer (the platform's
OpenAI-compatible backends, ``tvr_platform.captions.openai_backend``). These stand-ins need no
network and are deterministic, so the loop runs anywhere, and the prompt really changes their
output, so the loop is meaningful.

Retrieval captioner. Video embedding v̂ = normalise((1/T) Σ_t normalise(f_t)) from the current
retrieval backbone's frame features; bank captions b̂_n = normalise(CLIP EOS(b_n)) (the training
captions; a video's own annotations are excluded when its id is known, so a training video never
gets its ground truth back). The prompt is parsed into *directives*, each a count of distinct cue
phrases (:data:`CUES`, capped):

    count      "Generate N captions"           -> N' = min(N, K) captions
    diversity  different perspectives, unique, varied, diverse, distinct ...
    accuracy   accurate, relevant, faithful, precise, clearly visible ...
    detail     detail, descriptive, actions, emotions, objects, setting ...
    concise    concise, short, brief, succinct

and drives a maximal-marginal-relevance selection over the top-n bank captions:

    n   = clip(N' · (3 + 2·diversity − accuracy), N', |bank|)           candidate set C
    μ   = clip(0.2·diversity − 0.1·accuracy, 0, 0.8)
    pick argmax_{c ∈ C \\ S} (1 − μ) ⟨v̂, ĉ⟩ − μ max_{s ∈ S} ⟨ĉ, ŝ⟩    until |S| = N'
    detail ≥ 1: each picked caption is extended by the `detail` (≤ 2) candidates most relevant to
                the video and least similar to it:  argmax ⟨v̂, ĉ⟩ − ½ ⟨ĉ, â⟩, joined with "; "
    concise ≥ 1: each caption is cut to max(5, 16 − 4·concise) words

then every caption is cleaned and capped at ``max_tokens`` CLIP tokens.

Rule-based prompt engineer: a deterministic local search over prompts. A prompt is its first
sentence plus extra sentences; a neighbour adds one clause of :data:`CLAUSES` or removes one extra
sentence. The engineer looks at the examples of the best prompt (its worst-scored videos): when
λ · mean diversity < ½ · mean similarity the *diversity* side is weak and diversity/detail edits are
tried first, otherwise relevance edits (accuracy/concise additions, diversity removals) are. It
returns the first neighbour (in that priority) not tried before, and None when all were tried,
which the loop counts as a round without a new candidate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tvr.backbone import ClipBackbone
from tvr.captioning.core import Candidate, Example
from tvr.captioning.extractors import ClipTextExtractor
from tvr.captioning.text import MAX_CAPTION_TOKENS, clean_caption, dedupe

CUES: dict[str, tuple[str, ...]] = {
    "diversity": (r"different (?:perspectives?|angles?|viewpoints?|aspects?)", r"\bunique\b", r"\bvar(?:ied|iety)\b",
                  r"\bdivers", r"\bdistinct\b"),
    "accuracy": (r"\baccura", r"\brelevan", r"\bfaithful", r"\bprecise", r"clearly visible", r"reflect the content"),
    "detail": (r"\bdetail", r"\bdescriptive\b", r"\bactions?\b", r"\bemotions?\b", r"\bobjects?\b", r"\bsetting\b"),
    "concise": (r"\bconcise", r"\bshort\b", r"\bbrief", r"\bsuccinct"),
}
CUE_CAPS = {"diversity": 3, "accuracy": 3, "detail": 2, "concise": 3}
_COUNT = re.compile(r"\b(?:generate|write|produce|give|create|list|provide)\s+(?:me\s+)?(\d{1,3})\b", re.I)


@dataclass(frozen=True)
class Directives:
    count: int | None = None
    diversity: int = 0
    accuracy: int = 0
    detail: int = 0
    concise: int = 0


def parse_directives(prompt: str) -> Directives:
    """The instructions of a prompt that the retrieval captioner follows (module docstring)."""
    levels = {name: min(CUE_CAPS[name], sum(bool(re.search(p, prompt, re.I)) for p in pats))
              for name, pats in CUES.items()}
    m = _COUNT.search(prompt)
    count = int(m.group(1)) if m and int(m.group(1)) > 0 else None
    return Directives(count=count, **levels)


def _mmr(rel: Tensor, emb: Tensor, n: int, mu: float) -> list[int]:
    """Greedy MMR over candidates: rel (C,) relevance, emb (C, D) unit vectors -> n indices."""
    chosen: list[int] = []
    redundancy = torch.full_like(rel, -1.0)                             # (C,) max sim to chosen
    avail = torch.ones_like(rel, dtype=torch.bool)
    for _ in range(min(n, rel.shape[0])):
        gain = (1 - mu) * rel - mu * redundancy.clamp(min=0) if chosen else rel.clone()
        gain[~avail] = float("-inf")
        i = int(gain.argmax())
        chosen.append(i)
        avail[i] = False
        redundancy = torch.maximum(redundancy, emb @ emb[i])            # (C,)
    return chosen


class RetrievalCaptioner:
    """Captions videos by selecting and composing bank captions with the retrieval backbone."""

    def __init__(self, backbone: ClipBackbone, bank_texts: Sequence[str],
                 bank_video_ids: Sequence[str] | None = None, *, max_tokens: int = MAX_CAPTION_TOKENS,
                 batch_size: int = 256):
        if not bank_texts:
            raise ValueError("RetrievalCaptioner: the caption bank is empty (no training captions found)")
        if bank_video_ids is not None and len(bank_video_ids) != len(bank_texts):
            raise ValueError("RetrievalCaptioner: bank_video_ids must have one id per bank caption")
        self.backbone = backbone
        self.bank = [str(t) for t in bank_texts]
        self.bank_video_ids = list(bank_video_ids) if bank_video_ids is not None else None
        codes: dict[str, int] = {}
        self._bank_codes = (torch.tensor([codes.setdefault(v, len(codes)) for v in self.bank_video_ids])
                            if self.bank_video_ids is not None else None)      # (N,) video code per caption
        self._codes = codes
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self._bank_emb: Tensor | None = None

    def refresh(self) -> None:
        """Forget cached bank embeddings (call after the backbone's weights change)."""
        self._bank_emb = None

    @property
    def bank_embeddings(self) -> Tensor:
        if self._bank_emb is None:
            self._bank_emb = ClipTextExtractor(self.backbone, batch_size=self.batch_size).embed(self.bank)
        return self._bank_emb                                            # (N, D) unit rows

    @torch.no_grad()
    def embed_videos(self, frames: Tensor) -> Tensor:
        """frames (B, T, 3, H, W) -> v̂ (B, D)."""
        device = next(self.backbone.parameters()).device
        cls, _ = self.backbone.encode_frames(frames.to(device))          # (B, T, D)
        return F.normalize(F.normalize(cls.float(), dim=-1).mean(dim=1), dim=-1).cpu()

    @torch.no_grad()
    def caption(self, frames: Tensor, prompt: str, k: int, *,
                video_ids: Sequence[str] | None = None) -> list[list[str]]:
        d = parse_directives(prompt)
        n_out = min(k, d.count) if d.count else k
        bank = self.bank_embeddings                                      # (N, D)
        v = self.embed_videos(frames)                                    # (B, D)
        sims = v @ bank.t()                                              # (B, N)
        if video_ids is not None and self._bank_codes is not None:
            q = torch.tensor([self._codes.get(str(vid), -1) for vid in video_ids])       # (B,)
            own = q[:, None] == self._bank_codes[None, :]                # (B, N)
            sims = sims.masked_fill(own, float("-inf"))                  # leave-own-annotations-out
        N = bank.shape[0]
        n_cand = max(n_out, min(N, n_out * (3 + 2 * d.diversity - d.accuracy)))
        mu = min(max(0.2 * d.diversity - 0.1 * d.accuracy, 0.0), 0.8)
        out = []
        for b in range(sims.shape[0]):
            valid = int(torch.isfinite(sims[b]).sum())
            rel, idx = sims[b].topk(min(n_cand, valid))                  # (C,), (C,)
            emb = bank[idx]                                              # (C, D)
            picked = _mmr(rel, emb, n_out, mu)
            caps = []
            for a in picked:
                text = self.bank[int(idx[a])]
                if d.detail:
                    extra = rel - 0.5 * (emb @ emb[a])                   # complementary & relevant
                    extra[a] = float("-inf")
                    for e in extra.topk(min(d.detail, extra.shape[0] - 1)).indices.tolist():
                        clause = self.bank[int(idx[e])].strip().rstrip(".")
                        text = f"{text.strip().rstrip('.')}; {clause[:1].lower()}{clause[1:]}"
                if d.concise:
                    text = " ".join(text.split()[: max(5, 16 - 4 * d.concise)]).rstrip(",;")
                caps.append(clean_caption(text, self.max_tokens))
            out.append(dedupe(caps)[:n_out])
        return out


CLAUSES: dict[str, str] = {
    "diversity": "Make every caption unique.",
    "diversity2": "Use varied wording and distinct viewpoints.",
    "detail": "Ensure each caption captures key elements such as actions, emotions and visual details.",
    "detail2": "Mention the main objects and the setting.",
    "accuracy": "The captions must accurately reflect the content and context of the video.",
    "accuracy2": "Only describe what is clearly visible.",
    "concise": "Keep each caption concise.",
}
DIVERSITY_FIRST = ("+diversity", "+diversity2", "-concise", "+detail", "-accuracy", "+detail2",
                   "-accuracy2", "+accuracy", "+concise", "+accuracy2", "-detail", "-detail2")
RELEVANCE_FIRST = ("+accuracy", "+accuracy2", "+concise", "-diversity", "-diversity2", "-detail",
                   "+detail", "-detail2", "+detail2", "+diversity", "+diversity2", "-accuracy")


def split_sentences(prompt: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", prompt.strip()) if s]


class RuleBasedPromptEngineer:
    """Deterministic local search over prompt clauses (module docstring)."""

    def __init__(self, *, diversity_weight: float = 1.0):
        self.diversity_weight = diversity_weight

    def weak_side(self, examples: Sequence[Example]) -> str:
        if not examples:
            return "diversity"
        sim = sum(e.similarity for e in examples) / len(examples)
        div = sum(e.diversity for e in examples) / len(examples)
        return "diversity" if self.diversity_weight * div < 0.5 * sim else "relevance"

    def neighbours(self, prompt: str, weak: str) -> list[str]:
        sentences = split_sentences(prompt)
        head, extra = sentences[:1], sentences[1:]
        out = []
        for op in (DIVERSITY_FIRST if weak == "diversity" else RELEVANCE_FIRST):
            clause = CLAUSES[op[1:]]
            if op[0] == "+" and clause not in extra:
                out.append(" ".join([*head, *extra, clause]))
            elif op[0] == "-" and clause in extra:
                out.append(" ".join([*head, *[s for s in extra if s != clause]]))
        library = set(CLAUSES.values())
        out += [" ".join([*head, *[s for s in extra if s != x]]) for x in extra if x not in library]
        return out

    def rewrite(self, prompt: str, examples: Sequence[Example], history: Sequence[Candidate]) -> str | None:
        tried = {c.prompt for c in history} | {prompt}
        for cand in self.neighbours(prompt, self.weak_side(examples)):
            if cand not in tried:
                return cand
        return None
