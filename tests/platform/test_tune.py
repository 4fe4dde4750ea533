"""Tuning campaigns: search spaces (pure), and an end-to-end campaign on 2 CPUs with ASHA, MLflow
parent/child runs, registration of the best trial, reload, and resume after an interruption."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import tiny_overrides
from tvr_platform.config import ConfigError, load_job

JOBS = Path(__file__).resolve().parents[2] / "jobs"
REPO = JOBS.parent


def space_job(space: dict | None = None, *extra: str, **tune) -> object:
    overrides = [f"tune.{k}={v}" for k, v in tune.items()] + list(extra)
    if space is not None:
        flat = ", ".join(f"{k}: {v}" for k, v in space.items())
        overrides.append(f"tune.search_space={{{flat}}}")
    return load_job(None, overrides)


# -- search spaces (pure) ---------------------------------------------------------------------------

CONDITIONAL = {
    "model.method": "{choice: [tmass, ucofia, excae, vop]}",
    "train.lr": "{loguniform: [1.0e-5, 1.0e-3]}",
    "model.tmass.radius": "{choice: [mean, scaled_mean, linear], when: {model.method: tmass}}",
    "model.ucofia.sinkhorn_iters": "{randint: [0, 4], when: {model.method: ucofia}}",
    "model.excae.top_k": "{randint: [1, 3], when: {model.method: [excae]}}",
    "model.vop.prompt_length": "{choice: [2, 4], when: {model.method: vop}}",
}


def _owner(key: str) -> str | None:
    parts = key.split(".")
    return parts[1] if parts[0] == "model" and len(parts) > 2 else None


def _assert_valid_combo(values: dict, base) -> None:
    from tvr_platform.tune.space import apply_values

    method = values["model.method"]
    for key in values:
        assert _owner(key) in (None, method), (key, method)
    expected_knob = {"tmass": "model.tmass.radius", "ucofia": "model.ucofia.sinkhorn_iters",
                     "excae": "model.excae.top_k", "vop": "model.vop.prompt_length"}[method]
    assert expected_knob in values
    assert 1e-5 <= values["train.lr"] <= 1e-3
    job = apply_values(base, values)  # every sampled combination is a valid job
    assert job.model.method == method


def test_random_search_samples_a_knob_only_when_its_method_is_chosen():
    from ray.tune.search.variant_generator import generate_variants

    from tvr_platform.tune.space import build_space

    base = space_job(CONDITIONAL)
    space = build_space(base)
    param_space = space.ray_param_space()
    seen = set()
    for _ in range(40):
        (_, spec), = itertools.islice(generate_variants({"config": param_space}), 1)
        values = space.trial_values(spec["config"])
        _assert_valid_combo(values, base)
        seen.add(values["model.method"])
        inactive = [k for k in spec["config"] if k not in values]
        assert all(spec["config"][k] is None for k in inactive)  # never sampled, only placeholders
    assert seen == {"tmass", "ucofia", "excae", "vop"}


def test_optuna_define_by_run_samples_only_valid_combos():
    import optuna

    from tvr_platform.tune.space import build_space

    base = space_job(CONDITIONAL, search_alg="optuna")
    space = build_space(base)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    for i in range(20):
        trial = study.ask()
        space.define_by_run(trial)
        _assert_valid_combo(dict(trial.params), base)
        study.tell(trial, float(i % 3))


def test_method_presets_expand_to_documented_conditional_spaces():
    from tvr_platform.tune.space import METHOD_SPACES, build_space

    job = load_job(None, ["tune.methods=[tmass,ucofia,excae,vop]", "tune.common_knobs=true"])
    space = build_space(job)
    by_key = {p.key: p for p in space.params}
    assert by_key["model.method"].args == ("tmass", "ucofia", "excae", "vop")
    assert by_key["model.tmass.radius"].args == ("mean", "scaled_mean", "linear")
    assert by_key["model.ucofia.sinkhorn_iters"].args[0] == 0  # 0 = Sinkhorn off is in the space
    for method, knobs in METHOD_SPACES.items():
        for key in knobs:
            assert by_key[key].when == {"model.method": (method,)}
    for key in ("train.lr", "data.num_frames", "data.batch_size"):
        assert not by_key[key].when
    # conditions come before the keys they condition
    order = space.keys()
    assert all(order.index("model.method") < order.index(k) for k in METHOD_SPACES["vop"])


def test_frames_follow_data_num_frames_for_the_chosen_method():
    from tvr_platform.tune.space import apply_values

    job = apply_values(load_job(None, []), {"model.method": "tmass", "data.num_frames": 4})
    assert job.model.tmass.num_frames == 4 and job.data.num_frames == 4


def test_trial_job_is_the_campaign_job_plus_active_values_under_a_deterministic_name():
    from tvr_platform.tune.campaign import trial_job
    from tvr_platform.tune.space import build_space

    base = space_job(CONDITIONAL, "run.name=camp")
    space = build_space(base)
    config = {"model.method": "ucofia", "train.lr": 2e-4, "model.tmass.radius": None,
              "model.ucofia.sinkhorn_iters": 0, "model.excae.top_k": None, "model.vop.prompt_length": None}
    job = trial_job(base, space, config, "ab123_00007")
    assert job.run.name == "camp-ab123_00007"
    assert (job.model.method, job.train.lr, job.model.ucofia.sinkhorn_iters) == ("ucofia", 2e-4, 0)
    assert job.model.tmass.radius == base.model.tmass.radius  # inactive knob untouched
    assert base.run.name == "camp" and base.model.method == "meanp"  # the campaign job is not mutated


@pytest.mark.parametrize("trainer_first", [True, False])
def test_a_stopped_trial_ends_killed_whichever_closes_its_run_first(tmp_path, trainer_first):
    """ASHA stops a trial: the campaign's callback marks its child run KILLED while the trial's
    trainer, torn down, may raise and close the run itself (Tracker.fail). Either order: KILLED."""
    from types import SimpleNamespace

    from tvr_platform.tracking import start_run
    from tvr_platform.tune.campaign import CAMPAIGN_TAG, TRIAL_ID_TAG, _child_run_closer

    job = load_job(None, tiny_overrides(tmp_path, **{"tracking.experiment": "race", "run.name": "camp-t1"}))
    tracker = start_run(job)
    tracker.set_tags({CAMPAIGN_TAG: "camp", TRIAL_ID_TAG: "t1"})
    closer = _child_run_closer(job.tracking_uri, "race", "camp")
    if trainer_first:
        tracker.fail("FAILED")
    closer.on_trial_complete(0, [], SimpleNamespace(trial_id="t1"))
    if not trainer_first:
        tracker.fail("FAILED")
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.tags["tvr.tune.stopped_early"] == "true"
    # a trial that errored (Tune's on_trial_error) stays FAILED
    other = start_run(load_job(None, tiny_overrides(tmp_path, **{"tracking.experiment": "race", "run.name": "camp-t2"})))
    other.set_tags({CAMPAIGN_TAG: "camp", TRIAL_ID_TAG: "t2"})
    other.fail("FAILED")
    closer.on_trial_error(0, [], SimpleNamespace(trial_id="t2"))
    assert other.client.get_run(other.run_id).info.status == "FAILED"


@pytest.mark.parametrize("space, extra, needle", [
    ({"train.lrx": "{uniform: [1, 2]}"}, {}, "train.lrx: unknown config key"),
    ({"train.lr": "{uniform: [2.0, 1.0]}"}, {}, "train.lr.uniform: invalid range"),
    ({"train.lr": "{loguniform: [0.0, 1.0]}"}, {}, "train.lr.loguniform: low must be > 0"),
    ({"train.lr": "{normal: [0, 1]}"}, {}, "train.lr: give exactly one of"),
    ({"train": "{choice: [1]}"}, {}, "train: 'train' is a config section"),
    ({"train.epochs": "{randint: [0, 3]}"}, {}, "train.epochs: value 0 is rejected"),
    ({"data.batch_size": "{choice: [4, -1]}"}, {}, "data.batch_size: value -1 is rejected"),
    ({"model.tmass.radius": "{choice: [mean, nope]}"}, {"model.method": "tmass"}, "value 'nope' is rejected"),
    ({"model.tmass.radius": "{choice: [mean]}"}, {}, "only used when model.method=tmass"),
    ({"model.method": "{choice: [tmass]}", "model.tmass.radius": "{choice: [mean], when: {model.method: vop}}"},
     {}, "when.model.method: ['vop'] never sampled"),
    ({"model.ucofia.topk": "{randint: [1, 2], when: {train.lr: 1}}"}, {"model.method": "ucofia"},
     "a condition must name an unconditional choice/grid key"),
    ({"tracking.uri": "{choice: [a]}"}, {}, "not tunable"),
    ({"model.tmass.num_frames": "{choice: [4]}"}, {"model.method": "tmass"}, "tune data.num_frames instead"),
    ({"train.lr": "{grid: [0.1, 0.2]}"}, {"tune.search_alg": "optuna"}, "grid is for search_alg=random"),
])
def test_bad_space_fails_before_any_trial_naming_the_key(space, extra, needle, monkeypatch):
    import ray

    from tvr_platform.tune import campaign

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for an invalid space")

    monkeypatch.setattr(ray, "init", no_ray)
    job = space_job(space, *(f"{k}={v}" for k, v in extra.items()))
    with pytest.raises(ConfigError) as err:
        campaign.run_campaign(job)
    assert needle in str(err.value)


def test_bad_metric_and_schedule_fail_before_any_trial():
    from tvr_platform.tune.campaign import check_campaign

    space = {"train.lr": "{uniform: [0.1, 0.2]}"}
    with pytest.raises(ConfigError, match="tune.metric='recall'"):
        check_campaign(space_job(space, metric="recall"))
    with pytest.raises(ConfigError, match="tune.grace_period=3 exceeds train.epochs=2"):
        check_campaign(space_job(space, "train.epochs=2", grace_period=3))


# -- end to end (Ray, 2 CPUs) -------------------------------------------------------------------------

CAMPAIGN = [
    # one Ray Train worker per trial: the campaign wiring is under test, not data parallelism
    # (tests/platform/test_train_strategies.py), and each trial starts in about half the time
    "train.num_workers=1",
    "tune.num_samples=4", "tune.seed=0", "tune.grace_period=1", "tune.promote=true", "tune.name=camp",
    "train.epochs=2", "tracking.registered_model=tiny-tune", "model.tmass.num_frames=2",
    "model.ucofia.topk_samples=20",
    "tune.search_space={train.lr: {loguniform: [3.0e-4, 3.0e-3]}, model.method: {choice: [meanp, tmass]}, "
    "model.tmass.radius: {choice: [mean, scaled_mean, linear], when: {model.method: tmass}}}",
]


def campaign_spec(tmp_path: Path) -> Path:
    """jobs/tune.yaml without its search space (overrides merge into a space, they do not replace it)."""
    import yaml

    spec = yaml.safe_load((JOBS / "tune.yaml").read_text())
    del spec["tune"]["search_space"]
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def tvr(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tvr_platform.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_campaign_end_to_end_with_asha_mlflow_registry_and_reload(tmp_path):
    from mlflow.tracking import MlflowClient

    from tvr_platform.recipes import ensure_synthetic, evaluate_model
    from tvr_platform.tune.campaign import CAMPAIGN_TAG, ROLE_TAG, TRIAL_ID_TAG, run_campaign

    # ranked on train_loss (minimised): 4 test clips tie R@1 too often for ASHA to stop anything, while
    # T-MASS's loss (L_s + alpha L_sup) sits far above meanP's, so with seed 0's draw (tmass, meanp,
    # meanp, tmass) the second T-MASS trial always falls below the rung median and is stopped early
    overrides = tiny_overrides(tmp_path, **{"tracking.experiment": "tune-e2e"}) + CAMPAIGN + [
        "tune.metric=train_loss", "tune.mode=min"]
    spec = campaign_spec(tmp_path)
    job = load_job(spec, overrides)
    ensure_synthetic(job)
    result = run_campaign(job)

    assert not result.interrupted and len(result.rows) == 4
    assert {r["status"] for r in result.rows} <= {"FINISHED", "STOPPED_EARLY"}
    for r in result.rows:  # conditional knob present exactly for T-MASS trials
        assert ("model.tmass.radius" in r["values"]) == (r["values"]["model.method"] == "tmass")
    scores = [r["train_loss"] for r in result.rows]
    assert scores == sorted(scores)

    client = MlflowClient(job.tracking_uri)
    exp = client.get_experiment_by_name("tune-e2e")
    (parent,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'campaign'")
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
    assert len(children) == 4
    assert parent.info.status == "FINISHED" and parent.data.tags[CAMPAIGN_TAG] == "camp"
    artifacts = {a.path for d in ("summary", "campaign", "config")
                 for a in client.list_artifacts(parent.info.run_id, d)}
    assert {"summary/trials.md", "summary/trials.json", "summary/knobs_vs_metric.png",
            "summary/best_job.yaml", "campaign/search_space.json"} <= artifacts
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        row = next(r for r in result.rows if r["trial_id"] == tags[TRIAL_ID_TAG])
        assert params["model.method"] == row["values"]["model.method"]
        assert float(params["train.lr"]) == pytest.approx(row["values"]["train.lr"])
        assert params["train.epochs"] == "2" and params["data.num_frames"] == "2"
        epochs = len(client.get_metric_history(child.info.run_id, "val/t2v_R1"))
        assert epochs >= row["epochs"] >= 1  # per-epoch metrics; ASHA may stop after the grace period
        if row["status"] == "FINISHED":
            assert epochs == 2 and child.info.status == "FINISHED"
            names = {a.path for d in ("config", "report", "plots")
                     for a in client.list_artifacts(child.info.run_id, d)}
            assert {"config/job.yaml", "report/eval.json", "plots/learning_curve.png"} <= names
        else:
            assert child.info.status == "KILLED"

    # no worker placement group outlives its trial, ASHA-stopped ones included (Train's own cleaner
    # needs the dashboard's State API; a leaked group starves every later trial's workers)
    from ray.util.placement_group import placement_group_table

    assert any(r["status"] == "STOPPED_EARLY" for r in result.rows)
    deadline = time.time() + 20
    while (live := [g for g in placement_group_table().values() if g["state"] != "REMOVED"]) and \
            time.time() < deadline:
        time.sleep(1)
    assert not live, live

    best = result.best
    assert best is not None and best["status"] == "FINISHED"
    assert parent.data.tags["tvr.tune.best_run_id"] == best["run_id"]
    promoted = result.promoted
    version = client.get_model_version_by_alias("tiny-tune", "challenger")
    assert str(version.version) == str(promoted["version"]) and promoted["promoted"]
    assert client.get_model_version_by_alias("tiny-tune", "champion").version == version.version
    tags = version.tags
    assert tags["method"] == best["values"]["model.method"] and tags["backbone"] == "tvr-tiny"
    assert len(tags["data_manifest_hash"]) == 64 and tags["git_commit"] and tags["eval_split"] == "test"
    assert float(tags["metric.train_loss"]) == pytest.approx(best["train_loss"], abs=1e-4)
    best_run = client.get_run(best["run_id"])
    # ranked and registered on validation (the selected epoch's); test recorded, never used to choose
    assert best["train_loss"] == pytest.approx(best_run.data.metrics["final/train_loss"])
    assert float(tags["val.t2v_R1"]) == pytest.approx(best_run.data.metrics["final/val/t2v_R1"], abs=1e-4)
    assert float(tags["test.t2v_R1"]) == pytest.approx(best_run.data.metrics["final/test/t2v_R1"], abs=1e-4)
    assert tags["selected_epoch"] == str(int(best_run.data.metrics["final/epoch"]))
    assert best_run.data.params["train.select_metric"] == "train_loss"
    assert [m.value for m in client.get_metric_history(best["run_id"], "val/num_videos")] == [1, 1]

    # `tvr eval models:/tiny-tune@champion` reloads the weights + spec and reproduces the test metrics
    report = evaluate_model("models:/tiny-tune@champion", [f"run.work_dir={tmp_path}"], job.tracking_uri)
    for k, v in report["metrics"].items():
        assert v == pytest.approx(best_run.data.metrics[f"final/test/{k}"], abs=1e-4), k

    # promoting again: challenger moves, champion stays unless strictly better on the same eval set
    from tvr_platform.cli import main

    assert main(["registry", "promote", str(spec), *overrides]) == 0
    again = client.get_model_version_by_alias("tiny-tune", "challenger")
    assert int(again.version) == int(version.version) + 1
    assert client.get_model_version_by_alias("tiny-tune", "champion").version == version.version


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_interrupted_campaign_resumes_without_rerunning_finished_trials(tmp_path):
    """SIGINT the campaign once a trial has finished (Tune saves its state and exits), then
    `tvr tune --resume`: the finished trial keeps its single MLflow run and metric history."""
    from mlflow.tracking import MlflowClient

    from tvr_platform.recipes import ensure_synthetic
    from tvr_platform.tune.campaign import ROLE_TAG, TRIAL_ID_TAG

    overrides = tiny_overrides(tmp_path, **{"tracking.experiment": "tune-resume"}) + [
        *CAMPAIGN[:-1], "tune.num_samples=1", "tune.scheduler=fifo", "tune.promote=false",
        "tune.search_space={train.lr: {grid: [3.0e-4, 3.0e-3]}}"]
    spec = campaign_spec(tmp_path)
    job = load_job(spec, overrides)
    ensure_synthetic(job)
    client = MlflowClient(job.tracking_uri)

    def trial_runs():
        exp = client.get_experiment_by_name("tune-resume")
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")

    proc = tvr("tune", str(spec), *overrides)
    deadline = time.time() + 400
    while time.time() < deadline and not any(r.info.status == "FINISHED" for r in trial_runs()):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    finished = {r.data.tags[TRIAL_ID_TAG]: r for r in trial_runs() if r.info.status == "FINISHED"}
    assert finished and len(finished) < 2, out
    assert proc.returncode == 130 and "--resume" in out, out[-3000:]

    resumed = tvr("tune", str(spec), *overrides, "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    runs = trial_runs()
    by_trial: dict[str, list] = {}
    for r in runs:
        by_trial.setdefault(r.data.tags[TRIAL_ID_TAG], []).append(r)
    assert len(by_trial) == 2 and all(len(v) == 1 for v in by_trial.values())
    assert all(r.info.status == "FINISHED" for r in runs)
    for trial_id, before in finished.items():
        after = by_trial[trial_id][0]
        assert after.info.end_time == before.info.end_time  # not rerun
        assert len(client.get_metric_history(after.info.run_id, "train_loss")) == 2
