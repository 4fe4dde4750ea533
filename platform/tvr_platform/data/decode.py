"""The Ray Data decode UDF, in a light module (numpy, PyAV, pyarrow; no torch, no open_clip) so
that decode actors start fast. The rules it applies are documented in :mod:`.pipeline`."""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import Any

import numpy as np

from tvr.data.frames import DecodeError, decode_frames, resolve_backend
from tvr_platform.storage import Storage, StorageError, retry_call

log = logging.getLogger(__name__)


_UDF_INSTANCES: dict[str, Any] = {}


def run_udf(batch: dict[str, np.ndarray], *, udf_class: type, udf_key: str, **kwargs: Any) -> dict[str, Any]:
    """Ray Data batch function: ``udf_class(**kwargs)(batch)``, the instance built once per worker
    process (``udf_key`` names it; a fresh key per dataset).

    Used with plain tasks instead of an actor pool: Ray keeps its worker processes (imports and
    instances stay warm) across dataset executions, whereas an actor pool is started anew for every
    execution -- every epoch -- which costs seconds of start-up on small machines.
    """
    udf = _UDF_INSTANCES.get(udf_key)
    if udf is None:
        if len(_UDF_INSTANCES) > 16:                     # a long-lived worker: keep the cache small
            _UDF_INSTANCES.clear()
        udf = _UDF_INSTANCES[udf_key] = udf_class(**kwargs)
    return udf(batch)


def map_udf(ds: Any, udf_class: type, kwargs: dict[str, Any], *, batch_size: int, concurrency: int,
            num_cpus: float) -> Any:
    """``ds.map_batches`` running ``udf_class(**kwargs)`` through :func:`run_udf` as ``concurrency``
    parallel tasks of ``num_cpus`` CPUs."""
    return ds.map_batches(run_udf, fn_kwargs={"udf_class": udf_class, "udf_key": uuid.uuid4().hex, **kwargs},
                          batch_size=batch_size, concurrency=concurrency, num_cpus=num_cpus)


class DecodeClips:
    """Ray Data callable class: rows with ``file`` (+ segment) -> ``frames`` uint8 (T, S, S, 3) RGB
    and ``valid`` (bool: whether the clip could be decoded; all-zero frames when not).

    Frames travel as uint8 (4x fewer bytes than float32) and are normalised on the consuming
    device by :func:`tvr.data.frames.normalize_on_device` (through
    :func:`tvr_platform.data.pipeline.model_frames`), which also turns invalid rows into the
    all-zero input evaluation scores them with. Training (``train=True``) skips undecodable rows;
    evaluation keeps them; ``raw=True`` (the frame cache) keeps every row.
    """

    def __init__(self, *, videos: Storage, num_frames: int, size: int, train: bool, seed: int, split: str,
                 quarantine: Storage | None, raw: bool = False, decoder: str = "pyav"):
        self.videos, (self.fs, _) = videos, videos.pyarrow_filesystem()
        self.num_frames, self.size = num_frames, size
        self.decoder = resolve_backend(decoder)           # data.decoder; fails here, not per clip
        self.train, self.seed, self.split = train, seed, split
        self.quarantine, self.raw = quarantine, raw

    def _read(self, rel: str) -> bytes:
        path = self.videos.arrow_path(rel)

        def read() -> bytes:
            with self.fs.open_input_file(path) as f:
                return f.readall()

        return retry_call(read, what=self.videos.url(rel))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ray.data import DataContext

        pass_idx = int(getattr(DataContext.get_current(), "_execution_idx", 0) or 0)
        keep, frames, records, valid = [], [], [], []
        for i, rel in enumerate(batch["file"]):
            rel = str(rel)
            vidx = int(batch["video_index"][i])
            seg = (float(batch["seg_start"][i]), float(batch["seg_end"][i]))
            seg = None if math.isnan(seg[0]) else seg
            try:
                uri = self.videos.url(rel)
            except StorageError as err:              # '../' in a manifest path: never read
                records.append({"uri": rel, "reason": str(err)[:300], "split": self.split,
                                "action": "skipped (outside the data root)" if self.train else
                                "zero frames (outside the data root)"})
                if self.raw or not self.train:
                    keep.append(i)
                    valid.append(False)
                    frames.append(np.zeros((self.num_frames, self.size, self.size, 3), np.uint8))
                continue
            rng = np.random.default_rng([self.seed, int(batch["epoch_seed"][i]), pass_idx, vidx])
            try:
                data = self._read(rel)
                res = decode_frames(data, self.num_frames, size=self.size,
                                    mode="random" if self.train else "uniform", rng=rng, segment=seg,
                                    backend=self.decoder)
            except (DecodeError, FileNotFoundError, StorageError, OSError) as err:
                reason = f"{type(err).__name__}: {err}"
                if isinstance(err, FileNotFoundError):
                    reason = "missing video file"
                records.append({"uri": uri, "reason": reason[:300], "split": self.split,
                                "action": "skipped" if self.train else "zero frames"})
                if self.raw or not self.train:
                    keep.append(i)
                    valid.append(False)
                    frames.append(np.zeros((self.num_frames, self.size, self.size, 3), np.uint8))
                continue
            if res.padded:
                records.append({"uri": uri, "reason": f"clip has {res.num_source_frames} frame(s) < "
                                f"data.num_frames={self.num_frames}", "split": self.split,
                                "action": "padded with the last frame"})
            if res.warnings:
                records.append({"uri": uri, "reason": "; ".join(res.warnings), "split": self.split,
                                "action": "patched"})
            keep.append(i)
            valid.append(True)
            frames.append(res.frames)                                             # (T, S, S, 3) uint8
        if records and self.quarantine is not None:
            blob = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
            try:
                self.quarantine.write_bytes(f"part-{uuid.uuid4().hex}.jsonl", blob)
            except StorageError as err:
                log.warning("could not write quarantine records: %s", err)
        out = {k: v[keep] for k, v in batch.items()
               if k not in ("file", "seg_start", "seg_end", "epoch_seed")}
        out["valid"] = np.asarray(valid, bool)                                  # (B',)
        out["frames"] = (np.stack(frames) if frames else                         # (B', T, S, S, 3)
                         np.zeros((0, self.num_frames, self.size, self.size, 3), np.uint8))
        return out
