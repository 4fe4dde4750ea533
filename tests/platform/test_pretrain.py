"""`tvr pretrain`: the exported backbone is an open_clip checkpoint that open_clip loads strictly,
registered in MLflow so that ``model.backbone.pretrained=models:/...`` resolves to it; and (slow) the
miniature benchmark: a pre-trained backbone beats random init on static queries."""

from __future__ import annotations

import json

import pytest
import torch

from tvr_platform.config import ConfigError


def _method_weights(tmp_path, seed=0):
    from tvr.backbone import BackboneCfg, ClipBackbone
    from tvr.methods import METHODS, build_method

    torch.manual_seed(seed)
    method = build_method("xpool", METHODS["xpool"].config_cls(), ClipBackbone(BackboneCfg(name="tvr-tiny")))
    path = tmp_path / "model.pt"
    torch.save(method.state_dict(), path)
    return method, path


def test_export_writes_the_clip_alone_in_open_clip_format_and_open_clip_loads_it(tmp_path):
    from tvr.backbone import create_clip
    from tvr_platform.pretrain.recipe import export_open_clip

    method, weights = _method_weights(tmp_path)
    ckpt = export_open_clip(weights, "tvr-tiny", 3, tmp_path / "out" / "open_clip_model.pt")
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["name"] == "tvr-tiny" and raw["epoch"] == 3 and set(raw) == {"epoch", "name", "state_dict"}
    clip_state = method.backbone.clip.state_dict()
    assert set(raw["state_dict"]) == set(clip_state)                      # no X-Pool head, nothing missing
    loaded = create_clip("tvr-tiny", str(ckpt)).state_dict()                # open_clip, strict
    for k, v in clip_state.items():
        assert torch.equal(loaded[k], v), k


def test_registered_backbone_resolves_from_models_uri_and_other_models_are_refused(tmp_path):
    from mlflow.tracking import MlflowClient

    from tvr_platform.config import load_job
    from tvr_platform.pretrain.recipe import export_open_clip, register_backbone, resolve_backbone_ref
    from tvr_platform.tracking import start_run

    job = load_job(None, [f"run.work_dir={tmp_path}", "tracking.registered_model=bb", "run.name=pt"])
    method, weights = _method_weights(tmp_path, seed=1)
    ckpt = export_open_clip(weights, "tvr-tiny", 1, tmp_path / "open_clip_model.pt")
    tracker = start_run(job)
    reg = register_backbone(job, ckpt, tracker.run_id, {"t2v_R1": 12.5})
    tracker.terminate()
    assert reg["uri"] == "models:/bb/1" and reg["promoted"]
    for ref in ("models:/bb@champion", "models:/bb/1"):
        path = resolve_backbone_ref(ref, job.work_dir, job.tracking_uri)
        assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["logit_scale"],
                           method.backbone.clip.logit_scale.detach())
    # the trainer's resolution goes through the same function
    from tvr_platform.train.trainer import resolve_pretrained

    job.model.backbone.pretrained = "models:/bb@champion"
    assert resolve_pretrained(job) == path
    client = MlflowClient(job.tracking_uri)
    client.create_registered_model("not-a-backbone")
    client.create_model_version("not-a-backbone", source=str(tmp_path), run_id=tracker.run_id)
    with pytest.raises(FileNotFoundError, match="not a backbone checkpoint"):
        resolve_backbone_ref("models:/not-a-backbone/1", job.work_dir, job.tracking_uri)
    with pytest.raises(FileNotFoundError, match="no such registered model version"):
        resolve_backbone_ref("models:/missing@champion", job.work_dir, job.tracking_uri)


def test_pretrain_job_is_meanp_on_one_frame_of_its_own_static_set(tmp_path):
    from tvr_platform.pretrain.recipe import load_pretrain_job

    job = load_pretrain_job(None, [f"run.work_dir={tmp_path}"])
    assert job.model.method == "meanp" and job.data.num_frames == 1 and job.data.synth.captions == "static"
    assert job.dataset_uri.endswith("datasets/synthetic-static-1000")
    with pytest.raises(ConfigError, match="data.num_frames=1"):
        load_pretrain_job(None, [f"run.work_dir={tmp_path}", "data.num_frames=4"])


def test_cli_pretrain_bad_override_is_one_line(capsys, tmp_path):
    from tvr_platform.cli import main

    assert main(["pretrain", f"run.work_dir={tmp_path}", "model.method=xpool"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.method=meanp" in err[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_miniature_benchmark_pretrained_backbone_beats_random_init_on_static_queries(tmp_path):
    """Two methods, one seed: `tvr pretrain` (Ray Data + Ray Train, registered in MLflow), then meanP
    fine-tuned from that backbone vs meanP from random init, same data, budget and seed."""
    from tvr_platform.bench.methods import run_benchmark

    budget = ["data.synth.num_clips=64", "data.synth.test_fraction=0.5", "train.epochs=2", "data.num_frames=2",
              "train.eval_every=100"]                                    # 32 test clips = 32 static queries
    pre = ["data.synth.num_clips=192", "data.batch_size=16", "train.epochs=8", "train.eval_every=100"]
    import tvr_platform.bench.methods as bench

    saved = bench.PRETRAIN_BUDGET
    bench.PRETRAIN_BUDGET = [*saved, *pre]
    try:
        rows = run_benchmark([0], tmp_path, budget, only=["meanP, random init", "meanP (CLIP4Clip)"])
    finally:
        bench.PRETRAIN_BUDGET = saved
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"meanP, random init", "meanP (CLIP4Clip)"}
    pre_row, rand_row = by["meanP (CLIP4Clip)"], by["meanP, random init"]
    assert pre_row["backbone"].endswith("open_clip_model.pt") and rand_row["backbone"] == "random init"
    m_pre, m_rand = pre_row["metrics"], rand_row["metrics"]
    assert m_pre["static_t2v_R1"] > m_rand["static_t2v_R1"], (m_pre, m_rand)
    assert {"temporal_t2v_R1", "temporal_twin_acc"} <= set(m_pre)
    report = json.loads(next((tmp_path / "pretrain").rglob("pretrain.json")).read_text())
    assert report["registered"]["name"] == "tvr-backbone-bench"
