"""A real two-node Ray cluster on this machine (``ray start --head`` + ``ray start --address``, each
node with its own temp dir, ports and process group): one training worker per node (custom resource
``tvr_worker``, one unit per node, requested through ``cluster.worker_resources``), data and
checkpoints on the S3 server (moto on 127.0.0.1), and the worker node killed mid-epoch (its raylet
and workers SIGKILLed). The run restarts from the last checkpoint when the node returns
(``train.max_failures``) and every epoch appears once in MLflow."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tiny import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

DRIVER = """
import json, sys
from tvr_platform.config import load_job
from tvr_platform.recipes import ensure_synthetic
from tvr_platform.train.trainer import run_training

overrides, hold = json.loads(sys.argv[1]), json.loads(sys.argv[2])
job = load_job(None, overrides)
ensure_synthetic(job)
result = run_training(job, extra_config={"hold": hold})
result.tracker.terminate("FINISHED")
print("TVR-RESULT " + json.dumps({"run_id": result.tracker.run_id, "epoch": result.metrics["epoch"],
                                  "checkpoint": result.checkpoint_path}), flush=True)
"""


class Node:
    """One ``ray start --block`` in its own session (process group) and temp dir."""

    def __init__(self, root: Path, name: str, env: dict, *, head_port: int | None = None,
                 port: int | None = None):
        self.temp_dir = root / name
        self.log = root / f"{name}.log"
        ports = {f"--{p}": free_port() for p in (
            "node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port")}
        role = ([f"--address=127.0.0.1:{head_port}"] if head_port else
                ["--head", f"--port={port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}"])
        cmd = [RAY, "start", "--block", *role, "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
               '--resources={"tvr_worker": 1}', f"--temp-dir={self.temp_dir}", "--object-store-memory=100000000",
               "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log.read_text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        head = self.log.with_name("head.log")
        raise RuntimeError(f"ray start failed: {self.log.read_text()[-3000:]}\n--- head:\n{head.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the node: ``ray start``, its raylet and every worker it forked (a lost machine)."""
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        psutil.wait_procs(procs, timeout=10)


@pytest.fixture
def cluster_root():
    root = Path(tempfile.mkdtemp(prefix="tvr-mn-", dir="/tmp"))  # short: Ray's unix sockets live here
    nodes: list[Node] = []
    try:
        yield root, nodes
    finally:
        for node in reversed(nodes):  # worker nodes first, then the head
            node.kill()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def test_two_node_run_survives_losing_the_worker_node(tmp_path, s3_bucket, cluster_root):
    import boto3
    from mlflow.tracking import MlflowClient

    endpoint, bucket = s3_bucket
    root, nodes = cluster_root
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    (root / "home").mkdir()  # no ~/.ray/auth_token of another cluster on this machine
    env.update(HOME=str(root / "home"), RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    t0 = time.monotonic()
    port = free_port()
    nodes.append(Node(root, "head", env, port=port))
    nodes[0].wait_started()
    nodes.append(Node(root, "node_b", env, head_port=port))
    nodes[1].wait_started()

    # 19 clips: 13 train videos after the validation hold-out = 2 steps per worker and epoch, so
    # global step 3 is epoch 1 after its first step
    hold = {"step": 3, "dir": str(tmp_path / "held"), "seconds": 120.0}
    overrides = tiny_overrides(tmp_path / "work", **{
        "train.epochs": 2, "train.max_failures": 1, "run.name": "two-nodes", "data.synth.num_clips": 19, "cluster.address": f"127.0.0.1:{port}",
        "cluster.worker_resources": "{tvr_worker: 1}", "storage.uri": f"s3://{bucket}/tvr",
        "storage.endpoint_url": endpoint})
    out = tmp_path / "driver.log"
    with open(out, "w") as log:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(overrides), json.dumps(hold)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        held = Path(hold["dir"])
        deadline = time.monotonic() + 180
        while not (held / "rank0").exists() or not (held / "rank1").exists():
            assert driver.poll() is None and time.monotonic() < deadline, out.read_text()[-6000:]
            time.sleep(0.5)
        node_ids = {(held / f"rank{r}").read_text() for r in (0, 1)}
        assert len(node_ids) == 2  # one worker per node
        t_held = time.monotonic()
        nodes[1].kill()                             # the worker node dies mid-epoch 1
        nodes.append(Node(root, "node_b2", env, head_port=port))  # ... and a replacement joins
        nodes[2].wait_started()
        t_back = time.monotonic()
        rc = driver.wait(300)
    finally:
        if driver.poll() is None:
            driver.kill()
    print(f"[multinode] nodes+epoch 0 until held {t_held - t0:.0f} s, kill+rejoin {t_back - t_held:.0f} s, "
          f"restart to the end {time.monotonic() - t_back:.0f} s", file=sys.stderr)
    text = out.read_text()
    assert rc == 0, text[-6000:]
    result = json.loads(text.split("TVR-RESULT ", 1)[1].splitlines()[0])
    assert result["epoch"] == 1

    job_dir = tmp_path / "work"
    client = MlflowClient(f"sqlite:///{job_dir / 'mlflow.db'}")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    for key in ("epoch", "train_loss", "val/t2v_R1"):
        history = client.get_metric_history(result["run_id"], key)
        assert len(history) == 2 and len({m.step for m in history}) == 2, (key, history)
    epochs = sorted(client.get_metric_history(result["run_id"], "epoch"), key=lambda m: m.step)
    assert [m.value for m in epochs] == [0.0, 1.0]
    # both epochs' checkpoints (every rank's shard) are on the S3 server
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="tvr/runs/two-nodes/")
            for o in page.get("Contents", [])]
    assert any("/epoch=0000/" in k for k in keys) and any("/epoch=0001/" in k and k.endswith("model.pt") for k in keys)
    assert result["checkpoint"].endswith("epoch=0001")
