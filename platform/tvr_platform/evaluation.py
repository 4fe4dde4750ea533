"""Embedding extraction and blockwise retrieval evaluation, shared by training, ``tvr eval`` and tuning.

``embed`` runs a model callable over batches and concatenates the per-batch feature dicts;
``evaluate`` scores text x video tiles through the method's ``similarity`` and computes the metrics
of ``tvr.metrics`` without materialising the full matrix (unless Sinkhorn-Knopp needs it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from tvr.methods.base import Features
from tvr.metrics import Ranks, blockwise_ranks, ranks_from_matrix, retrieval_metrics

ModelCall = Callable[..., Any]


def concat_features(parts: list[Features]) -> Features:
    """Row-wise concatenation; empty parts (a worker whose shard held no video) are skipped."""
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError("no features to concatenate (empty split?)")
    return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}


def slice_features(feats: Features, sl: slice) -> Features:
    return {k: v[sl] for k, v in feats.items()}


def to_device(feats: Features, device: torch.device | str) -> Features:
    return {k: v.to(device) for k, v in feats.items()}


def _to_cpu_float(feats: Features) -> Features:
    """Floating features -> float32 on CPU (bf16 models); integer features (e.g. keys) kept exact."""
    return {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in feats.items()}


def eval_device(use_gpu: bool = True) -> torch.device:
    """Where ``tvr eval`` embeds and scores: the first visible CUDA device, else the CPU."""
    return torch.device("cuda", 0) if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def pair_bytes(text: Features, video: Features) -> int:
    """A bound on the working memory of one (text, video) pair in ``similarity``: float32 copies of
    the larger per-item feature set (X-Pool / T-MASS pool a video's T x D frames per text; UCoFIA
    scores patch x word grids of that size), times 4 for intermediates."""
    def per_item(f: Features) -> int:
        return max(v[0].numel() for v in f.values()) if f else 1
    return 4 * 4 * max(per_item(text), per_item(video))


def score_block(requested: int, device: torch.device, text: Features, video: Features,
                free_bytes: int | None = None, share: float = 0.5) -> int:
    """Tile side for scoring: ``requested`` on CPU (unchanged); on CUDA the largest multiple of 128
    (at most 8192, at least 128) whose tile's working set ``b^2 * pair_bytes`` fits ``share`` of
    the device's free memory (``torch.cuda.mem_get_info`` unless ``free_bytes`` is given)."""
    if device.type != "cuda":
        return requested
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    side = int((share * free_bytes / pair_bytes(text, video)) ** 0.5) // 128 * 128
    return max(128, min(8192, side))


@torch.no_grad()
def embed_texts(model: ModelCall, texts: Tensor, batch_size: int, device: torch.device | str) -> Features:
    """texts (N, L) -> features on CPU, float32."""
    out = []
    for i in range(0, texts.shape[0], batch_size):
        f = model(mode="text", text=texts[i:i + batch_size].to(device))
        out.append(_to_cpu_float(f))
    return concat_features(out)


@torch.no_grad()
def embed_videos(model: ModelCall, batches: Iterable[dict[str, Tensor]], device: torch.device | str,
                 norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> tuple[Features, Tensor]:
    """Batches with 'frames' and 'video_index' (B,) -> (features on CPU, video_index).

    'frames': the data path's uint8 (B,T,S,S,3) (+ 'valid'), normalised on ``device`` with
    ``norm = (mean, std)`` (:func:`tvr_platform.data.pipeline.model_frames`), or float
    (B,T,3,H,W) already normalised. No batches (a shard with no video): ``({}, empty index)``,
    which :func:`concat_features` skips."""
    from tvr_platform.data.pipeline import model_frames

    feats, index = [], []
    for batch in batches:
        captions = batch.get("aux_texts")
        if norm is None and not batch["frames"].is_floating_point():
            raise ValueError("embed_videos: uint8 frames need norm=(mean, std) (frame_norm(job))")
        f = model(mode="video", frames=model_frames(batch, norm or ((), ()), device),
                  captions=None if captions is None else captions.to(device))
        feats.append(_to_cpu_float(f))
        index.append(batch["video_index"].long().cpu())
    if not feats:
        return {}, torch.zeros(0, dtype=torch.long)
    return concat_features(feats), torch.cat(index)


def embed_actor_options(job: Any, num_videos: int, cluster: dict[str, float] | None = None) -> dict[str, Any]:
    """Ray Data actor-pool options for embedding videos (``tvr eval``, ``tvr index build``): when
    the Ray cluster has GPUs (``cluster``: ``ray.cluster_resources()`` unless given) or the job sets
    ``train.use_gpu``, one GPU per actor and one actor per cluster GPU (at most one per batch of
    ``data.eval_batch_size`` videos); otherwise one CPU actor holding ``train.cpus_per_worker`` CPUs."""
    import math

    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    gpus = int(cluster.get("GPU", 0))
    if job.train.use_gpu or gpus >= 1:
        batches = max(1, math.ceil(num_videos / max(1, job.data.eval_batch_size)))
        return {"num_gpus": 1, "num_cpus": min(1.0, job.train.cpus_per_worker), "concurrency": max(1, min(gpus, batches))}
    return {"num_gpus": 0, "num_cpus": job.train.cpus_per_worker, "concurrency": 1}


class EmbedVideos:
    """Ray Data callable class: evaluation rows (``frames``, ``video_index``, optional
    ``aux_texts``) -> ``video_index`` + one column ``feat.<key>`` per video feature (float32 on CPU,
    as :func:`embed_videos` returns them). A GPU actor embeds on its GPU, a CPU actor with as many
    threads as the CPUs it holds."""

    def __init__(self, *, method: torch.nn.Module, num_cpus: float = 1.0,
                 norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None):
        import ray

        from tvr_platform.train.step import RetrievalStep

        gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        if not gpu:
            torch.set_num_threads(max(1, int(num_cpus)))
        self.model = RetrievalStep(method.eval(), gather=lambda x: x).to(self.device)
        self.norm = norm                          # uint8 frames are normalised on the actor's device

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        tensors = {k: torch.from_numpy(np.ascontiguousarray(batch[k]))
                   for k in ("frames", "valid", "video_index", "aux_texts") if k in batch}
        feats, index = embed_videos(self.model, [tensors], self.device, self.norm)
        return {"video_index": index.numpy(), **{f"feat.{k}": v.numpy() for k, v in feats.items()}}


def embed_videos_ray(method: torch.nn.Module, dataset: Any, *, num_videos: int, batch_size: int,
                     job: Any, norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> Features:
    """Every video of a Ray Dataset of evaluation rows embedded by a Ray Data actor pool
    (:class:`EmbedVideos`, options from :func:`embed_actor_options`), gathered on the driver in
    ``video_index`` order 0..num_videos-1. ``method`` must be on the CPU (it is shipped to the actors)."""
    import numpy as np

    opts = embed_actor_options(job, num_videos)
    ds = dataset.map_batches(EmbedVideos, fn_constructor_kwargs={"method": method, "num_cpus": opts["num_cpus"],
                                                                 "norm": norm},
                             batch_size=batch_size, batch_format="numpy", concurrency=opts["concurrency"],
                             num_cpus=opts["num_cpus"], num_gpus=opts["num_gpus"])
    feats, index = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        index.append(torch.from_numpy(np.ascontiguousarray(batch["video_index"])).long())
        feats.append({k[5:]: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()
                      if k.startswith("feat.")})
    if not feats:
        return order_by_index({}, torch.zeros(0, dtype=torch.long), num_videos)
    return order_by_index(concat_features(feats), torch.cat(index), num_videos)


def order_by_index(feats: Features, index: Tensor, n: int) -> Features:
    """Rows gathered from several workers in any order -> rows sorted by index 0..n-1."""
    if index.numel() != n or not torch.equal(torch.sort(index).values, torch.arange(n)):
        missing = sorted(set(range(n)) - set(index.tolist()))[:10]
        raise RuntimeError(f"evaluation covered {index.numel()} of {n} videos (missing e.g. {missing}); "
                           "see the data quarantine report for skipped files")
    order = torch.argsort(index)
    return {k: v[order] for k, v in feats.items()}


PREPARED_KEEP_BYTES = 2 * 2**30
"""Prepared video blocks (the model's ``prepare_video``) an evaluation holds on its device."""


class VideoBlocks:
    """Video feature blocks on the scoring device, each prepared once (the model's ``prepare_video``
    mode: text-independent tensors such as X-Pool's frame keys / values) and held within
    ``keep_bytes``, so every block of texts reuses them; blocks beyond the budget are prepared
    again when asked for (same scores either way)."""

    def __init__(self, model: ModelCall, video: Features, device: torch.device | str,
                 keep_bytes: int = PREPARED_KEEP_BYTES):
        self.model, self.video, self.device, self.budget = model, video, device, keep_bytes
        self.kept: dict[tuple[int, int], Features] = {}

    def __call__(self, vs: slice) -> Features:
        key = (vs.start, vs.stop)
        if key in self.kept:
            return self.kept[key]
        feats = self.model(mode="prepare_video", video_feats=to_device(slice_features(self.video, vs), self.device))
        size = sum(v.numel() * v.element_size() for v in feats.values())
        if size <= self.budget:
            self.kept[key] = feats
            self.budget -= size
        return feats


@torch.no_grad()
def similarity_matrix(model: ModelCall, text: Features, video: Features, block: int,
                      device: torch.device | str) -> Tensor:
    n_t, n_v = next(iter(text.values())).shape[0], next(iter(video.values())).shape[0]
    sims = torch.empty(n_t, n_v)
    videos = VideoBlocks(model, video, device)
    for i in range(0, n_t, block):
        for j in range(0, n_v, block):
            sims[i:i + block, j:j + block] = model(
                mode="similarity", text_feats=to_device(slice_features(text, slice(i, i + block)), device),
                video_feats=videos(slice(j, j + block))).float().cpu()
    return sims


def own_sinkhorn(method: Any) -> bool:
    """True for a method that defines its own SK (per granularity, at its own temperature: UCoFIA,
    or ExCae over UCoFIA, which exposes its base's hooks): ``granularity_similarities`` + ``combine``."""
    method = getattr(method, "method", method)                      # a RetrievalStep wraps it
    return hasattr(method, "granularity_similarities") and hasattr(method, "combine")


def _own_cfg_iters(method: Any) -> tuple[int, bool]:
    """(SK iterations of the method whose ``combine`` runs, whether the outer method owns that key)."""
    owner = getattr(method.combine, "__self__", method)
    return int(owner.cfg.sinkhorn_iters), owner is method


def sinkhorn_form(method: Any, *, sinkhorn_iters: int, own_iters: int | None = None,
                  bank: bool = False) -> str:
    """What a report says about the SK that produced its numbers."""
    if own_sinkhorn(method):
        inner = getattr(method, "method", method)
        n = (sinkhorn_iters or _own_cfg_iters(inner)[0]) if own_iters is None else own_iters
        return f"per-granularity x{n}, {'bank (training captions)' if bank else 'transductive'}" if n else "off"
    return f"final matrix x{sinkhorn_iters}, transductive" if sinkhorn_iters else "off"


@torch.no_grad()
def evaluate(model: ModelCall, text: Features, video: Features, text_to_video: Tensor, *,
             block: int = 1024, dsl: bool = False, sinkhorn_iters: int = 0,
             device: torch.device | str = "cpu", v2t_rank: str = "videos", dsl_v2t: str = "texts",
             own_iters: int | None = None, bank_text: Features | None = None) -> tuple[dict[str, float], Ranks]:
    """Metrics of texts vs videos. Tiles of ``block`` x ``block``; Sinkhorn-Knopp needs the full
    matrix (it normalises every row and column), so it materialises it. ``model`` answers the
    modes 'similarity' and 'prepare_video' (:class:`~tvr_platform.train.step.RetrievalStep`).

    SK: a method with its own SK (:func:`own_sinkhorn`, UCoFIA) always gets it, the paper's form:
    each granularity's full matrix balanced at the method's temperature, then averaged
    (``UCoFIA.combine``), with ``own_iters`` iterations (None = the method's
    ``cfg.sinkhorn_iters``, e.g. ``model.ucofia.sinkhorn_iters``) and, given ``bank_text``
    (embedded training captions), the official bank form. ``sinkhorn_iters`` is the generic SK of
    the final matrix for every other method (τ = 1); it must be 0 for a method with its own.
    ``v2t_rank`` / ``dsl_v2t``: see :mod:`tvr.metrics`."""
    n_v = next(iter(video.values())).shape[0]
    dsl_temp = 100.0 if dsl else None
    kw = {"dsl_temp": dsl_temp, "v2t_rank": v2t_rank, "dsl_v2t": dsl_v2t}
    if own_sinkhorn(model):
        method = getattr(model, "method", model)
        cfg_iters, direct = _own_cfg_iters(method)
        if sinkhorn_iters and direct:
            raise ValueError(f"eval.sinkhorn_iters={sinkhorn_iters}: {type(method).__name__} has its own "
                             f"per-granularity SK; set model.{type(method).__name__.lower()}.sinkhorn_iters instead")
        # a wrapper (ExCae over UCoFIA) has no key of its own: eval.sinkhorn_iters drives its base's SK
        n_iter = own_iters if own_iters is not None else (sinkhorn_iters or cfg_iters)
        if n_iter:
            sims = method.combine(method.granularity_similarities(to_device(text, device), to_device(video, device)),
                                  sinkhorn_iters=n_iter,
                                  bank=None if bank_text is None else method.granularity_similarities(
                                      to_device(bank_text, device), to_device(video, device)))
            ranks = ranks_from_matrix(sims.float().cpu(), text_to_video, block=block, **kw)
            return retrieval_metrics(ranks), ranks
    if sinkhorn_iters > 0:
        from tvr.sinkhorn import sinkhorn_normalise

        sims = sinkhorn_normalise(similarity_matrix(model, text, video, block, device), sinkhorn_iters)
        ranks = ranks_from_matrix(sims, text_to_video, block=block, **kw)
    else:
        videos = VideoBlocks(model, video, device)

        def score(ts: slice, vs: slice) -> Tensor:
            return model(mode="similarity", text_feats=to_device(slice_features(text, ts), device),
                         video_feats=videos(vs)).float().cpu()

        ranks = blockwise_ranks(score, text_to_video, n_v, block=block, **kw)
    return retrieval_metrics(ranks), ranks
