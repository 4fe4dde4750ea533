"""Model selection never sees the test split: a validation set held out of the training videos
(by video, seeded, recorded), the epoch chosen on it (a later epoch wins a tie), the chosen
epoch's checkpoint found among those Ray Train kept, and promotion compared on validation.
No Ray here: manifests are made up, Ray's result is a stand-in."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from tvr.data.annotations import Manifest


def _manifest(split: str, ids: list[str], captions_per_video: int = 3) -> Manifest:
    caps, owner = [], []
    for i, v in enumerate(ids):
        for k in range(captions_per_video):
            caps.append(f"{v} caption {k}")
            owner.append(i)
    return Manifest(dataset="msrvtt", split=split, video_ids=list(ids), video_files=[f"{v}.mp4" for v in ids],
                    captions=caps, caption_video=owner, quarantine=[{"uri": "x#1", "reason": "empty caption"}])


@pytest.fixture
def splits(monkeypatch, tmp_path):
    """load_splits over made-up manifests: 13 training videos (a prime), 5 test videos."""
    from tvr_platform.data import pipeline

    made = {"train": _manifest("train", [f"video{i}" for i in range(13)]),
            "test": _manifest("test", [f"video{100 + i}" for i in range(5)]),
            "val": _manifest("val", ["video3", "video200"])}
    monkeypatch.setattr(pipeline, "load_manifest", lambda job, split: made[split])

    def load(*overrides: str):
        from tvr_platform.config import load_job

        return pipeline.load_splits(load_job(None, [f"run.work_dir={tmp_path}", *overrides]))

    return load, made


def test_held_out_videos_are_disjoint_complete_and_reproducible_from_the_seed(splits):
    load, made = splits
    train, val, test = load()
    assert val.num_videos == 1 and train.num_videos == 12          # round(0.1 x 13) = 1 of a prime count
    ids = set(train.video_ids) | set(val.video_ids)
    assert not set(train.video_ids) & set(val.video_ids) and ids == set(made["train"].video_ids)
    assert not ids & set(test.video_ids)
    # by video: every caption of a held-out video is on the validation side, none on the train side
    assert sorted(val.captions) == sorted(c for c in made["train"].captions if c.split()[0] in val.video_ids)
    assert train.num_captions + val.num_captions == made["train"].num_captions
    assert all(c.split()[0] == val.video_ids[v] for c, v in zip(val.captions, val.caption_video))
    assert val.quarantine == [] and train.quarantine == made["train"].quarantine  # reported once
    # the same seed draws the same videos, whatever run.seed; another seed draws others
    assert load("run.seed=7")[1].video_ids == val.video_ids
    assert load("data.val_fraction=0.3")[1].num_videos == 4
    draws = {tuple(load(f"data.val_seed={s}", "data.val_fraction=0.3")[1].video_ids) for s in range(5)}
    assert len(draws) > 1


def test_the_draw_depends_on_the_ids_and_seed_only():
    from tvr_platform.data.pipeline import holdout_indices

    ids = [f"v{i}" for i in range(50)]
    _, held = holdout_indices(ids, 0.2, seed=3)
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    _, held2 = holdout_indices(shuffled, 0.2, seed=3)
    assert len(held) == 10 and {ids[i] for i in held} == {shuffled[i] for i in held2}


def test_an_empty_side_or_a_shared_video_is_one_clear_line(splits):
    load, _ = splits
    with pytest.raises(ValueError, match=r"data.val_fraction=0.02 .* leaves 13 for training and 0 for validation"):
        load("data.val_fraction=0.02")
    with pytest.raises(ValueError, match=r"leaves 0 for training and 13 for validation"):
        load("data.val_fraction=0.97")
    with pytest.raises(ValueError, match=r"data.val_split='val' shares 1 video\(s\) with data.train_split"):
        load("data.val_split=val")
    from tvr_platform.config import ConfigError, load_job

    for bad in ("data.val_fraction=0", "data.val_fraction=1.0", "data.val_split=test",
                "train.select_metric=test_R1", "train.checkpoints_to_keep=0"):
        with pytest.raises(ConfigError) as err:
            load_job(None, [bad])
        assert len(str(err.value).splitlines()) == 1 and bad.split("=")[0] in str(err.value), err.value


def test_a_named_validation_split_is_used_when_it_shares_no_video(splits, monkeypatch):
    load, made = splits
    made["val"] = _manifest("val", ["video300", "video301"])
    train, val, _ = load("data.val_split=val")
    assert val.video_ids == ["video300", "video301"] and train.num_videos == 13


def test_the_selected_epoch_is_the_best_by_validation_not_the_last():
    from tvr_platform.train.worker import improves, select_epoch

    nan = float("nan")
    assert select_epoch([(0, 10.0), (1, 30.0), (2, 20.0)], "max") == 1
    assert select_epoch([(0, 10.0), (1, 30.0), (2, 30.0), (3, 5.0)], "max") == 2   # a tie: the later epoch
    assert select_epoch([(0, None), (1, 12.0), (2, nan), (3, 11.0)], "max") == 1    # unevaluated epochs skip
    assert select_epoch([(0, 3.0), (1, 2.0), (2, 2.5)], "min") == 1                 # train_loss / MnR
    assert select_epoch([(0, None)], "max") is None
    assert not improves(nan, None, "max") and improves(0.0, None, "min")


def test_the_selected_epochs_checkpoint_is_found_among_the_kept_ones(tmp_path):
    from tvr_platform.train.trainer import selected_checkpoint

    best, latest = SimpleNamespace(path="ckpt/epoch=0001"), SimpleNamespace(path="ckpt/epoch=0003")
    result = SimpleNamespace(best_checkpoints=[(latest, {"epoch": 3}), (best, {"epoch": 1})],
                             checkpoint=latest, metrics={"epoch": 3, "best_epoch": 1})
    assert selected_checkpoint(result, 1, None) is best
    assert selected_checkpoint(result, 3, None) is latest
    assert selected_checkpoint(result, -1, None) is latest                         # nothing selected
    with pytest.raises(RuntimeError, match="selected epoch 2"):
        selected_checkpoint(result, 2, None)
    # local mode (train.num_workers=0): nothing uploaded, the kept directories are searched
    for e in (1, 10):
        (tmp_path / f"ckpt-e{e}-r0-abc").mkdir()
    local = SimpleNamespace(best_checkpoints=None, checkpoint=None, metrics={"epoch": 10})
    assert selected_checkpoint(local, 1, str(tmp_path)).path.endswith("ckpt-e1-r0-abc")


def test_promotion_compares_validation_not_test(tmp_path):
    """Two versions: the newer is better on test but worse on validation: champion stays."""
    from mlflow.tracking import MlflowClient

    from tvr_platform.registry import metric_tag, promote

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("m")
    for val, test in ((40.0, 10.0), (30.0, 90.0)):
        v = client.create_model_version("m", source=str(tmp_path)).version
        for k, x in (("val/t2v_R1", val), ("test/t2v_R1", test)):
            client.set_model_version_tag("m", v, metric_tag(k), str(x))
    assert promote(uri, "m", "1", chance=20.0)["promoted"]
    decision = promote(uri, "m", "2", chance=20.0)
    assert not decision["promoted"] and decision["score"] == 30.0 and "40" in decision["reason"]
    assert metric_tag("val/t2v_R1") == "val.t2v_R1" and metric_tag("train_loss") == "metric.train_loss"
