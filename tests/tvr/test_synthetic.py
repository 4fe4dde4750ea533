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


# -- static / mixed caption modes (tvr pretrain, tvr bench methods) ---------------------------------

def test_static_mode_clips_show_both_objects_on_every_frame_and_say_only_what_a_frame_shows(tmp_path):
    from tvr.data.synthetic import BACKGROUNDS, CAPTION_TYPES_FILE

    res = synthesize(tmp_path, seed=2, captions="static", **SMALL)
    assert json.loads((tmp_path / CAPTION_TYPES_FILE).read_text()) == {v: ["static"] * 3 for v in res.captions}
    for spec in res.specs:
        frames = render_frames(spec)
        assert spec.event == "stays" and all(spec.other_visible(t) for t in range(spec.num_frames))
        bg = np.array(BACKGROUNDS[spec.background], dtype=np.uint8)
        assert (frames[:, 0, 0] == bg).all()                               # the corner shows the background
        for c in res.captions[spec.video_id]:
            words = set(c.replace(",", "").split())
            assert {spec.background, spec.size_word, spec.mover_colour, spec.other_colour} <= words
            assert not words & (set(DIRECTIONS) | {"moves", "appears", "then", "before", "after"})
    assert {s.size_word for s in res.specs} <= {"small", "large"}


def test_mixed_mode_tags_every_caption_and_keeps_time_reversed_twins_in_one_split(tmp_path):
    from tvr.data.synthetic import CAPTION_TYPES_FILE, mirror_spec

    res = synthesize(tmp_path, seed=4, captions="mixed", num_clips=12, test_fraction=0.34, captions_per_clip=4,
                     seconds=1.0, fps=12, size=32)
    types = json.loads((tmp_path / CAPTION_TYPES_FILE).read_text())
    assert types == res.caption_types and all(t == ["temporal", "static", "temporal", "static"] for t in types.values())
    for a, b in zip(res.specs[::2], res.specs[1::2], strict=True):
        assert b == mirror_spec(a, video_id=b.video_id, background=b.background) and a.background != b.background
        assert (a.video_id in res.splits["test"]) == (b.video_id in res.splits["test"])
        for spec in (a, b):
            for c, t in zip(res.captions[spec.video_id], types[spec.video_id], strict=True):
                words = set(c.replace(",", "").split())
                assert (spec.direction in words) == (t == "temporal")         # motion only in temporal ones
                assert (spec.background in words) == (t == "static")
    assert len(res.splits["test"]) == 4 and {s.event for s in res.specs} == {"appears", "disappears"}


def test_a_permutation_invariant_pooled_video_is_identical_for_clips_whose_temporal_captions_differ():
    """Why a frame-average baseline cannot answer temporal queries: a clip and its time reversal
    (``mirror_spec``) have the same frames in reverse order, so mean pooling of any per-frame
    encoder (here a random tiny CLIP, and raw pixels) gives the same video, while every temporal
    caption of one is false of the other; their static captions are the same."""
    import torch

    from tvr.backbone import BackboneCfg, ClipBackbone
    from tvr.data.synthetic import mirror_spec, static_captions, temporal_captions

    spec = sample_spec(np.random.default_rng(11), "v", num_frames=12, size=32, fps=12, mode="mixed")
    twin = mirror_spec(spec)
    f_a, f_b = render_frames(spec), render_frames(twin)
    assert not np.array_equal(f_a, f_b) and np.array_equal(f_a[::-1], f_b)
    assert set(temporal_captions(spec)).isdisjoint(temporal_captions(twin))
    assert static_captions(spec) == static_captions(twin)
    torch.manual_seed(0)
    backbone = ClipBackbone(BackboneCfg(name="tvr-tiny")).eval().double()

    def pooled(frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).double()[None] / 255.0        # (1, T, 3, S, S)
        with torch.no_grad():
            cls, _ = backbone.encode_frames(x)                                          # (1, T, D)
        return cls.mean(dim=1)

    torch.testing.assert_close(pooled(f_a), pooled(f_b), rtol=1e-12, atol=1e-12)
    # ...but the per-frame sequence differs: an order-aware model can tell them apart.
    with torch.no_grad():
        seq = [backbone.encode_frames(torch.from_numpy(f).permute(0, 3, 1, 2).double()[None] / 255.0)[0] for f in (f_a, f_b)]
    assert (seq[0] - seq[1]).abs().max() > 1e-3


def test_bad_caption_mode_is_named():
    with pytest.raises(ValueError, match="data.synth.captions"):
        synthesize("/nonexistent-never-written", num_clips=4, captions="dynamic")
