"""The first search stage: top-k clips by the cosine of global embeddings, in a FAISS index.

Serves meanP's exhaustive search (its similarity *is* that cosine: methods declaring
``global_cosine = True``) and the coarse stage of two-stage search. The clips' global embeddings
(per-frame features mean-pooled, :func:`~tvr_platform.report.core.global_video_embedding`) are
L2-normalised once, when the stage is built, and the query's top k come from

- ``flat`` (default below ``ivf_from`` clips): ``faiss.IndexFlatIP``, exact inner products;
- ``ivf`` (default from ``ivf_from`` clips on): ``faiss.IndexIVFFlat`` with nlist = √N inverted
  lists trained by k-means on 40 clips per list, ``nprobe`` lists visited per query
  (approximate: ``benchmarks/bench_search.py`` reports its recall of the exact top 10);
- ``hnsw``: ``faiss.IndexHNSWFlat`` (M = 32, efSearch = ``ef_search``), approximate;
- ``torch``: a matrix product and ``torch.topk`` (no FAISS; the reference the tests compare to).

A GPU FAISS build (``faiss.StandardGpuResources``) with a visible CUDA device moves flat and IVF
indices to GPU 0. Ties: the flat and torch stages return equal scores lower clip index first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

KINDS = ("auto", "flat", "ivf", "hnsw", "torch")
IVF_FROM = 1_000_000
"""Clips from which ``auto`` picks IVF instead of the exact flat index."""


ADD_ROWS = 65_536
"""Clips normalised and added to the FAISS index at a time."""


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).contiguous()


def topk_stable(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top k of ``scores`` (N,), ties -> lower index first (what a stable descending sort gives),
    via ``torch.topk`` and a stable sort of the few entries at or above the k-th value."""
    if k >= scores.numel():
        order = torch.sort(-scores, stable=True).indices
        return scores[order], order
    kth = torch.topk(scores, k, sorted=False).values.min()
    cand = torch.nonzero(scores >= kth).squeeze(1)                               # index order
    order = cand[torch.sort(-scores[cand], stable=True).indices[:k]]
    return scores[order], order


class FirstStage:
    """Top-k inner products of unit queries with the unit rows of ``vectors`` (N, D)."""

    def __init__(self, vectors: Tensor, *, kind: str = "auto", ivf_from: int = IVF_FROM, nprobe: int = 32,
                 ef_search: int = 128, seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"search first stage: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        n, d = vectors.shape
        self.n = n
        self.kind = ("ivf" if n >= ivf_from else "flat") if kind == "auto" else kind
        self.gpu = False
        if self.kind == "torch":
            self.unit = _unit(vectors)                                           # (N, D)
            return
        import faiss

        if self.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif self.kind == "ivf":
            nlist = max(1, min(int(math.sqrt(n)), n // 40))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            rows = np.random.default_rng(seed).choice(n, size=min(n, 40 * nlist), replace=False)
            index.train(_unit(vectors[torch.from_numpy(np.sort(rows))]).numpy())
            index.nprobe = min(nprobe, nlist)
        else:
            index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
        if self.kind in ("flat", "ivf") and hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available():
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
            self.gpu = True
        for s in range(0, n, ADD_ROWS):           # normalised in slices: no second full copy of the clips
            index.add(_unit(vectors[s:s + ADD_ROWS]).numpy())
        self.index = index

    def scores(self, queries: Tensor) -> Tensor:
        """Cosines of the queries (Q, D) with every clip -> (Q, N) (exact; for small indices, tests)."""
        q = torch.nn.functional.normalize(queries.float(), dim=-1)
        if self.kind == "torch":
            return q @ self.unit.t()
        return q @ torch.from_numpy(self.index.reconstruct_n(0, self.n)).t()

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Queries (Q, D), any norm -> (cosines (Q, k), clip rows (Q, k)), best first."""
        k = min(k, self.n)
        q = torch.nn.functional.normalize(queries.float(), dim=-1).contiguous()
        if self.kind == "torch":
            s = q @ self.unit.t()                                                # (Q, N)
            tops = [topk_stable(s[i], k) for i in range(q.shape[0])]
            return torch.stack([t[0] for t in tops]), torch.stack([t[1] for t in tops])
        dist, rows = self.index.search(q.numpy(), k)                             # (Q, k) each
        if self.kind == "ivf" and (rows < 0).any():      # fewer than k clips in the visited lists
            nprobe = self.index.nprobe
            while (rows < 0).any() and self.index.nprobe < self.index.nlist:
                self.index.nprobe = min(2 * self.index.nprobe, self.index.nlist)
                short = np.nonzero((rows < 0).any(axis=1))[0]
                dist[short], rows[short] = self.index.search(q.numpy()[short], k)
            self.index.nprobe = nprobe
        dist, rows = torch.from_numpy(dist), torch.from_numpy(rows).long()
        if self.kind == "flat":          # FAISS breaks ties arbitrarily: equal scores -> lower row first
            order = torch.from_numpy(np.lexsort((rows.numpy(), -dist.numpy()), axis=1))
            dist, rows = dist.gather(1, order), rows.gather(1, order)
        return dist, rows
