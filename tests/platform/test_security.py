"""Nothing read from storage runs code: tampered checkpoints are refused (no marker file written)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest
import torch


class Payload:
    """A pickle that, when loaded with full unpickling, writes ``marker`` (what an attacker plants)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def plant(path: Path, marker: Path) -> None:
    torch.save({"model": {}, "client_state": {"epoch": 0}, "evil": Payload(marker)}, path)


def test_the_payload_runs_under_full_unpickling(tmp_path):
    """Control: the planted file really runs code when loaded the old way (weights_only=False)."""
    marker = tmp_path / "marker"
    plant(tmp_path / "ddp.pt", marker)
    torch.load(tmp_path / "ddp.pt", weights_only=False)
    assert marker.read_text() == "pwned"


def _ddp_strategy():
    """A DDPStrategy around a real model/optimiser/scheduler without a Ray Train session."""
    from tvr_platform.train.strategy import DDPStrategy, lr_lambda

    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(1, 10))
    s = DDPStrategy.__new__(DDPStrategy)
    s.module = s.model = module
    s.optimizer, s.scheduler = opt, sched
    return s


def test_ddp_checkpoint_round_trips_and_a_tampered_one_is_refused(tmp_path):
    from tvr_platform.train.strategy import UnsafeCheckpointError

    s = _ddp_strategy()
    s.module(torch.randn(4, 3)).sum().backward()
    s.optimizer.step()
    s.scheduler.step()
    s.save(tmp_path, {"epoch": 3, "global_step": 7})
    restored = _ddp_strategy()
    assert restored.load(tmp_path) == {"epoch": 3, "global_step": 7}
    assert torch.equal(restored.module.weight, s.module.weight)
    assert restored.optimizer.state_dict()["state"][0]["exp_avg"].equal(s.optimizer.state_dict()["state"][0]["exp_avg"])

    marker = tmp_path / "marker"
    plant(tmp_path / "ddp.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="ddp.pt: refusing to load"):
        _ddp_strategy().load(tmp_path)
    assert not marker.exists()


def test_rng_state_file_is_loaded_safely(tmp_path):
    from tvr_platform.train.strategy import UnsafeCheckpointError, safe_load

    torch.save({"torch": torch.get_rng_state()}, tmp_path / "rng_rank0.pt")
    assert torch.equal(safe_load(tmp_path / "rng_rank0.pt")["torch"], torch.get_rng_state())
    marker = tmp_path / "marker"
    plant(tmp_path / "rng_rank1.pt", marker)
    with pytest.raises(UnsafeCheckpointError):
        safe_load(tmp_path / "rng_rank1.pt")
    assert not marker.exists()


@contextlib.contextmanager
def one_process_group(monkeypatch):
    """A one-rank gloo process group (what DeepSpeed needs), torn down afterwards."""
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_deepspeed_checkpoint_round_trips_and_tampered_shards_are_refused(tmp_path, monkeypatch):
    """ZeRO-2 in one process: DeepSpeed's own load_checkpoint reads every file through safe_load
    (model states and ZeRO optimizer shards); a planted payload in either is refused."""
    import torch.distributed as dist

    from tvr_platform.config import TrainCfg
    from tvr_platform.train.strategy import (
        DeepSpeedStrategy,
        UnsafeCheckpointError,
        deepspeed_config,
        lr_lambda,
    )

    def build():
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(1, 10))
        return DeepSpeedStrategy(module, opt, sched, deepspeed_config(TrainCfg(zero_stage=2), 2, False))

    with one_process_group(monkeypatch):
        s = build()
        s.backward_step(s(torch.randn(2, 4)).sum())
        good = tmp_path / "good"
        s.save(good, {"epoch": 1, "global_step": 5})
        restored = build()
        assert restored.load(good)["global_step"] == 5
        for a, b in zip(restored.engine.module.parameters(), s.engine.module.parameters(), strict=True):
            assert torch.equal(a, b)
        files = sorted((good / "ds").glob("*.pt"))
        assert any("optim_states" in f.name for f in files) and any("model_states" in f.name for f in files)
        for victim in files:
            bad = tmp_path / f"bad-{victim.stem}"
            (bad / "ds").mkdir(parents=True)
            for f in files:
                os.link(f, bad / "ds" / f.name)
            (bad / "ds" / victim.name).unlink()
            marker = tmp_path / f"marker-{victim.stem}"
            plant(bad / "ds" / victim.name, marker)
            with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
                build().load(bad)
            assert not marker.exists(), victim.name
    assert not dist.is_initialized()
