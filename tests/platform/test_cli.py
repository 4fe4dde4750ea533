"""The command line itself: cheap to start, run identity on resume, one-line errors (no Ray here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "open_clip", "ray", "mlflow", "deepspeed", "omegaconf", "tvr.methods", "numpy")


def _python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "platform")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


def test_cli_help_and_argument_errors_import_nothing_heavy():
    """`tvr --help`, `tvr --version` and an argument error answer without torch/open_clip/ray/mlflow."""
    code = f"""
import contextlib, io, json, sys
from tvr_platform.cli import main
out = {{}}
for argv in (["--help"], ["--version"], ["train"], ["search"], ["eval", "--help"], ["submit", "--help"],
             ["tune", "--help"], ["bench", "methods", "--help"], ["data", "check", "--help"]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main(argv)
        except SystemExit as e:
            out[" ".join(argv)] = [e.code, buf.getvalue()[:200]]
print(json.dumps({{"out": out, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    res = _python(code)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    assert got["out"]["--help"][0] == 0 and "quickstart" in got["out"]["--help"][1]
    assert got["out"]["--version"] == [0, "tvr 0.1.0\n"]
    assert got["out"]["train"][0] == 2 and "required" in got["out"]["train"][1]
    assert all(code == 0 for argv, (code, _) in got["out"].items() if argv.endswith("--help"))


# -- run identity -----------------------------------------------------------------------------

def _job(tmp_path: Path, *overrides: str):
    from tvr_platform.config import load_job

    return load_job(ROOT / "jobs" / "train.yaml", [f"run.work_dir={tmp_path}", *overrides])


def test_default_run_names_carry_the_method(tmp_path):
    assert _job(tmp_path).run.name == "train-meanp"
    assert _job(tmp_path, "model.method=tmass").run.name == "train-tmass"
    assert _job(tmp_path, "run.name=mine").run.name == "mine"


def test_resume_only_into_a_run_with_the_same_identity(tmp_path):
    from tvr_platform.runs import COMPLETE_TAG, RunMismatch, check_resume, is_complete, next_free_name
    from tvr_platform.tracking import start_run

    tmass = _job(tmp_path, "model.method=tmass", "run.name=shared")
    assert check_resume(tmass) is None
    assert not (tmp_path / "mlflow.db").exists()  # looking for a run creates no store
    tracker = start_run(tmass)
    tracker.terminate("FAILED")
    assert check_resume(tmass).info.run_id == tracker.run_id   # same spec: resume

    meanp = _job(tmp_path, "run.name=shared")
    with pytest.raises(RunMismatch) as err:
        check_resume(meanp)
    msg = str(err.value)
    assert "\n" not in msg and "model.method=tmass (this spec: meanp)" in msg
    assert tracker.run_id in msg and "run.name=shared-2" in msg and "--new" in msg
    # a shape of the method (its own section) differs too
    with pytest.raises(RunMismatch, match="model.tmass.num_frames"):
        check_resume(_job(tmp_path, "model.method=tmass", "run.name=shared", "data.num_frames=4",
                          "model.tmass.num_frames=4"))
    with pytest.raises(RunMismatch, match="model.backbone.name"):
        check_resume(_job(tmp_path, "model.method=tmass", "run.name=shared", "model.backbone.name=tvr-tiny"))

    run = check_resume(tmass)
    assert not is_complete(tmass, run)
    tracker.set_tags({COMPLETE_TAG: "true"})
    run = check_resume(tmass)
    assert is_complete(tmass, run)
    more = _job(tmp_path, "model.method=tmass", "run.name=shared", "train.epochs=9")
    assert not is_complete(more, check_resume(more))  # more epochs continue the run
    assert next_free_name(meanp) == "shared-2"
    start_run(_job(tmp_path, "run.name=shared-2")).terminate()
    assert next_free_name(meanp) == "shared-3"


def test_train_on_a_different_model_is_one_line_and_leaves_nothing_running(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from tvr_platform.cli import main
    from tvr_platform.tracking import start_run

    job = _job(tmp_path, "model.method=tmass", "run.name=train-meanp")
    start_run(job).terminate("FINISHED")
    capsys.readouterr()
    rc = main(["train", str(ROOT / "jobs" / "train.yaml"), f"run.work_dir={tmp_path}", "run.name=train-meanp"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "already exists as a different model" in err
    client = MlflowClient(job.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]


# -- tvr data check -----------------------------------------------------------------------------

def test_data_check_counts_a_msrvtt_folder_and_names_what_is_missing(tmp_path, capsys):
    from tvr_platform.cli import main

    rows = ["key,vid_key,video_id,sentence", "ret0,msr9770,video9770,a person is connecting something",
            "ret1,msr9771,video9771,a little girl does gymnastics", "ret2,msr9772,video9772,a man sings"]
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "videos").mkdir()
    for v in ("video9770", "video9771"):
        (tmp_path / "videos" / f"{v}.mp4").write_bytes(b"")
    assert main(["data", "check", str(tmp_path), "--split", "test", "--json"]) == 1  # one video missing
    out = capsys.readouterr().out.splitlines()
    assert "3 clips" in out[0] and "3 captions" in out[0] and "2 video files found" in out[0]
    assert json.loads(out[1]) == [{"split": "test", "videos": 3, "captions": 3, "found": 2, "missing": 1,
                                   "dropped": 0, "videos_uri": str(tmp_path / "videos")}]
    assert "no video file" in out[2]
    (tmp_path / "videos" / "video9772.mp4").write_bytes(b"")
    assert main(["data", "check", str(tmp_path)]) == 0  # train splits unreadable (no JSON): reported only
    out = capsys.readouterr().out
    assert "train     not readable: " in out and "MSRVTT_data.json" in out
    assert main(["data", "check", str(tmp_path), "--split", "train"]) == 1  # asked for it: a failure


@pytest.mark.skipif(not Path("/work/shared/datasets/msrvtt/MSRVTT_JSFUSION_test.csv").exists(),
                    reason="the MSR-VTT annotation CSVs are not on this machine")
def test_data_check_reads_the_real_jsfusion_test_split():
    from tvr_platform.data.cli import check_dataset

    (test,) = check_dataset("/work/shared/datasets/msrvtt", "msrvtt", ["test"])
    assert (test["videos"], test["captions"], test["dropped"]) == (1000, 1000, 0)


# -- tvr eval on a model that is not there ------------------------------------------------------

def test_eval_of_an_unknown_model_is_one_line_and_creates_nothing(tmp_path, capsys, monkeypatch):
    from tvr_platform.cli import main
    from tvr_platform.tracking import start_run

    monkeypatch.chdir(tmp_path)
    assert main(["eval", "models:/nope@champion"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MLflow store" in err[0] and "models:/nope@champion" in err[0]
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no tvr-work
    start_run(_job(tmp_path / "w")).terminate()  # a store exists, the model does not
    capsys.readouterr()
    assert main(["eval", "models:/nope/3", f"run.work_dir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such registered model version" in err[0] and "none" in err[0]


# -- MLflow: self-describing runs ---------------------------------------------------------------

def test_runs_carry_source_user_description_dataset_and_only_their_sections(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tvr.data.annotations import Manifest
    from tvr_platform.runs import log_dataset_inputs, manifest_digest
    from tvr_platform.tracking import start_run

    monkeypatch.setenv("TVR_GIT_COMMIT", "abc123")
    job = _job(tmp_path, "model.method=tmass")
    tracker = start_run(job)
    m = Manifest(dataset="msrvtt", split="train", video_ids=["v0", "v1"], video_files=["v0.mp4", "v1.mp4"],
                 captions=["a", "b", "c"], caption_video=[0, 0, 1])
    log_dataset_inputs(tracker, job, {"train": m})
    run = MlflowClient(job.tracking_uri).get_run(tracker.run_id)
    tags, params = run.data.tags, run.data.params
    assert tags["mlflow.source.git.commit"] == "abc123" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"].startswith("tvr") and tags["mlflow.user"]
    assert "**tmass** on `tvr-small`" in tags["mlflow.note.content"] and tags["tvr.dataset"] == "synthetic"
    assert "model.tmass.support_weight" in params and "data.synth.num_clips" in params
    assert not [k for k in params if k.startswith(("tune.", "captions.", "model.meanp."))]
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "synthetic-train" and inp.dataset.digest == manifest_digest(m)
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "train")]
    m2 = Manifest(dataset="msrvtt", split="train", video_ids=["v0", "v1"], video_files=["v0.mp4", "v1.mp4"],
                  captions=["a", "b", "d"], caption_video=[0, 0, 1])
    assert manifest_digest(m2) != manifest_digest(m)
    real = start_run(_job(tmp_path, "data.root=/data/msrvtt", "run.name=real"))
    params = MlflowClient(job.tracking_uri).get_run(real.run_id).data.params
    assert params["data.root"] == "/data/msrvtt" and not [k for k in params if k.startswith("data.synth.")]


# -- promotion: beat chance (and the champion) or --force ----------------------------------------

def test_chance_levels_match_a_float64_simulation_of_random_scores():
    import numpy as np

    from tvr_platform.runs import chance_level

    rng = np.random.default_rng(0)
    n, c = 7, 3                                   # 7 clips, 3 captions each
    t = n * c
    owner = np.repeat(np.arange(n), c)
    sims = rng.random((20000, t, n))
    t2v_rank = (sims > sims[:, np.arange(t), owner][..., None]).sum(-1) + 1          # (trials, T)
    v2t = np.swapaxes(sims, 1, 2)                                                     # (trials, N, T)
    first_true = np.stack([(v2t > v2t[:, :, owner == v].max(-1)[..., None])[:, v].sum(-1) + 1
                           for v in range(n)], 1)                                     # (trials, N)
    for k in (1, 5):
        assert chance_level(f"t2v_R{k}", n, t) == pytest.approx(100 * (t2v_rank <= k).mean(), abs=0.5)
        assert chance_level(f"v2t_R{k}", n, t) == pytest.approx(100 * (first_true <= k).mean(), abs=0.5)
    assert chance_level("t2v_MnR", n, t) == pytest.approx(t2v_rank.mean(), abs=0.05)
    assert chance_level("v2t_MnR", n, t) == pytest.approx(first_true.mean(), abs=0.05)
    assert chance_level("t2v_R1", 24) == pytest.approx(100 / 24) and chance_level("loss", 24) is None


def test_champion_moves_only_above_chance_and_the_champion_or_when_forced(tmp_path):
    from mlflow.tracking import MlflowClient

    from tvr_platform.registry import promote

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("m")

    def version(score: float) -> str:
        v = client.create_model_version("m", source=str(tmp_path)).version
        client.set_model_version_tag("m", v, "metric.t2v_R1", str(score))
        return str(v)

    at_chance = promote(uri, "m", version(100 / 24), chance=100 / 24)  # tied scores: R@1 = 1/N exactly
    assert not at_chance["promoted"] and "does not beat chance" in at_chance["reason"] and "--force" in at_chance["reason"]
    assert client.get_model_version_by_alias("m", "challenger").version == 1
    first = promote(uri, "m", version(15.0), chance=100 / 24)
    assert first["promoted"] and first["reason"] == "no champion yet"
    worse = promote(uri, "m", version(10.0), chance=100 / 24)
    assert not worse["promoted"] and "does not beat the champion's 15" in worse["reason"]
    forced = promote(uri, "m", version(3.0), chance=100 / 24, force=True)
    assert forced["promoted"] and forced["reason"] == "forced"
    assert client.get_model_version_by_alias("m", "champion").version == 4


def test_registered_version_has_signature_description_and_metrics(tmp_path):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from tvr.backbone import ClipBackbone
    from tvr.methods import build_method
    from tvr_platform.config import load_job
    from tvr_platform.registry import register_model
    from tvr_platform.tracking import start_run

    job = load_job(None, [f"run.work_dir={tmp_path}", "model.backbone.name=tvr-tiny", "data.num_frames=2"])
    method = build_method(job.model.method, job.method_cfg, ClipBackbone(job.model.backbone))
    torch.save(method.state_dict(), tmp_path / "model.pt")
    tracker = start_run(job)
    version = register_model(job, tmp_path / "model.pt", tracker.run_id, name="sig", epoch=3,
                             metrics={"val/t2v_R1": 12.5, "test/t2v_R1": 10.0, "train_loss": 1.5})
    client = MlflowClient(job.tracking_uri)
    mv = client.get_model_version("sig", version)
    assert mv.description.startswith("**meanp** on `tvr-tiny`") and tracker.run_id in mv.description
    assert "Weights of epoch 3 of 5, the best by validation t2v_R1 (10% of `train` held out (seed 0))" \
        in mv.description
    assert "Validation: t2v_R1 12.5." in mv.description and "Split `test`: t2v_R1 10.0." in mv.description
    assert {k: mv.tags[k] for k in ("val.t2v_R1", "test.t2v_R1", "metric.train_loss", "selected_epoch")} == {
        "val.t2v_R1": "12.5000", "test.t2v_R1": "10.0000", "metric.train_loss": "1.5000", "selected_epoch": "3"}
    info = mlflow.models.get_model_info(f"models:/sig/{version}")
    assert info.signature.inputs.input_names() == ["text"]
    logged = {m.key: m.value for m in client.get_logged_model(info.model_id).metrics}
    assert logged == {"val.t2v_R1": 12.5, "test.t2v_R1": 10.0, "metric.train_loss": 1.5}
    # the model's metrics never add points to the run's own histories (val/t2v_R1, train_loss)
    assert not client.get_metric_history(tracker.run_id, "val/t2v_R1")
    assert not client.get_metric_history(tracker.run_id, "train_loss")
    tracker.terminate()
