"""Answering a text query from a :class:`~tvr_platform.search.index.VideoIndex`.

- Exhaustive: the method's own ``similarity(text, video)`` against every indexed clip, in chunks of
  ``chunk`` clips. Text-conditioned methods (X-Pool, T-MASS) pool their stored per-frame features
  for this query inside ``similarity``; nothing about the method is re-implemented here. The
  text-independent part of that pooling (the method's ``prepare_video``: the frames' keys and
  values) is computed once per index, not per query.
- Two-stage: a cheap coarse stage scores every clip by the cosine of global embeddings (the text
  embedding vs the clip's video embedding, per-frame features mean-pooled: a CLIP dual-encoder
  pass, one matrix product), keeps the ``candidates`` best, and the method's full similarity
  reranks only those. For UCoFIA (patch-word alignment, ISA) this is what makes a large index
  searchable; with ``candidates >= len(index)`` it returns exactly the exhaustive ranking.

The first stage (meanP's whole search: its similarity is that cosine, ``global_cosine = True``, so
the first stage's best k + 32 rescored by meanP itself are its exhaustive top k; the coarse stage
of two-stage search) is a FAISS index built once per index
(:mod:`~tvr_platform.search.first_stage`: exact flat, IVF from 1M clips). Ties are broken by index
order (``topk_stable``: ``torch.topk`` then a stable sort of the entries at or above the k-th value),
so exhaustive and two-stage agree whenever the first stage keeps every clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tvr.methods.base import Features, prepare_video
from tvr_platform.report.core import global_text_embedding, global_video_embedding
from tvr_platform.search.first_stage import FirstStage, topk_stable
from tvr_platform.search.index import VideoIndex

TIE_MARGIN = 32
"""Extra first-stage clips rescored by a ``global_cosine`` method's own similarity in exhaustive search."""
PREPARE_BYTES = 8 * 2**30
"""Largest size of the prepared per-clip tensors (``prepare_video``) a Searcher keeps for its index."""


@dataclass(frozen=True)
class SearchHit:
    rank: int
    video_id: str
    score: float


class Searcher:
    """Search one index with the model that built it."""

    def __init__(self, method: torch.nn.Module, index: VideoIndex, *, chunk: int = 4096,
                 prepare_bytes: int = PREPARE_BYTES, first_stage: str = "auto", global_first_stage: bool = False):
        self.method = method.eval()
        self.index = index
        self.chunk = chunk
        self.prepare_bytes = prepare_bytes
        self.first_stage_kind = first_stage
        self.global_first_stage = global_first_stage
        self._coarse_video: Tensor | None = None
        self._video: Features | None = None
        self._first: FirstStage | None = None

    def first_stage(self) -> FirstStage:
        """The FAISS index of the clips' unit global embeddings, built once per index."""
        if self._first is None:
            self._first = FirstStage(global_video_embedding(self.index.features), kind=self.first_stage_kind)
        return self._first

    # -- features ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_queries(self, queries: list[str]) -> Features:
        if not queries or any(not q.strip() for q in queries):
            raise ValueError("search: every query must be a non-empty string")
        return self.method.encode_text(self.method.backbone.tokenize(queries))

    @torch.no_grad()
    def video_features(self) -> Features:
        """The index's features plus the method's text-independent tensors (``prepare_video``, e.g.
        X-Pool's frame keys / values), computed once per index when the added tensors fit in
        ``prepare_bytes``; otherwise the stored features (``similarity`` then derives them per call)."""
        if self._video is None:
            feats, n = self.index.features, len(self.index)
            first = prepare_video(self.method, {k: v[:self.chunk] for k, v in feats.items()})
            added = {k for k in first if k not in feats}
            per_row = sum(first[k][:1].numel() * first[k].element_size() for k in added)
            if not added or per_row * n > self.prepare_bytes:
                self._video = feats
            else:
                parts = [first] + [prepare_video(self.method, {k: v[s:s + self.chunk] for k, v in feats.items()})
                                   for s in range(self.chunk, n, self.chunk)]
                self._video = {**feats, **{k: torch.cat([p[k] for p in parts]) for k in added}}
        return self._video

    def _video_rows(self, rows: Tensor | slice) -> Features:
        return {k: v[rows] for k, v in self.video_features().items()}

    def coarse_video(self) -> Tensor:
        """(N, D) L2-normalised global clip embeddings, computed once per index."""
        if self._coarse_video is None:
            self._coarse_video = global_video_embedding(self.index.features)
        return self._coarse_video

    # -- scoring ----------------------------------------------------------------------------------
    @torch.no_grad()
    def full_scores(self, text: Features, rows: Tensor | None = None) -> Tensor:
        """Method similarity of the queries (Q) vs the clips ``rows`` (default all) -> (Q, n)."""
        n = len(self.index) if rows is None else rows.numel()
        out = []
        for s in range(0, n, self.chunk):
            sel = slice(s, s + self.chunk) if rows is None else rows[s:s + self.chunk]
            out.append(self.method.similarity(text, self._video_rows(sel)).float())
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def coarse_scores(self, text: Features) -> Tensor:
        """Cosine of global embeddings, queries (Q) vs every clip -> (Q, N)."""
        return global_text_embedding(text) @ self.coarse_video().t()

    # -- search -----------------------------------------------------------------------------------
    @torch.no_grad()
    def search_features(self, text: Features, top_k: int, candidates: int | None = None
                        ) -> tuple[Tensor, Tensor]:
        """(scores (Q, k), clip rows (Q, k)). ``candidates`` None = exhaustive; else two-stage."""
        if top_k < 1:
            raise ValueError(f"search: top_k must be >= 1, got {top_k}")
        k = min(top_k, len(self.index))
        n_q = next(iter(text.values())).shape[0]
        if candidates is None and self.global_first_stage and getattr(self.method, "global_cosine", False):
            # similarity = cosine of global embeddings: the first stage's best k + TIE_MARGIN clips,
            # rescored by the method itself (opt-in: global_first_stage=True)
            candidates = k + TIE_MARGIN
        if candidates is None:
            full = self.full_scores(text)                                            # (Q, N)
            tops = [topk_stable(full[q], k) for q in range(n_q)]
        else:
            if candidates < k:
                raise ValueError(f"search: candidates ({candidates}) must be >= top_k ({top_k})")
            _, coarse = self.first_stage().search(global_text_embedding(text), candidates)   # (Q, C)
            tops = []
            for q in range(n_q):
                cand = coarse[q].sort().values                # index order: ties resolve as exhaustive
                tq = {key: v[q:q + 1] for key, v in text.items()}
                s, local = topk_stable(self.full_scores(tq, cand)[0], k)
                tops.append((s, cand[local]))
        return torch.stack([t[0] for t in tops]), torch.stack([t[1] for t in tops])

    def search(self, query: str, top_k: int = 10, candidates: int | None = None) -> list[SearchHit]:
        scores, rows = self.search_features(self.encode_queries([query]), top_k, candidates)
        return [SearchHit(rank=r + 1, video_id=self.index.ids[int(i)], score=float(s))
                for r, (s, i) in enumerate(zip(scores[0], rows[0]))]


def topk_overlap(exhaustive: Tensor, two_stage: Tensor) -> float:
    """Mean fraction of each query's exhaustive top-k found in its two-stage top-k (recall kept):
    rows (Q, k) of clip indices -> value in [0, 1]; 1 - it is the recall lost."""
    hits = [len(set(a.tolist()) & set(b.tolist())) / a.numel() for a, b in zip(exhaustive, two_stage)]
    return float(sum(hits) / len(hits))
