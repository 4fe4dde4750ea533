"""PyAV decoding: sampling indices, keyframe-aware decoding == full decoding, resize/crop,
normalisation, colours and order of the generator's known content, and bad input."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from media import audio_only_mp4
from tvr.data.frames import (
    OPENAI_MEAN,
    OPENAI_STD,
    DecodeError,
    decode_all,
    decode_frames,
    normalize,
    normalize_on_device,
    sample_indices,
)
from tvr.data.synthetic import COLOURS, encode_mp4, render_frames, sample_spec


def _clip(num_frames=36, size=32, seed=0, keyint=None):
    spec = sample_spec(np.random.default_rng(seed), "v", num_frames=num_frames, size=size, fps=12)
    return spec, encode_mp4(render_frames(spec), 12, keyint=keyint)


def _bframes_mp4(frames, gop=10):
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=12)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"preset": "fast", "bf": "3", "threads": "1", "x264-params": f"keyint={gop}:scenecut=0"}
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_uniform_indices_are_segment_middles_and_random_ones_stay_in_their_segment():
    assert sample_indices(24, 8).tolist() == [1, 4, 7, 10, 13, 16, 19, 22]
    assert sample_indices(10, 4).tolist() == [1, 3, 6, 8]   # segments [0,2.5) [2.5,5) [5,7.5) [7.5,10)
    for seed in range(20):
        idx = sample_indices(100, 8, mode="random", rng=np.random.default_rng(seed))
        for k, i in enumerate(idx):
            assert int(np.floor(k * 100 / 8)) <= i < int(np.floor((k + 1) * 100 / 8))
    a = sample_indices(100, 8, mode="random", rng=np.random.default_rng(1))
    b = sample_indices(100, 8, mode="random", rng=np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert sample_indices(3, 5).tolist() == [0, 1, 2, 2, 2]          # short clip: last frame repeated
    with pytest.raises(DecodeError):
        sample_indices(0, 4)


@pytest.mark.parametrize("keyint", [3, 12, 250])
@pytest.mark.parametrize("mode", ["uniform", "random"])
def test_sampled_frames_equal_the_same_frames_of_a_full_decode(keyint, mode):
    _, data = _clip(keyint=keyint)
    ref = decode_all(data)                                               # (36, 32, 32, 3)
    for seed in range(3):
        res = decode_frames(data, 8, mode=mode, rng=np.random.default_rng(seed))
        assert res.method == "index" and not res.warnings
        assert res.frames.shape == (8, 32, 32, 3) and res.frames.dtype == np.uint8
        assert np.array_equal(res.frames, ref[res.indices])
        seq = decode_frames(data, 8, mode=mode, rng=np.random.default_rng(seed), force_sequential=True)
        assert np.array_equal(seq.frames, res.frames) and seq.method == "sequential"


def test_b_frames_and_reordering_decode_exactly():
    spec = sample_spec(np.random.default_rng(4), "v", num_frames=60, size=32, fps=12)
    data = _bframes_mp4(render_frames(spec))
    ref = decode_all(data)
    assert len(ref) == 60
    for seed in range(4):
        res = decode_frames(data, 6, mode="random", rng=np.random.default_rng(seed))
        assert np.array_equal(res.frames, ref[res.indices])


def test_decoded_colours_and_motion_order_match_the_generator():
    spec, data = _clip(num_frames=24, size=64, seed=2)
    res = decode_frames(data, 8)
    mover = np.array(COLOURS[spec.mover_colour], np.int32)
    centres = []
    for t, frame in zip(res.indices, res.frames):
        x, y = spec.mover_position(int(t))
        pix = frame[int(y), int(x)].astype(np.int32)
        assert np.abs(pix - mover).max() <= 40, (t, pix, mover)
        # centroid of the mover's colour: the motion goes the caption's way, frame after frame
        mask = np.abs(frame.astype(np.int32) - mover).max(-1) <= 40
        ys, xs = np.nonzero(mask)
        centres.append((xs.mean(), ys.mean()))
        other = np.array(COLOURS[spec.other_colour], np.int32)
        ox, oy = spec.other_pos
        seen = np.abs(frame[int(oy), int(ox)].astype(np.int32) - other).max() <= 40
        assert seen == spec.other_visible(int(t))
    c = np.array(centres)
    axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[spec.direction]
    steps = np.diff(c[:, axis]) * sign
    assert (steps >= -0.5).all() and steps.sum() > spec.size * 0.4


def test_resize_keeps_aspect_and_centre_crops():
    frames = np.zeros((6, 32, 48, 3), np.uint8)
    frames[:, :, :8] = (255, 0, 0)                    # red band on the left, cropped away
    frames[:, :, 8:40] = (0, 0, 255)                  # blue centre
    frames[:, :, 40:] = (0, 255, 0)                   # green band on the right, cropped away
    res = decode_frames(encode_mp4(frames, 12), 3, size=16)
    assert res.frames.shape == (3, 16, 16, 3)
    blue = res.frames[:, :, 2:14].reshape(-1, 3).astype(int)
    assert (blue[:, 2] > 200).all() and (blue[:, 0] < 60).all() and (blue[:, 1] < 60).all()


def test_normalize_is_clip_normalisation_channels_first():
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    y = normalize(x)
    assert y.shape == (2, 3, 4, 5) and y.dtype == np.float32
    for c in range(3):
        ref = (x[..., c].astype(np.float64) / 255.0 - OPENAI_MEAN[c]) / OPENAI_STD[c]
        np.testing.assert_allclose(y[:, c], ref, atol=1e-5)


def test_uint8_path_normalised_on_device_equals_the_float_path_on_real_clips():
    """The data path ships uint8 frames and normalises them where the model runs: on real MP4
    clips (two backbones' mean/std, a batch with an undecodable row) the result equals the old
    CPU float32 path -- normalize() per clip, all-zero frames for a clip that could not be
    decoded -- to 1e-6 (bit for bit on CPU)."""
    import torch

    clips = [decode_frames(_clip(num_frames=24, size=40, seed=s, keyint=6)[1], 5, size=32, mode=m).frames
             for s, m in [(0, "uniform"), (1, "random"), (2, "uniform")]]       # 3 x (5, 32, 32, 3) uint8
    batch = np.stack([*clips, np.zeros_like(clips[0])])                         # (4, 5, 32, 32, 3)
    valid = np.array([True, True, True, False])
    for mean, std in [(OPENAI_MEAN, OPENAI_STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]:
        old = np.stack([*(normalize(c, mean, std) for c in clips), np.zeros((5, 3, 32, 32), np.float32)])
        new = normalize_on_device(torch.from_numpy(batch), mean, std, valid=torch.from_numpy(valid), device="cpu")
        assert new.dtype == torch.float32 and new.shape == (4, 5, 3, 32, 32) and new.is_contiguous()
        np.testing.assert_allclose(new.numpy(), old, atol=1e-6, rtol=0)
        assert torch.equal(new, torch.from_numpy(old))
        assert torch.count_nonzero(new[3]) == 0                                 # the undecodable row
    one = normalize_on_device(clips[0])                                         # unbatched, no valid
    np.testing.assert_allclose(one.numpy(), normalize(clips[0]), atol=1e-6, rtol=0)
    already = torch.from_numpy(normalize(clips[0]))
    assert normalize_on_device(already) is already                              # floats pass through
    with pytest.raises(ValueError, match="uint8"):
        normalize_on_device(torch.zeros(2, 4, 4, 3, dtype=torch.int32))


def test_short_clip_is_padded_with_its_last_frame():
    _, data = _clip(num_frames=5)
    res = decode_frames(data, 8)
    ref = decode_all(data)
    assert res.padded and res.num_source_frames == 5
    assert res.indices.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    assert np.array_equal(res.frames, ref[[0, 1, 2, 3, 4, 4, 4, 4]])


@pytest.mark.parametrize("case", ["empty", "garbage", "audio_only", "truncated_head"])
def test_undecodable_inputs_raise_decode_error_with_a_reason(case):
    _, good = _clip()
    data = {"empty": b"", "garbage": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
            "audio_only": audio_only_mp4(10) if case == "audio_only" else b"",
            "truncated_head": good[: len(good) // 3]}[case]
    with pytest.raises(DecodeError) as info:
        decode_frames(data, 4, size=16)
    msg = str(info.value)
    if case == "empty":
        assert "empty" in msg
    if case == "audio_only":
        assert "no video stream" in msg and "audio" in msg


def test_damaged_middle_still_gives_t_frames_or_a_clear_error():
    _, good = _clip(num_frames=48, keyint=6)
    data = bytearray(good)
    mid = len(data) // 2
    data[mid:mid + 200] = bytes(200)                   # zero a chunk of the bitstream
    try:
        res = decode_frames(bytes(data), 8, size=16)
    except DecodeError:
        return
    assert res.frames.shape == (8, 16, 16, 3)


# -- decode backends -------------------------------------------------------------------------------

def test_backend_selection_follows_torchcodec_availability(monkeypatch):
    from tvr.data import frames as fr

    monkeypatch.setattr(fr, "_TORCHCODEC", ["ImportError: No module named 'torchcodec'"])
    assert fr.resolve_backend("auto") == "pyav" and fr.resolve_backend("pyav") == "pyav"
    with pytest.raises(ValueError, match="data.decoder=torchcodec but torchcodec is not usable here.*No module"):
        fr.resolve_backend("torchcodec")
    with pytest.raises(ValueError, match="decode backend 'opencv'"):
        fr.resolve_backend("opencv")
    _, data = _clip(keyint=6)
    a, b = decode_frames(data, 5, size=16, backend="auto"), decode_frames(data, 5, size=16)
    assert np.array_equal(a.frames, b.frames)                                   # auto without it: PyAV
    monkeypatch.setattr(fr, "_TORCHCODEC", [None])
    assert fr.resolve_backend("auto") == "torchcodec" and fr.resolve_backend("torchcodec") == "torchcodec"
    # whatever torchcodec cannot do goes to PyAV: a segment, force_sequential, a failure (same offsets)
    calls = []

    def failing(*args, **kwargs):
        calls.append(kwargs)
        kwargs["rng"].integers(0, 10, 5)                                         # consumes offsets, then fails
        raise RuntimeError("torchcodec could not open the stream")

    monkeypatch.setattr(fr, "_decode_torchcodec", failing)
    for kw in ({"segment": (0.0, 1.0)}, {"force_sequential": True}):
        r = decode_frames(data, 5, size=16, backend="torchcodec", rng=np.random.default_rng(0), **kw)
        assert r.frames.shape == (5, 16, 16, 3) and not calls
    r = decode_frames(data, 5, size=16, backend="torchcodec", mode="random", rng=np.random.default_rng(7))
    ref = decode_frames(data, 5, size=16, mode="random", rng=np.random.default_rng(7))
    assert len(calls) == 1 and np.array_equal(r.indices, ref.indices) and np.array_equal(r.frames, ref.frames)
    with pytest.raises(DecodeError, match="not a readable media file"):
        decode_frames(b"garbage" * 100, 5, backend="torchcodec")                # PyAV's error and reason


@pytest.mark.skipif(not __import__("tvr.data.frames", fromlist=["x"]).torchcodec_available(),
                    reason="torchcodec or FFmpeg's shared libraries not importable here")
@pytest.mark.parametrize("keyint", [6, None])
def test_torchcodec_backend_samples_the_same_frames_as_pyav(keyint):
    """Real clips: the torchcodec backend picks the same frame indices (uniform and seeded random)
    and, at native size, exactly PyAV's pixels; resized + cropped within a few levels of PyAV's
    swscale bicubic; padding of short clips is the same."""
    _, data = _clip(num_frames=36, size=40, keyint=keyint)
    for mode in ("uniform", "random"):
        tc = decode_frames(data, 7, mode=mode, rng=np.random.default_rng(3), backend="torchcodec")
        av_ = decode_frames(data, 7, mode=mode, rng=np.random.default_rng(3))
        assert np.array_equal(tc.indices, av_.indices) and tc.num_source_frames == av_.num_source_frames == 36
        assert tc.frames.dtype == np.uint8 and np.array_equal(tc.frames, av_.frames)
        assert np.array_equal(tc.frames, decode_all(data)[tc.indices])
    tc = decode_frames(data, 7, size=32, backend="torchcodec")
    av_ = decode_frames(data, 7, size=32)
    assert tc.frames.shape == av_.frames.shape == (7, 32, 32, 3)
    assert np.abs(tc.frames.astype(int) - av_.frames.astype(int)).mean() < 3.0
    _, short = _clip(num_frames=5)
    tc, av_ = decode_frames(short, 8, backend="torchcodec"), decode_frames(short, 8)
    assert tc.padded and tc.indices.tolist() == av_.indices.tolist() and np.array_equal(tc.frames, av_.frames)
