"""Frame cache: decode once (``tvr data prepare``), then read sampled frames from sharded Parquet.

    tvr data prepare job.yaml                    # every split the job uses
    tvr train job.yaml data.frames=cache         # or data.frames=auto: the cache when it matches

Layout, under ``data.cache_uri`` (default ``<data.root>/frame_cache``), one folder per split and
sampling: ``<split>-T<num_frames>-S<size>/`` holding ``part-*.parquet`` and ``_meta.json``. Rows:

- ``video_id`` (string), ``video_index`` (int64, index in the manifest at prepare time);
- ``frames``: ``data.cache_format='uint8'`` -> uint8 (T, S, S, 3) tensors (exact pixels), or
  ``'jpeg'`` -> a list of T JPEG images (quality ``data.cache_jpeg_quality``; ~10x smaller, lossy);
- ``valid`` (bool): False when the clip could not be decoded (its frames are zeros).

The cached frames are the *evaluation* sampling (segment middles, :mod:`tvr.data.frames`), resized
and centre-cropped to the backbone's input size; they are read back as the decoding path's uint8
rows and normalised on the consuming device (:func:`tvr_platform.data.pipeline.model_frames`), so
one cache serves every backbone with the same input size. Training from the cache therefore sees the same T
frames of a clip every epoch (no random offsets): the price of not decoding. Rows are matched to
the current manifest by ``video_id``; clips that are not in the cache are reported as missing
(evaluation keeps them as all-zero frames, as for undecodable clips; training skips them).
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from typing import Any

import numpy as np

from tvr_platform.config import JobCfg, join_uri
from tvr_platform.storage import storage_for

log = logging.getLogger(__name__)

CACHE_VERSION = 1
META = "_meta.json"


class CacheError(ValueError):
    """``data.frames=cache`` without a matching cache; the message says how to make one."""


def cache_root_uri(job: JobCfg) -> str:
    return job.data.cache_uri or join_uri(job.dataset_uri, "frame_cache")


def cache_uri(job: JobCfg, split: str) -> str:
    from tvr_platform.data.pipeline import backbone_preprocess

    size = backbone_preprocess(job.model.backbone.name, job.model.backbone.pretrained,
                                job.model.backbone.image_size)[0]
    return join_uri(cache_root_uri(job), f"{split}-T{job.data.num_frames}-S{size}")


def cache_meta(job: JobCfg, split: str) -> dict[str, Any] | None:
    """The ``_meta.json`` of the split's cache, or None when there is none."""
    st = storage_for(job, cache_uri(job, split))
    if not st.exists(META):
        return None
    return json.loads(st.read_text(META))


def use_cache(job: JobCfg, split: str) -> bool:
    """Whether ``split`` is read from the cache: ``data.frames`` = decode | cache | auto."""
    if job.data.frames == "decode":
        return False
    meta = cache_meta(job, split)
    if meta is not None and meta.get("version") == CACHE_VERSION:
        return True
    if job.data.frames == "cache":
        raise CacheError(f"data.frames=cache but {cache_uri(job, split)} holds no frame cache (version "
                         f"{CACHE_VERSION}) for split {split!r} with data.num_frames={job.data.num_frames}; run "
                         "`tvr data prepare <spec>` with the same data and model settings, or set data.frames=decode")
    return False


# -- writing ------------------------------------------------------------------------------------------

class EncodeForCache:
    """Ray Data UDF after :class:`DecodeClips` (raw): uint8 frames -> the cache's columns."""

    def __init__(self, fmt: str, quality: int):
        self.fmt, self.quality = fmt, quality

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = {"video_id": batch["video_id"], "video_index": batch["video_index"], "valid": batch["valid"]}
        if self.fmt == "uint8":
            out["frames"] = batch["frames"]                                       # (B, T, S, S, 3) uint8
            return out
        from PIL import Image

        jpegs = []
        for clip in batch["frames"]:
            imgs = []
            for frame in clip:
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, format="JPEG", quality=self.quality)
                imgs.append(buf.getvalue())
            jpegs.append(imgs)
        out["frames"] = jpegs
        return out


def prepare_cache(job: JobCfg, splits: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Decode every clip of ``splits`` (default: the job's train and test splits) once, with the
    evaluation sampling, and write the frame cache. Returns each split's ``_meta.json`` content."""
    import ray.data

    from tvr_platform.data.decode import DecodeClips, run_udf
    from tvr_platform.data.pipeline import _decode_kwargs, decode_num_cpus, load_manifest

    out = {}
    for split in splits or list(dict.fromkeys([job.data.train_split, *filter(None, [job.data.val_split]),
                                                 job.data.test_split])):
        manifest = load_manifest(job, split)
        segs = manifest.segments or [None] * manifest.num_videos
        rows = [{"video_index": np.int64(i), "video_id": vid, "file": f, "epoch_seed": np.int64(0),
                 "seg_start": np.float64(s[0] if s else np.nan), "seg_end": np.float64(s[1] if s else np.nan)}
                for i, (vid, f, s) in enumerate(zip(manifest.video_ids, manifest.video_files, segs))]
        kwargs = {**_decode_kwargs(job, split, train=False), "raw": True}
        st = storage_for(job, cache_uri(job, split)).check(writable=True)
        st.delete("")                                                     # a stale cache never mixes in
        fs, root = st.pyarrow_filesystem()
        rows_per_file = max(1, job.data.cache_rows_per_file)
        ds = (ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 1024)))
              .map_batches(run_udf, fn_kwargs={"udf_class": DecodeClips, "udf_key": uuid.uuid4().hex, **kwargs},
                           batch_size=8, concurrency=job.data.decode_concurrency, num_cpus=decode_num_cpus(job))
              .map_batches(EncodeForCache(job.data.cache_format, job.data.cache_jpeg_quality), batch_size=8))
        ds.write_parquet(root, filesystem=fs, min_rows_per_file=rows_per_file, max_rows_per_file=rows_per_file)
        valid = sum(int(b["valid"].sum()) for b in ray.data.read_parquet(root, filesystem=fs, columns=["valid"])
                    .iter_batches(batch_size=None, batch_format="numpy"))
        meta = {"version": CACHE_VERSION, "split": split, "dataset": manifest.dataset,
                "num_frames": job.data.num_frames, "size": kwargs["size"], "format": job.data.cache_format,
                "sampling": "uniform", "num_videos": manifest.num_videos, "num_valid": valid,
                "videos_uri": kwargs["videos"].url()}
        st.write_bytes(META, json.dumps(meta, indent=1).encode())
        log.info("frame cache for %s: %d clips (%d decodable) at %s", split, manifest.num_videos, valid, st.url())
        out[split] = meta
    return out


# -- reading ------------------------------------------------------------------------------------------

class FramesFromCache:
    """Ray Data UDF: cache rows -> the rows :func:`tvr_platform.data.pipeline.train_dataset` /
    ``video_dataset`` produce (uint8 frames, ``valid``, plus the manifest's per-clip columns)."""

    def __init__(self, *, extras: dict[str, dict[str, np.ndarray]], train: bool, num_frames: int, size: int):
        self.extras, self.train = extras, train
        self.num_frames, self.size = num_frames, size

    def _frames(self, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray) and value.dtype == np.uint8:
            return value                                                           # (T, S, S, 3)
        from PIL import Image

        return np.stack([np.asarray(Image.open(io.BytesIO(bytes(j))).convert("RGB")) for j in value])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {}
        for i, vid in enumerate(batch["video_id"]):
            extra = self.extras.get(str(vid))
            if extra is None:
                continue                                                           # not in this manifest
            ok = bool(batch["valid"][i])
            if not ok:
                if self.train:
                    continue
                frames = np.zeros((self.num_frames, self.size, self.size, 3), np.uint8)
            else:
                frames = self._frames(batch["frames"][i])                          # (T, S, S, 3) uint8
            cols.setdefault("frames", []).append(frames)
            cols.setdefault("valid", []).append(ok)
            for k, v in extra.items():
                cols.setdefault(k, []).append(v)
        if not cols:
            return {"frames": np.zeros((0, self.num_frames, self.size, self.size, 3), np.uint8),
                    "valid": np.zeros((0,), bool), "video_index": np.zeros((0,), np.int64)}
        return {k: np.stack(v) for k, v in cols.items()}


def cached_dataset(job: JobCfg, manifest: Any, *, train: bool, rows: list[dict[str, Any]]) -> Any:
    """A Ray Dataset over the split's cache with the columns of the decoding path.

    ``rows`` are the pipeline's per-clip rows (``_items``); their ``file``/``seg_*``/``epoch_seed``
    columns are dropped, the rest travel with the cached frames, matched by video id.
    """
    import ray.data

    from tvr_platform.data.decode import map_udf
    from tvr_platform.data.pipeline import backbone_preprocess, decode_num_cpus, quarantine_uri

    st = storage_for(job, cache_uri(job, manifest.split))
    meta = cache_meta(job, manifest.split) or {}
    size = backbone_preprocess(job.model.backbone.name, job.model.backbone.pretrained,
                                job.model.backbone.image_size)[0]
    if meta.get("size") != size or meta.get("num_frames") != job.data.num_frames:
        raise CacheError(f"{st.url()}: cache made for T={meta.get('num_frames')}, S={meta.get('size')}; "
                         f"the job needs T={job.data.num_frames}, S={size}; re-run `tvr data prepare`")
    drop = {"file", "seg_start", "seg_end", "epoch_seed"}
    # rows may be one rank's shard of the split: their video_index names the clip in the manifest
    extras = {manifest.video_ids[int(row["video_index"])]: {k: v for k, v in row.items() if k not in drop}
              for row in rows}
    cached = set()
    fs, root = st.pyarrow_filesystem()
    for b in ray.data.read_parquet(root, filesystem=fs, columns=["video_id"]).iter_batches(
            batch_size=None, batch_format="numpy"):
        cached.update(str(v) for v in b["video_id"])
    missing = [v for v in extras if v not in cached]
    if missing:
        qs = storage_for(job, quarantine_uri(job, manifest.split))
        recs = [{"uri": f"{st.url()}#{v}", "reason": "clip not in the frame cache", "split": manifest.split,
                 "action": "skipped" if train else "zero frames"} for v in missing]
        part = "" if len(rows) == len(manifest.video_ids) else f"-{int(rows[0]['video_index'])}"  # a shard's
        qs.write_bytes(f"cache-missing{part}.jsonl", "".join(json.dumps(r) + "\n" for r in recs).encode())
        log.warning("%d clip(s) of %s are not in the frame cache %s", len(missing), manifest.split, st.url())
    ds = ray.data.read_parquet(root, filesystem=fs)
    if train:
        from ray.data._internal.random_config import RandomSeedConfig

        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=job.run.seed % (2 ** 31),
                                                            reseed_after_execution=True))
    ds = map_udf(ds, FramesFromCache, {"extras": extras, "train": train,
                                       "num_frames": job.data.num_frames, "size": size},
                 batch_size=8, concurrency=job.data.decode_concurrency, num_cpus=decode_num_cpus(job))
    if not train and missing:
        zeros = np.zeros((job.data.num_frames, size, size, 3), np.uint8)
        fill = [{**extras[v], "frames": zeros, "valid": False} for v in missing]
        ds = ds.union(ray.data.from_items(fill))
    return ds
