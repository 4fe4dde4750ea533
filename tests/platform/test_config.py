"""The job config tree: strict loading, precedence, round trips, and every shipped job spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from tvr.methods import METHODS
from tvr_platform.config import (
    ConfigError,
    JobCfg,
    flatten,
    job_from_dict,
    job_to_dict,
    job_to_yaml,
    load_job,
)

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_yaml_cli(tmp_path):
    spec = write(tmp_path, "train:\n  lr: 0.5\n  epochs: 3\n")
    job = load_job(spec, ["train.epochs=7"])
    assert (job.train.lr, job.train.epochs, job.train.weight_decay) == (0.5, 7, JobCfg().train.weight_decay)


@pytest.mark.parametrize("text, overrides, needle", [
    ("train:\n  lrr: 1\n", [], "train.lrr"),
    ("", ["train.lr=abc"], "train.lr"),
    ("", ["train.strategy=fsdp"], "train.strategy"),
    ("", ["model.method=nope"], "model.method='nope'"),
    ("", ["train.zero_stage=5"], "train.zero_stage"),
    ("", ["novalue"], "key.sub=value"),
    ("- a list\n", [], "mapping"),
    ("train: [unclosed\n", [], "not valid YAML"),
])
def test_bad_input_is_one_clear_error(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, text), overrides)
    assert needle in str(err.value)
    if not overrides:
        assert "spec.yaml" in str(err.value)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: job spec file not found"):
        load_job(tmp_path / "nope.yaml")


def test_dict_round_trip_and_yaml_reload(tmp_path):
    job = load_job(None, ["model.backbone.name=tvr-small", "data.num_frames=4", "cluster.env_vars.A=b"])
    assert job_from_dict(job_to_dict(job)) == job
    assert load_job(write(tmp_path, job_to_yaml(job))) == job


def test_every_method_has_a_typed_section_and_only_the_active_one_is_flattened():
    job = load_job(None, [])
    for name in METHODS:
        assert isinstance(getattr(job.model, name), METHODS[name].config_cls)
    keys = flatten(job)
    other = [k for k in keys if k.startswith("model.") and k.split(".")[1] in METHODS
             and k.split(".")[1] != job.model.method]
    assert not other


@pytest.mark.parametrize("spec", sorted(JOBS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_spec_loads(spec):
    assert isinstance(load_job(spec), JobCfg)


def test_relative_local_paths_are_anchored_on_the_driver(tmp_path, monkeypatch):
    """Ray workers run in Ray's session dir: relative paths must be absolute before the job ships."""
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    job = load_job(None, ["run.work_dir=w", "storage.uri=./st", "data.root=d/msrvtt",
                          "tracking.uri=sqlite:///m.db", "model.backbone.pretrained=ckpt.pt"])
    assert job.run.work_dir == str(tmp_path / "w") and job.storage.uri == str(tmp_path / "st")
    assert job.data.root == str(tmp_path / "d" / "msrvtt")
    assert job.tracking.uri == f"sqlite:///{tmp_path / 'm.db'}"
    assert job.model.backbone.pretrained == str(tmp_path / "ckpt.pt")
    remote = load_job(None, ["storage.uri=s3://b/p", "data.root=s3://b/v", "model.backbone.pretrained=openai"])
    assert (remote.storage.uri, remote.data.root, remote.model.backbone.pretrained) == ("s3://b/p", "s3://b/v",
                                                                                       "openai")
    assert job_from_dict(job_to_dict(job)).dataset_uri == job.dataset_uri      # survives the Ray boundary
