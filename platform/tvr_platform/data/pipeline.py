"""Annotation manifests + video storage -> Ray Data datasets of ready tensors (what the trainer calls).

    manifest = load_manifest(job, job.data.train_split)
    ds = train_dataset(job, manifest)            # rows: frames, texts, num_texts, video_index
    trainer = TorchTrainer(..., datasets={"train": ds, "test": video_dataset(job, test_manifest)})
    # in the worker:
    for b in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=job.data.batch_size):
        text = pick_captions(b["texts"], b["num_texts"], b["video_index"], epoch, job.run.seed)  # (B, L)
        frames = model_frames(b, frame_norm(job), device)       # uint8 -> (B, T, 3, S, S) f32 on device
    # after fit:
    write_quarantine(job, run_dir_uri, manifest, test_manifest)

Rows (no string columns, so ``iter_torch_batches`` works directly):

- ``train_dataset``: ``frames`` uint8 (T, S, S, 3) RGB, S = the backbone's input size (resized
  and centre-cropped, *not* normalised: 4x fewer bytes travel than as float32), ``valid`` bool
  (False: the clip could not be decoded, its frames are zeros); :func:`model_frames` turns them
  into the model's input -- float32 (B, T, 3, S, S) normalised with the backbone's mean/std -- on
  the training / embedding device, on every path (training, evaluation, index build, captioning,
  benchmarks); ``texts`` int64 (K_max, L): every caption of the clip tokenised
  with the backbone tokenizer, rows of zeros after the ``num_texts`` real ones; ``num_texts``
  int64; ``video_index`` int64 (index into ``manifest.video_ids``).
- ``video_dataset``: ``frames``, ``valid``, ``video_index``.
- both, when ``data.aux_captions`` names a generated caption set (``tvr captions generate``):
  ``aux_texts`` int64 (K, L), the clip's generated captions tokenised, zero rows as padding.

Sampling: T frames, random offset inside each of T equal segments for training, segment middles
for evaluation (:mod:`tvr.data.frames`). Training offsets and the row order are deterministic
functions of ``(run.seed, epoch_seed, pass, video_index)``, where *pass* is Ray Data's execution
index of the dataset (``DataContext._execution_idx``, incremented on every iteration), so every
epoch that iterates the same dataset sees fresh offsets and a fresh order, reproducibly.

Decoding runs in ``map_batches`` as plain tasks (``data.decode_concurrency`` at a time, of
``data.decode_num_cpus`` CPUs; one decoder with its pyarrow filesystem per worker process, kept
warm across epochs, see :func:`.decode.run_udf`) that read the bytes from
the videos URI (local, or S3 through ``pyarrow.fs.S3FileSystem`` with the job's endpoint) with
retries on transient errors, and decodes with PyAV (keyframe-aware sampling).

Frame cache (``data.frames=cache|auto``, :mod:`.cache`): the same rows, read from the sharded
Parquet that ``tvr data prepare`` wrote (evaluation sampling, decoded once).

Bad input never kills a job. Rules (each case is counted and written to the quarantine report,
one JSON object per line: ``{"uri", "reason", "split", "action"}``):

- annotation problems (empty / non-UTF-8 caption, a video without captions, repeated ids): dropped
  when the manifest is read (``Manifest.quarantine``);
- a missing, zero-length, corrupt, truncated-beyond-use, audio-only or undecodable video:
  *training* skips the row; *evaluation* keeps it with all-zero frames (so that video indices stay
  aligned and the clip simply counts as a miss in the metrics);
- a clip shorter than T frames: padded by repeating its last frame (action "padded");
- a partly damaged clip: the nearest decodable frames stand in (action "patched").

Records are appended by the decode actors as small JSONL part files under
``quarantine_uri(job)`` (``<storage>/quarantine/<run.name>/<split>/``);
:func:`write_quarantine` merges them with the manifests' records into one ``quarantine.jsonl``
next to the run and returns the number of records.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from tvr.data.annotations import Manifest, read_manifest
from tvr_platform.config import JobCfg, join_uri
from tvr_platform.data.decode import DecodeClips, map_udf
from tvr_platform.storage import Storage, storage_for

log = logging.getLogger(__name__)


# -- backbone facts, without building the model --------------------------------------------------

def backbone_preprocess(name: str, pretrained: str | None = None,
                        image_size: int = 0) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(image size, mean, std) of open_clip model ``name`` from its config (no weights built);
    ``image_size`` > 0 (``model.backbone.image_size``) overrides the config's size.

    mean/std: the pretrained tag's values when ``pretrained`` is an open_clip tag, else the
    model config's ``preprocess_cfg``, else OpenAI CLIP's -- the same precedence as
    ``open_clip.create_model``.
    """
    import open_clip

    from tvr.backbone import register_tvr_model_configs

    register_tvr_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"model.backbone.name={name!r} is not an open_clip model config")
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    size = image_size or int(size[0] if isinstance(size, list | tuple) else size)
    mean, std = tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)
    pp = cfg.get("preprocess_cfg") or {}
    mean, std = tuple(pp.get("mean", mean)), tuple(pp.get("std", std))
    if pretrained and "/" not in pretrained and not pretrained.endswith((".pt", ".bin", ".safetensors")):
        tag = open_clip.get_pretrained_cfg(name, pretrained) or {}
        mean, std = tuple(tag.get("mean") or mean), tuple(tag.get("std") or std)
    return size, mean, std


def frame_norm(job: JobCfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) that :func:`model_frames` normalises the job's frames with (the backbone's)."""
    return backbone_preprocess(job.model.backbone.name, job.model.backbone.pretrained,
                                job.model.backbone.image_size)[1:]


def model_frames(batch: dict[str, Any], norm: tuple[tuple[float, ...], tuple[float, ...]],
                 device: torch.device | str | None = None) -> torch.Tensor:
    """A batch's ``frames`` as the model's input on ``device``: uint8 (B, T, S, S, 3) ->
    float32 (B, T, 3, S, S), ``(x / 255 - mean) / std`` with ``norm = (mean, std)``
    (:func:`frame_norm`); rows whose ``valid`` is False become all-zero frames. The one place the
    data path's frames are normalised (:func:`tvr.data.frames.normalize_on_device`); batches may be
    torch tensors (``iter_torch_batches``) or numpy arrays (``map_batches`` UDFs)."""
    from tvr.data.frames import normalize_on_device

    frames, valid = batch["frames"], batch.get("valid")
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if isinstance(valid, np.ndarray):
        valid = torch.from_numpy(valid.astype(bool))
    return normalize_on_device(frames, *norm, valid=valid, device=device)


def _tokens(job: JobCfg, captions: list[str]) -> np.ndarray:
    from tvr.backbone import get_tokenizer

    tok = get_tokenizer(job.model.backbone.name)
    if not captions:
        return np.zeros((0, tok.context_length), np.int64)
    return tok(captions).numpy().astype(np.int64)                            # (N, L)


# -- storage locations ---------------------------------------------------------------------------

def dataset_storage(job: JobCfg) -> Storage:
    return storage_for(job, job.dataset_uri)


def videos_uri(job: JobCfg) -> str:
    v = job.data.videos
    if "://" in v or PurePosixPath(v).is_absolute():
        return v
    return join_uri(job.dataset_uri, v)


def quarantine_uri(job: JobCfg, split: str = "") -> str:
    return join_uri(job.storage_uri, "quarantine", job.run.name, split)


# -- manifests and tokens ------------------------------------------------------------------------

def load_manifest(job: JobCfg, split: str) -> Manifest:
    """Read split ``split`` of the dataset at ``job.dataset_uri`` in format ``job.data.format``."""
    st = dataset_storage(job).check()
    m = read_manifest(st, job.data.format, split)
    for rec in m.quarantine:
        rec.setdefault("split", split)
        rec.setdefault("action", "dropped")
    if m.quarantine:
        log.warning("%s split %s: %d annotation record(s) dropped (see the quarantine report)",
                    st.uri, split, len(m.quarantine))
    return m


def holdout_indices(video_ids: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices of ``video_ids``: ``round(fraction * n)`` videos held out, those
    with the smallest ``sha256(f"{seed}:{video_id}")``. A function of the ids and the seed only (not
    of the manifest's order, the worker count or run.seed); both lists in manifest order."""
    import hashlib

    n = len(video_ids)
    n_val = int(math.floor(fraction * n + 0.5))
    ranked = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{video_ids[i]}".encode()).hexdigest())
    held = set(ranked[:n_val])
    return [i for i in range(n) if i not in held], sorted(held)


def load_splits(job: JobCfg) -> tuple[Manifest, Manifest, Manifest]:
    """(train, validation, test) manifests of the job: validation is ``data.val_split`` when named,
    else ``data.val_fraction`` of ``data.train_split``'s videos held out (:func:`holdout_indices`,
    seeded by ``data.val_seed``). Disjoint by video; one line when a side would be empty or a named
    validation split shares videos with train or test."""
    train = load_manifest(job, job.data.train_split)
    test = load_manifest(job, job.data.test_split)
    d = job.data
    if d.val_split:
        val = load_manifest(job, d.val_split)
        for other, name in ((train, "data.train_split"), (test, "data.test_split")):
            shared = set(val.video_ids) & set(other.video_ids)
            if shared:
                raise ValueError(f"data.val_split={d.val_split!r} shares {len(shared)} video(s) with {name}="
                                 f"{other.split!r} (e.g. {sorted(shared)[0]}); validation must be held out: set "
                                 "data.val_split='' to hold out data.val_fraction of the training videos")
        return train, val, test
    keep, held = holdout_indices(train.video_ids, d.val_fraction, d.val_seed)
    if not keep or not held:
        raise ValueError(f"data.val_fraction={d.val_fraction} of the {train.num_videos} videos of split "
                         f"{train.split!r} leaves {len(keep)} for training and {len(held)} for validation; "
                         "each side needs at least one: change data.val_fraction or add videos")
    return train.subset(keep), train.subset(held, quarantine=False), test


def validation_record(job: JobCfg, val: Manifest) -> dict[str, Any]:
    """What identifies the validation set of a run (written next to it and to MLflow)."""
    from tvr_platform.runs import manifest_digest

    source = ({"split": job.data.val_split} if job.data.val_split else
              {"held_out_of": job.data.train_split, "fraction": job.data.val_fraction, "seed": job.data.val_seed})
    return {**source, "num_videos": val.num_videos, "num_captions": val.num_captions,
            "digest": manifest_digest(val), "video_ids": list(val.video_ids)}


def tokenize_captions(job: JobCfg, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation captions: (texts (N_c, L) int64, caption_video (N_c,) long).

    ``job.data.eval_captions``: 'first' = the first caption of every video, 'all' = every caption.
    """
    if job.data.eval_captions == "first":
        caps, vids = manifest.first_captions()
    else:
        caps, vids = manifest.captions, manifest.caption_video
    return torch.from_numpy(_tokens(job, caps)), torch.tensor(vids, dtype=torch.long)


def pick_captions(texts: torch.Tensor, num_texts: torch.Tensor, video_index: torch.Tensor,
                  epoch: int, seed: int) -> torch.Tensor:
    """One caption per clip for this epoch: texts (B, K, L) -> (B, L).

    The choice for a clip is ``splitmix64(seed, epoch, video_index) mod num_texts``: deterministic,
    independent of batch composition and worker, different across epochs.
    """
    vi = video_index.detach().cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        x = vi * np.uint64(0x9E3779B97F4A7C15) + np.uint64((seed * 1_000_003 + epoch) & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    k = np.maximum(num_texts.detach().cpu().numpy().astype(np.uint64), np.uint64(1))
    choice = torch.from_numpy((x % k).astype(np.int64)).to(texts.device)       # (B,)
    return texts[torch.arange(texts.shape[0], device=texts.device), choice]     # (B, L)


def _items(job: JobCfg, manifest: Manifest, *, texts: bool, epoch_seed: int) -> list[dict[str, Any]]:
    segs = manifest.segments or [None] * manifest.num_videos
    rows = [{"video_index": np.int64(i), "file": f, "epoch_seed": np.int64(epoch_seed),
             "seg_start": np.float64(s[0] if s else np.nan), "seg_end": np.float64(s[1] if s else np.nan)}
            for i, (f, s) in enumerate(zip(manifest.video_files, segs))]
    if texts:
        tok = _tokens(job, manifest.captions)                                      # (N_c, L)
        k_max = max(manifest.max_captions, 1)
        per = manifest.captions_per_video()
        for i, row in enumerate(rows):
            t = np.zeros((k_max, tok.shape[1]), np.int64)                           # (K_max, L)
            t[:len(per[i])] = tok[per[i]]
            row["texts"], row["num_texts"] = t, np.int64(len(per[i]))
    if job.data.aux_captions:
        from tvr_platform.captions.corpus import aux_caption_tokens

        aux = aux_caption_tokens(job, manifest)                                    # (N, K, L)
        for i, row in enumerate(rows):
            row["aux_texts"] = aux[i]
    return rows


def _decode_kwargs(job: JobCfg, split: str, train: bool) -> dict[str, Any]:
    from tvr.data.frames import resolve_backend

    size = backbone_preprocess(job.model.backbone.name, job.model.backbone.pretrained,
                                job.model.backbone.image_size)[0]
    resolve_backend(job.data.decoder)                      # data.decoder=torchcodec where unusable: say so now
    return {"videos": storage_for(job, videos_uri(job)), "num_frames": job.data.num_frames, "size": size,
            "decoder": job.data.decoder, "train": train, "seed": job.run.seed, "split": split,
            "quarantine": storage_for(job, quarantine_uri(job, split))}


def decode_num_cpus(job: JobCfg) -> float:
    """CPUs per decode actor: ``data.decode_num_cpus``, lowered so that the decode actors and the
    training workers (``train.cpus_per_worker`` each) fit the Ray cluster together.

    Otherwise a small machine deadlocks: the training workers hold every CPU and the decode actors
    wait for one forever. When nothing is left the actors get 0 CPUs (they then share the cores
    with the training workers) and a warning says so.
    """
    import ray

    want = job.data.decode_num_cpus
    if not ray.is_initialized() or want == 0:
        return want
    total = float(ray.cluster_resources().get("CPU", 0.0))
    held = max(job.train.num_workers, 1) * job.train.cpus_per_worker
    free = total - held
    per = min(want, max(0.0, free) / job.data.decode_concurrency)
    per = math.floor(per * 100) / 100
    if per < want:
        log.warning("data.decode_num_cpus=%s lowered to %s per decode actor: %s CPU(s) in the cluster, "
                    "%s held by training workers, %d decode actors", want, per, total,
                    held, job.data.decode_concurrency)
    return per


def shard_range(n: int, world_size: int, rank: int) -> range:
    """The indices ``0..n-1`` that rank ``rank`` of ``world_size`` holds: contiguous, balanced (the
    first ``n mod world_size`` ranks hold one more), every index on exactly one rank, empty ranges
    when there are fewer items than ranks. (Ray's ``streaming_split(equal=True)`` instead drops
    the remainder, which evaluation cannot afford.)"""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _build(job: JobCfg, manifest: Manifest, *, train: bool, epoch_seed: int, decode_batch_size: int,
           shard: tuple[int, int] | None = None) -> Any:
    import ray.data
    from ray.data._internal.random_config import RandomSeedConfig

    rows = _items(job, manifest, texts=train, epoch_seed=epoch_seed)
    if shard is not None:                                    # (rank, world_size): this rank's rows only
        keep = shard_range(len(rows), shard[1], shard[0])
        rows = rows[keep.start:keep.stop]
    from tvr_platform.data.cache import cached_dataset, use_cache

    if use_cache(job, manifest.split):                       # data.frames: decoded once, read from Parquet
        return cached_dataset(job, manifest, train=train, rows=rows)
    # Small blocks (a few rows each) so that a random block order is a good shuffle. No
    # all-to-all random_shuffle: its tasks starve behind the decode actors on small machines.
    n_blocks = max(1, min(len(rows), 1024))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    if train:
        seed = (job.run.seed * 1_000_003 + epoch_seed) % (2 ** 31)
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return map_udf(ds, DecodeClips, _decode_kwargs(job, manifest.split, train), batch_size=decode_batch_size,
                   concurrency=job.data.decode_concurrency, num_cpus=decode_num_cpus(job))


def train_dataset(job: JobCfg, manifest: Manifest, *, epoch_seed: int = 0, decode_batch_size: int = 8) -> Any:
    """One row per training video: frames (T,S,S,3) u8, valid, texts (K_max,L) i64, num_texts, video_index."""
    return _build(job, manifest, train=True, epoch_seed=epoch_seed, decode_batch_size=decode_batch_size)


def video_dataset(job: JobCfg, manifest: Manifest, *, decode_batch_size: int = 8,
                  shard: tuple[int, int] | None = None) -> Any:
    """One row per video for evaluation: frames (T,S,S,3) u8 (segment middles), valid, video_index.

    ``shard=(rank, world_size)``: only the videos of :func:`shard_range` (``video_index`` stays
    the index into the whole split), selected before anything is decoded."""
    return _build(job, manifest, train=False, epoch_seed=0, decode_batch_size=decode_batch_size, shard=shard)


def eval_shards(job: JobCfg, manifest: Manifest, world_size: int) -> list[Any]:
    """``video_dataset`` of each rank of ``world_size``: together every video exactly once."""
    return [video_dataset(job, manifest, shard=(r, world_size)) for r in range(world_size)]


# -- quarantine report ----------------------------------------------------------------------------

def read_quarantine(job: JobCfg, *manifests: Manifest) -> list[dict[str, str]]:
    """Every quarantine record of this run so far (manifests' + decode actors'), de-duplicated."""
    records: list[dict[str, str]] = []
    for m in manifests:
        records += [{"split": m.split, "action": "dropped", **r} for r in m.quarantine]
    qs = storage_for(job, quarantine_uri(job))
    for rel in qs.list():
        if rel.endswith(".jsonl"):
            records += [json.loads(line) for line in qs.read_text(rel).splitlines() if line.strip()]
    seen, out = set(), []
    for r in records:
        key = (r.get("uri"), r.get("reason"), r.get("split"), r.get("action"))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def write_quarantine(job: JobCfg, run_dir_uri: str, *manifests: Manifest) -> int:
    """Write ``<run_dir_uri>/quarantine.jsonl`` (all records) and return how many there are."""
    records = read_quarantine(job, *manifests)
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    storage_for(job, run_dir_uri).write_bytes("quarantine.jsonl", blob)
    if records:
        log.warning("%d quarantine record(s) written to %s", len(records), join_uri(run_dir_uri, "quarantine.jsonl"))
    return len(records)


# -- generator --------------------------------------------------------------------------------------

def synth_dataset(job: JobCfg) -> Any:
    """``tvr data synth``: write the synthetic MSR-VTT-format dataset to ``job.dataset_uri``."""
    from tvr.data.synthetic import synthesize

    if "://" in job.data.videos or PurePosixPath(job.data.videos).is_absolute():
        raise ValueError(f"data.videos={job.data.videos!r}: `tvr data synth` writes videos inside data.root; "
                         "use a relative folder name")
    st = dataset_storage(job).check(writable=True)
    return synthesize(st, videos_dir=job.data.videos, **asdict(job.data.synth))
