"""Ray Train dataset assignment: the training set is streamed and split equally across workers
(Ray's ``streaming_split(equal=True)``: a step needs the same batch count on every rank), while
each evaluation set comes pre-sharded, one dataset per rank, so that every video is evaluated
exactly once for any split size and worker count (:func:`tvr_platform.data.pipeline.shard_range`).
"""

from __future__ import annotations

from typing import Any

from ray.train import DataConfig


class EvalShardsConfig(DataConfig):
    """``DataConfig`` splitting ``train_names`` equally and handing rank r the r-th dataset of
    ``eval_shards[name]`` (built by :func:`tvr_platform.data.pipeline.eval_shards` for the run's
    fixed worker count). ``datasets[name]`` must still be given to the trainer (any dataset: Ray
    asks for it by name); it is never executed."""

    def __init__(self, train_names: list[str], eval_shards: dict[str, list[Any]]):
        super().__init__(datasets_to_split=list(train_names))
        self.eval_shards = eval_shards

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        sharded = {k: v for k, v in datasets.items() if k in self.eval_shards}
        output = super().configure({k: v for k, v in datasets.items() if k not in sharded}, world_size,
                                   worker_handles, worker_node_ids, **kwargs)
        for name in sharded:
            shards = self.eval_shards[name]
            if len(shards) != world_size:
                raise RuntimeError(f"dataset {name!r} was sharded for {len(shards)} workers, "
                                   f"the worker group has {world_size}")
            for rank, ds in enumerate(shards):
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                output[rank][name] = ds.iterator()
        return output
