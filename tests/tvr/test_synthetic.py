"""The synthetic dataset generator: real MP4s, MSR-VTT-format annotations, determinism, captions."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import av
import numpy as np
import pytest

from tvr.data.synthetic import COLOURS, DIRECTIONS, SHAPES, render_frames, sample_spec, synthesize

FIXTURES = Path(__file__).parents[1] / "fixtures" / "annotations" / "msrvtt"
SMALL = dict(num_clips=8, test_fraction=0.25, captions_per_clip=3, seconds=1.0, fps=12, size=32)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synthesize(out, seed=3, **SMALL)


def test_every_clip_is_a_decodable_h264_mp4_with_the_right_frames(synth):
    out, res = synth
    for spec in res.specs:
        path = out / "videos" / f"{spec.video_id}.mp4"
        with av.open(str(path)) as c:
            vs = c.streams.video[0]
            assert vs.codec_context.name == "h264"
            assert vs.codec_context.pix_fmt == "yuv420p"
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 12 and frames[0].shape == (32, 32, 3)


def test_annotation_files_follow_the_msrvtt_release_schema(synth):
    out, res = synth
    data = json.loads((out / "MSRVTT_data.json").read_text())
    assert set(data) >= {"info", "videos", "sentences"}
    for v in data["videos"]:
        assert set(v) == {"category", "url", "video_id", "start time", "end time", "split", "id"}
        assert v["split"] in {"train", "validate", "test"} and isinstance(v["category"], int)
    for s in data["sentences"]:
        assert set(s) == {"caption", "video_id", "sen_id"}
    assert [s["sen_id"] for s in data["sentences"]] == list(range(len(data["sentences"])))
    assert len(data["sentences"]) == 8 * 3
    # CSV headers exactly as in the real release files (copied into the fixture).
    for name in ("MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv"):
        real = (FIXTURES / name).read_text().splitlines()[0]
        assert (out / name).read_text().splitlines()[0] == real
    test_rows = list(csv.DictReader(io.StringIO((out / "MSRVTT_JSFUSION_test.csv").read_text())))
    train_ids = [r["video_id"] for r in csv.DictReader(io.StringIO((out / "MSRVTT_train.9k.csv").read_text()))]
    assert len(test_rows) == 2 and len(train_ids) == 6
    assert not {r["video_id"] for r in test_rows} & set(train_ids)
    assert all(r["sentence"] == res.captions[r["video_id"]][0] for r in test_rows)
    assert all(r["vid_key"] == "msr" + r["video_id"][5:] for r in test_rows)
    split_of = {v["video_id"]: v["split"] for v in data["videos"]}
    assert all(split_of[r["video_id"]] == "test" for r in test_rows)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = synthesize(tmp_path / "a", seed=7, **SMALL)
    synthesize(tmp_path / "b", seed=7, **SMALL)
    synthesize(tmp_path / "c", seed=8, **SMALL)
    for rel in a.files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "MSRVTT_data.json").read_bytes() != (tmp_path / "c" / "MSRVTT_data.json").read_bytes()


def test_writer_object_receives_the_same_files(tmp_path):
    class Mem:
        def __init__(self):
            self.files = {}

        def write_bytes(self, path, data):
            self.files[path] = data

    mem = Mem()
    res = synthesize(mem, seed=1, **SMALL)
    assert sorted(mem.files) == sorted(res.files)
    assert mem.files["videos/video0.mp4"][4:8] == b"ftyp"


def test_captions_are_true_distinct_and_name_direction_and_order(synth):
    _, res = synth
    for spec in res.specs:
        caps = res.captions[spec.video_id]
        assert len(set(caps)) == 3
        for c in caps:
            words = c.replace(",", "").split()
            assert spec.direction in words
            assert f"{spec.mover_colour} {spec.mover_shape}" in c and f"{spec.other_colour} {spec.other_shape}" in c
            assert set(words) <= (set(COLOURS) | set(SHAPES) | set(DIRECTIONS) |
                                  {"a", "moves", "slides", "goes", "appears", "shows", "up", "then", "first",
                                   "and", "after", "that", "before"})


def test_direction_and_order_change_the_captions_but_direction_not_the_frame_mean():
    spec = sample_spec(np.random.default_rng(0), "v", num_frames=24, size=64, fps=12)
    spec = dataclasses.replace(spec, direction="left", start=(51.2, 20.0), end=(12.8, 20.0), order="move_first",
                               other_pos=(30.0, 46.0))
    right = dataclasses.replace(spec, direction="right", start=spec.end, end=spec.start)
    other_order = dataclasses.replace(spec, order="appear_first")
    from tvr.data.synthetic import captions_for

    def caps(s):
        return captions_for(s, 4, np.random.default_rng(5))

    assert caps(spec) != caps(right)
    assert [c.replace("left", "right") for c in caps(spec)] == caps(right)
    assert caps(spec) != caps(other_order)
    # Mean pooling over frames cannot tell left from right: identical frame means.
    f_left, f_right = render_frames(spec), render_frames(right)
    assert not np.array_equal(f_left, f_right)
    np.testing.assert_allclose(f_left.astype(np.float64).mean(0), f_right.astype(np.float64).mean(0), atol=1e-9)
    # The order of events is visible frame by frame: the other object appears early or late.
    assert other_order.appear_frame < spec.phases[0] <= spec.phases[1] <= spec.appear_frame


def test_clips_vary_over_the_vocabulary():
    specs = [sample_spec(np.random.default_rng([0, i]), f"v{i}", num_frames=24, size=64, fps=12) for i in range(96)]
    assert {s.direction for s in specs} == set(DIRECTIONS)
    assert {s.mover_colour for s in specs} == set(COLOURS) and {s.mover_shape for s in specs} == set(SHAPES)
    assert {s.order for s in specs} == {"move_first", "appear_first"}
    assert all(s.mover_colour != s.other_colour for s in specs)


def test_bad_generator_arguments_are_named():
    with pytest.raises(ValueError, match="size"):
        synthesize("/nonexistent-never-written", num_clips=4, size=33)
    with pytest.raises(ValueError, match="num_clips"):
        synthesize("/nonexistent-never-written", num_clips=2)
