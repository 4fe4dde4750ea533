"""Gathering features across workers gives the single-process loss and gradients of the global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.methods import build_method
from tvr.methods.meanp import MeanPCfg
from tvr_platform.distributed import all_gather_with_grad
from tvr_platform.train.step import RetrievalStep

B, T = 4, 2  # per-worker batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model() -> RetrievalStep:
    torch.manual_seed(0)
    return RetrievalStep(build_method("meanp", MeanPCfg(), ClipBackbone(BackboneCfg(name="tvr-tiny"))),
                         gather=all_gather_with_grad)


def make_batch():
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(2 * B, T, 3, 32, 32, generator=g)
    text = torch.zeros(2 * B, 32, dtype=torch.long)  # tvr-tiny context length
    text[:, 1:7] = torch.randint(1, 400, (2 * B, 6), generator=g)
    text[:, 0], text[:, 7] = 49406, 49407  # SOT ... EOT, then padding
    return frames, text


def worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = make_model()
    frames, text = make_batch()
    sl = slice(rank * B, (rank + 1) * B)
    loss = model(mode="loss", frames=frames[sl], text=text[sl])["loss"]
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    dist.all_reduce(grads)  # what DDP does (sum; it then divides by world size)
    queue.put((rank, float(loss), (grads / 2).tolist()))
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_gathered_loss_and_grads_equal_single_process_global_batch():
    model = make_model()
    frames, text = make_batch()
    ref_loss = model(mode="loss", frames=frames, text=text)["loss"]
    ref_loss.backward()
    ref_grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=150) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for rank, loss, grads in results:
        assert loss == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-6), f"rank {rank}"
        torch.testing.assert_close(torch.tensor(grads), ref_grads, rtol=1e-4, atol=1e-6)
