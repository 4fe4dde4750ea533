"""ZeRO-3 with pretrained weights: the model is built partitioned (``deepspeed.zero.Init``) and an
open_clip-format checkpoint written by the test is streamed into the partitions (rank 0 reads it,
memory-mapped; one module gathered at a time). Two CPU processes, gloo, the worker's own
``build_model``; every gathered parameter must equal the checkpoint, and each rank holds only its
partition. (open_clip's ``load_checkpoint`` met the shape-[0] ``logit_scale`` and raised.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tiny import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(work: Path, ckpt: str):
    from tvr_platform.config import load_job

    return load_job(None, tiny_overrides(work, **{"train.strategy": "deepspeed", "train.zero_stage": 3,
                                                  "model.backbone.pretrained": ckpt}))


def _child(rank: int, world_size: int, port: int, work: str, ckpts: dict[str, str]) -> None:
    import deepspeed
    import torch.distributed as dist

    from tvr_platform.train.strategy import deepspeed_config
    from tvr_platform.train.worker import build_model

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    deepspeed.init_distributed(dist_backend="gloo")
    out: dict[str, object] = {}
    for fmt, ckpt in ckpts.items():
        job = _job(Path(work), ckpt)
        torch.manual_seed(100 + rank)                     # different random init on each rank
        try:
            method, held = build_model(job, ckpt, deepspeed_config(job.train, 2, False))
        except ValueError as err:
            out[fmt] = {"error": str(err)}
            continue
        clip = method.backbone.clip
        from tvr_platform.train.strategy import open_state_dict

        reference = open_state_dict(ckpt)                 # the test's own read, on every rank
        equal, partitioned, total = True, True, 0
        for name, p in clip.named_parameters():
            want = reference[name]
            want = want.load() if hasattr(want, "load") else want
            partitioned &= p.numel() == 0 and p.ds_tensor.numel() <= -(-want.numel() // world_size)
            with deepspeed.zero.GatheredParameters([p]):
                equal &= torch.equal(p.data.reshape(want.shape), want.to(p.dtype))
            total += 1
        out[fmt] = {"equal": bool(equal), "partitioned": bool(partitioned), "params": total,
                    "held": [tuple(h.ds_shape) for h in held]}
    Path(work, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_zero3_loads_open_clip_checkpoints_partitioned(tmp_path):
    from safetensors.torch import save_file

    from tvr.backbone import create_clip

    torch.manual_seed(7)
    state = {k: v.detach().clone() for k, v in create_clip("tvr-tiny").state_dict().items()}
    state["logit_scale"] = torch.tensor(3.25)            # 0-dim, as open_clip saves it
    pt = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pt)   # DDP-style file
    st = tmp_path / "clip.safetensors"
    save_file({k: (v + 1.0).contiguous() for k, v in state.items() if k != "attn_mask"}, str(st))
    bad = tmp_path / "bad.pt"
    torch.save({**state, "positional_embedding": torch.zeros(3, 5)}, bad)
    ckpts = {"pt": str(pt), "safetensors": str(st), "bad": str(bad)}

    torch.multiprocessing.spawn(_child, args=(2, _free_port(), str(tmp_path), ckpts), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in results:
        for fmt in ("pt", "safetensors"):
            assert res[fmt]["equal"] and res[fmt]["partitioned"], (fmt, res[fmt])
            assert res[fmt]["params"] > 10 and res[fmt]["held"] == [[1]]   # logit_scale held as [1]
        assert "does not fit this architecture" in res["bad"]["error"]
        assert "positional_embedding" in res["bad"]["error"]
