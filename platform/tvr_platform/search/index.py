"""``tvr index build``: embed a folder of videos with a registered model into a feature index.

Layout, next to the videos (``<parent of the videos URI>/tvr-index/<model slug>/`` by default)::

    index.json              model URI, method, backbone, num_frames, feature keys, video count
    shards/part-*.pt        torch.save({"ids": [video id, ...], "features": {key: (n, ...) tensor}})
    quarantine/*.jsonl      clips that could not be decoded (indexed with all-zero frames)

Each shard is the method's ``encode_video`` output for one Ray Data batch, so text-conditioned
methods (X-Pool, T-MASS) keep their per-frame features (``frames`` (n, T, D)) and pool them at
query time, and UCoFIA keeps its frame and patch tokens for the rerank stage.

Batch inference: the clip list -> ``map_batches(DecodeClips)`` (PyAV, the training pipeline's
decoder, evaluation-mode frame sampling) -> ``map_batches(EmbedClips)`` (an actor pool, each actor
holding the model) -> the driver writes one shard per batch. Shards are written atomically and
carry their video ids, so a rerun skips every clip already in a shard: an interrupted build
resumes where it stopped. A video id is the clip's path relative to the videos URI.
"""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from tvr_platform.config import JobCfg, join_uri
from tvr_platform.storage import Storage, StorageError, open_storage

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
META, SHARDS = "index.json", "shards"


def model_slug(model_uri: str) -> str:
    """models:/name@alias -> 'name@alias' made safe for a path."""
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", model_uri.removeprefix("models:/")).strip("_") or "model"


def default_index_uri(videos_uri: str, model_uri: str) -> str:
    """The index sits next to the data: ``<videos URI>/../tvr-index/<model slug>``."""
    base = videos_uri.rstrip("/")
    parent = base.rsplit("/", 1)[0] if "/" in base.removeprefix("s3://") else base
    return join_uri(parent, "tvr-index", model_slug(model_uri))


def list_videos(videos: Storage) -> list[str]:
    found = [p for p in videos.check().list() if p.lower().endswith(VIDEO_EXTENSIONS)]
    if not found:
        raise FileNotFoundError(f"{videos.uri}: no video files ({', '.join(VIDEO_EXTENSIONS)}) to index")
    return found


def pin_model_version(model_uri: str, tracking_uri: str) -> str:
    """models:/name@alias -> models:/name/<version> (an alias may move; the index must not)."""
    if not model_uri.startswith("models:/"):
        raise ValueError(f"{model_uri!r}: give a registered model, models:/name@alias or models:/name/version")
    ref = model_uri.removeprefix("models:/")
    if "@" not in ref:
        return model_uri
    from mlflow.tracking import MlflowClient

    name, alias = ref.split("@", 1)
    return f"models:/{name}/{MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version}"


def embed_gpus(job) -> int:
    """GPUs per embedding actor: 1 when the job asks for GPUs or the Ray cluster has any, else 0."""
    import ray

    return 1 if job.train.use_gpu or ray.cluster_resources().get("GPU", 0) >= 1 else 0


class EmbedClips:
    """Ray Data callable class: ``frames`` uint8 (B, T, S, S, 3) + ``valid`` -> the method's video
    features (frames normalised with ``norm = (mean, std)`` on the actor's device by
    :func:`tvr_platform.data.pipeline.model_frames`), one column ``feat.<key>`` per feature tensor
    (first dim B)."""

    def __init__(self, *, job_yaml: bytes, weights: bytes, norm: tuple[tuple[float, ...], tuple[float, ...]]):
        import tempfile
        from pathlib import Path

        from tvr_platform.registry import build_from_artifacts

        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "job.yaml").write_bytes(job_yaml)
            (Path(tmp) / "weights.pt").write_bytes(weights)
            _, self.method = build_from_artifacts(Path(tmp) / "job.yaml", Path(tmp) / "weights.pt")
        import ray

        # A GPU actor (num_gpus=1) embeds on its GPU; a CPU actor where it runs.
        self.device = torch.device("cuda", 0) if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
        self.method.to(self.device)
        self.norm = norm

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tvr_platform.data.pipeline import model_frames

        frames = model_frames(batch, self.norm, self.device)                    # (B, T, 3, S, S) f32
        feats = {k: v.cpu() for k, v in self.method.encode_video(frames).items()}
        out = {"video_id": batch["video_id"]}
        out.update({f"feat.{k}": (v.float() if v.is_floating_point() else v).numpy() for k, v in feats.items()})
        return out


@dataclass
class VideoIndex:
    uri: str
    meta: dict[str, Any]
    ids: list[str]
    features: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.ids)


def _read_shard(store: Storage, rel: str) -> dict[str, Any] | None:
    try:
        return torch.load(io.BytesIO(store.read_bytes(rel)), map_location="cpu", weights_only=True)
    except (StorageError, RuntimeError, EOFError, ValueError) as err:   # a torn write: redo its clips
        log.warning("%s: unreadable index shard (%s); its clips will be embedded again", store.url(rel), err)
        return None


def _done_ids(store: Storage) -> set[str]:
    done: set[str] = set()
    for rel in store.list(SHARDS):
        shard = _read_shard(store, rel) if rel.endswith(".pt") else None
        if shard is not None:
            done.update(shard["ids"])
    return done


def build_index(model_uri: str, videos_uri: str, *, overrides: list[str] | None = None,
                tracking_uri: str | None = None, index_uri: str | None = None, batch_size: int = 32,
                concurrency: int = 1, max_clips: int | None = None) -> dict[str, Any]:
    """Embed every video under ``videos_uri`` (local dir or s3://) with ``model_uri`` into an index.

    ``overrides`` apply to the model's job (storage endpoint, ``data.num_frames``, ``cluster.*``).
    ``max_clips`` stops after that many new clips (tests of resuming). Returns a summary dict.
    """
    import ray.data

    from tvr_platform.config import job_to_yaml, load_job, load_stored_job
    from tvr_platform.data.decode import DecodeClips
    from tvr_platform.data.pipeline import backbone_preprocess
    from tvr_platform.registry import download_model
    from tvr_platform.train.trainer import init_ray

    base = load_job(None, overrides or [])
    tracking_uri = tracking_uri or base.tracking_uri
    pinned = pin_model_version(model_uri, tracking_uri)
    job_file, weights_file = download_model(pinned, tracking_uri)
    job: JobCfg = load_stored_job(job_file, overrides or [], caller=base, where=pinned)
    videos = open_storage(videos_uri, endpoint_url=job.storage.endpoint_url, region=job.storage.region)
    index_uri = index_uri or default_index_uri(videos.uri, model_uri)
    store = open_storage(index_uri, endpoint_url=job.storage.endpoint_url, region=job.storage.region)
    files = list_videos(videos)
    meta = {"model": model_uri, "model_version": pinned, "tracking_uri": tracking_uri, "method": job.model.method, "backbone": job.model.backbone.name,
            "num_frames": job.data.num_frames, "videos": videos.uri, "job": job_to_yaml(job)}
    if store.exists(META):
        old = json.loads(store.read_text(META))
        if (old["model_version"], old["num_frames"]) != (pinned, job.data.num_frames):
            raise ValueError(f"{store.url(META)}: index was built by {old['model_version']} "
                             f"({old['num_frames']} frames), not {pinned} ({job.data.num_frames} frames); "
                             "pass another --index or delete it")
    store.write_bytes(META, json.dumps(meta, indent=1).encode())
    done = _done_ids(store)
    todo = [f for f in files if f not in done][:max_clips]
    summary = {"index": store.uri, "videos": len(files), "already_indexed": len(done & set(files)),
               "embedded": len(todo)}
    if not todo:
        return summary

    init_ray(job)
    size, mean, std = backbone_preprocess(job.model.backbone.name, job.model.backbone.pretrained,
                                job.model.backbone.image_size)
    rows = [{"video_index": np.int64(i), "file": f, "video_id": f, "epoch_seed": np.int64(0),
             "seg_start": np.float64(np.nan), "seg_end": np.float64(np.nan)} for i, f in enumerate(todo)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size + 1, 256)))
    ds = ds.map_batches(DecodeClips, fn_constructor_kwargs={
        "videos": videos, "num_frames": job.data.num_frames, "size": size, "decoder": job.data.decoder,
        "train": False, "seed": job.run.seed, "split": "index", "quarantine": store.child("quarantine")},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=job.data.decode_concurrency),
        num_cpus=job.data.decode_num_cpus)
    ds = ds.map_batches(EmbedClips, fn_constructor_kwargs={
        "job_yaml": job_file.read_bytes(), "weights": weights_file.read_bytes(),
        "norm": (mean, std)},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=job.train.cpus_per_worker, num_gpus=embed_gpus(job))
    from tqdm import tqdm

    written = 0
    bar = tqdm(total=len(todo), unit="clip", desc="[tvr] indexing", disable=None)  # a live bar on a terminal
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids = [str(x) for x in batch["video_id"]]
        bar.update(len(ids))
        feats = {k[5:]: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items() if k.startswith("feat.")}
        buf = io.BytesIO()
        torch.save({"ids": ids, "features": feats}, buf)
        store.write_bytes(f"{SHARDS}/part-{uuid.uuid4().hex}.pt", buf.getvalue())
        written += len(ids)
    bar.close()
    summary["embedded"] = written
    return summary


def load_index(index_uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> VideoIndex:
    """Read ``index.json`` and every shard; clips are ordered by video id (deterministic)."""
    store = open_storage(index_uri, endpoint_url=endpoint_url, region=region)
    if not store.exists(META):
        raise FileNotFoundError(f"{store.url(META)}: no tvr index here; build one with `tvr index build`")
    meta = json.loads(store.read_text(META))
    ids: list[str] = []
    parts: list[dict[str, torch.Tensor]] = []
    seen: set[str] = set()
    for rel in store.list(SHARDS):
        shard = _read_shard(store, rel) if rel.endswith(".pt") else None
        if shard is None:
            continue
        keep = [i for i, v in enumerate(shard["ids"]) if v not in seen]   # a clip twice: first shard wins
        seen.update(shard["ids"][i] for i in keep)
        ids += [shard["ids"][i] for i in keep]
        parts.append({k: v[keep] for k, v in shard["features"].items()})
    if not ids:
        raise FileNotFoundError(f"{store.uri}: the index has no shards yet; run `tvr index build` again")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    feats = {k: torch.cat([p[k] for p in parts])[order] for k in parts[0]}
    return VideoIndex(uri=store.uri, meta=meta, ids=[ids[i] for i in order], features=feats)


def clip_name(video_id: str) -> str:
    """'videos/video7.mp4' -> 'video7' (the MSR-VTT video id of a clip file)."""
    return PurePosixPath(video_id).stem
