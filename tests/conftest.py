"""Shared fixtures: offline environment, a real S3-protocol server on 127.0.0.1, local Ray."""

from __future__ import annotations

import os
import socket

import pytest

# Offline, quiet, deterministic: set before any test imports ray / mlflow / open_clip.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Fake credentials for the local moto S3 server, set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server (real HTTP, S3 protocol) on 127.0.0.1; yields its endpoint URL.

    Credentials are the fake 'testing' pair set above, found by boto3, pyarrow and Ray workers
    through the standard AWS chain.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the local S3 server: yields (endpoint_url, bucket_name)."""
    import uuid

    import boto3

    name = f"tvr-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return s3_server, name


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the test session (2 CPUs, no dashboard). Worker output reaches the
    driver as it does for the CLI (``log_to_driver``): a later test of ``tvr quickstart`` in the same
    process reads its per-epoch lines from there."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                                           "DS_ACCELERATOR": "cpu"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def vit_b32_checkpoint(tmp_path_factory):
    """A real-size ViT-B/32 with random weights (QuickGELU, as OpenAI's) saved as an open_clip
    checkpoint: yields (path, state_dict). Written once per session (fp32, ~600 MB on disk)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
    state = model.state_dict()
    path = tmp_path_factory.mktemp("vit_b32") / "ViT-B-32-random.pt"
    torch.save(state, path)
    return path, state
