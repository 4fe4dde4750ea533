"""The ``data`` section of a job spec."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class SynthCfg:
    """Generated clips of moving coloured shapes (``tvr data synth``)."""

    num_clips: int = 96
    """Number of clips (train + test)."""
    test_fraction: float = 0.25
    """Fraction of clips in the test split."""
    captions_per_clip: int = 3
    """Template captions written per clip (all true, differently worded)."""
    seconds: float = 2.0
    """Clip length."""
    fps: int = 12
    """Frames per second of the MP4."""
    size: int = 64
    """Frame width and height in pixels."""
    seed: int = 0
    """Everything generated is a function of this seed."""
    keyframe_interval: int = 0
    """H.264 keyframe every N frames (0 = one per second, like most web video)."""
    captions: Literal["events", "static", "mixed"] = "events"
    """Caption mode: events (direction + order sentences); static (what one frame shows: shapes,
    colours, size, background; image-text pre-training, ``tvr pretrain``); mixed (static and
    temporal captions tagged in caption_types.json, clips in time-reversed twins; the method
    benchmark). See ``tvr.data.synthetic``."""

    def __post_init__(self) -> None:
        if self.num_clips < 4:
            raise ValueError("data.synth.num_clips must be >= 4")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError("data.synth.test_fraction must be in (0, 1)")


@dataclass(kw_only=True)
class DataCfg:
    format: Literal["msrvtt", "msvd", "didemo", "lsmdc", "charades", "vatex", "activitynet"] = "msrvtt"
    """Annotation format of the manifest (field names as in the original releases)."""
    root: str = ""
    """Storage URI of the dataset (local dir or s3://bucket/prefix); '' = <storage.uri>/datasets/synthetic."""
    videos: str = "videos"
    """Video folder, relative to ``root`` (or an absolute URI)."""
    train_split: str = "train"
    """Split name used for training (format-specific, e.g. msrvtt: train | train.7k | train.9k)."""
    test_split: str = "test"
    """Split name of the test set: evaluated once, after training, with the epoch chosen on validation."""
    val_split: str = ""
    """Validation set: '' = ``val_fraction`` of the training videos held out (by video: all its
    captions on one side), or the name of the dataset's own validation split (e.g. msvd/didemo 'val';
    it must share no video with the train or test split). Every epoch is evaluated on it (``val/*``),
    the best epoch and Tune trials are chosen on it."""
    val_fraction: float = 0.1
    """Share of the training videos held out for validation when ``val_split`` is '' (rounded; at
    least one video must end up on each side)."""
    val_seed: int = 0
    """Seed of the held-out draw (independent of run.seed, so every seed and trial of a study
    validates on the same videos). The held-out ids are recorded with the run."""
    num_frames: int = 8
    """Frames sampled per clip (T)."""
    batch_size: int = 16
    """Clips per training batch per worker."""
    eval_batch_size: int = 32
    """Clips / captions per embedding batch at evaluation."""
    eval_captions: Literal["first", "all"] = "all"
    """Evaluation protocol: one caption per clip, or all captions (v2t with several positives)."""
    frames: Literal["decode", "cache", "auto"] = "decode"
    """Where clip frames come from: decode the videos; the frame cache written by ``tvr data prepare``
    (an error when it is missing); or auto (the cache when one matches num_frames and the backbone's
    input size, else decode). The cache holds the evaluation sampling (no random training offsets)."""
    cache_uri: str = ""
    """Frame cache location; '' = <root>/frame_cache."""
    cache_format: Literal["uint8", "jpeg"] = "uint8"
    """How ``tvr data prepare`` stores frames: exact uint8 pixels, or JPEG (smaller, lossy). Reading
    detects the form."""
    cache_jpeg_quality: int = 95
    """JPEG quality of cache_format=jpeg."""
    cache_rows_per_file: int = 64
    """Clips per Parquet shard of the frame cache."""
    decoder: Literal["pyav", "torchcodec", "auto"] = "pyav"
    """Video decode backend (``tvr.data.frames``): pyav (the reference: PyAV's keyframe-aware
    sampler, swscale bicubic resize); torchcodec (exact seeking, torch bicubic resize: pixels
    within a few levels of PyAV's; needs torchcodec and FFmpeg's shared libraries); auto
    (torchcodec when usable, else pyav). Segments, and streams torchcodec cannot open, always go
    through PyAV."""
    decode_concurrency: int = 2
    """Parallel decode tasks in Ray Data."""
    decode_num_cpus: float = 1.0
    """CPUs reserved per decode task (lower it, e.g. 0.5, when training workers take every CPU)."""
    aux_captions: str = ""
    """Generated caption set attached to every clip as ``aux_texts`` (ExCae's K auxiliary captions):
    the folder name under <root>/captions/ written by ``tvr captions generate`` (its
    captions.output_name, e.g. 'generated'); '' = none."""
    synth: SynthCfg = field(default_factory=SynthCfg)
    """Generator settings, used by ``tvr data synth`` and the quickstart."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1): the share of training "
                             "videos held out for validation (or name a split: data.val_split=val)")
        if self.val_split and self.val_split in (self.train_split, self.test_split):
            raise ValueError(f"data.val_split={self.val_split!r} is also the train or test split; name another "
                             "split, or '' to hold out data.val_fraction of the training videos")
        if self.num_frames < 1:
            raise ValueError("data.num_frames must be >= 1")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")
        if not 1 <= self.cache_jpeg_quality <= 100 or self.cache_rows_per_file < 1:
            raise ValueError("data.cache_jpeg_quality must be in [1, 100] and data.cache_rows_per_file >= 1")
        if self.decode_concurrency < 1 or self.decode_num_cpus < 0:
            raise ValueError("data.decode_concurrency must be >= 1 and data.decode_num_cpus >= 0")
        if self.aux_captions and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", self.aux_captions):
            raise ValueError(f"data.aux_captions={self.aux_captions!r}: a caption set name (letters, digits, "
                             "'.', '_', '-'), as captions.output_name")
