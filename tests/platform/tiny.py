"""The smallest job that still exercises every part of the platform (shared by slow tests)."""

from __future__ import annotations

from pathlib import Path

TINY = [
    "model.backbone.name=tvr-tiny", "data.synth.num_clips=16", "data.synth.seconds=1.0",
    "data.synth.size=32", "data.num_frames=2", "data.batch_size=3", "data.eval_batch_size=8",
    "data.decode_concurrency=1", "data.decode_num_cpus=0.5", "train.num_workers=2",
    "train.cpus_per_worker=0.5", "train.warmup_steps=1", "train.lr=1e-3", "train.backbone_lr=1e-3",
]


def tiny_overrides(work_dir: Path, **extra: object) -> list[str]:
    return [*TINY, f"run.work_dir={work_dir}", *(f"{k}={v}" for k, v in extra.items())]
