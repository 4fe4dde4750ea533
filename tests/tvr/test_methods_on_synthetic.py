"""Every method of the table, a few Adam steps on real decoded synthetic clips: the loss falls.

The clips are the generator's MP4s decoded by the same PyAV sampler as the platform, so this checks
the methods against the data they will see, not against random tensors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.data.frames import decode_frames, normalize
from tvr.data.synthetic import synthesize
from tvr.methods import METHODS, build_method

FRAMES = 4
CASES = [("meanp", {}), ("xpool", {}), ("tmass", {}), ("ucofia", {}),
         ("vop", {"variant": "P"}), ("vop", {"variant": "C"}), ("vop", {"variant": "F"}), ("vop", {"variant": "full"}),
         ("excae", {})]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, num_clips=12, seconds=1.0, size=32, seed=3)
    data = json.loads((out / "MSRVTT_data.json").read_text())
    first = {}
    for s in data["sentences"]:
        first.setdefault(s["video_id"], s["caption"])
    ids = sorted(first)
    frames = torch.stack([torch.from_numpy(normalize(
        decode_frames((out / "videos" / f"{v}.mp4").read_bytes(), FRAMES, size=32).frames)) for v in ids])
    return frames, [first[v] for v in ids]                               # (12, T, 3, 32, 32), 12 captions


def _cfg(name: str, knobs: dict):
    cls = METHODS[name].config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    extra = {"num_frames": FRAMES} if "num_frames" in names else {}
    if "sinkhorn_iters" in knobs and "sinkhorn_iters" not in names:
        pytest.skip(f"{name} has no sinkhorn_iters knob")
    return cls(**knobs, **extra)


@pytest.mark.parametrize("name, knobs", CASES, ids=[f"{n}-{'-'.join(map(str, k.values())) or 'default'}"
                                                    for n, k in CASES])
def test_a_few_steps_on_decoded_synthetic_clips_lower_the_loss(clips, name, knobs):
    frames, captions = clips
    torch.manual_seed(0)
    method = build_method(name, _cfg(name, knobs), ClipBackbone(BackboneCfg(name="tvr-tiny")))
    text = method.backbone.tokenize(captions)
    opt = torch.optim.AdamW([p for g in method.param_groups(3e-3, 1e-4, 0.0) for p in g["params"]])

    def loss() -> torch.Tensor:
        return method.loss(method.encode_text(text), method.encode_video(frames))["loss"]

    method.eval()                                                        # no dropout: comparable losses
    with torch.no_grad():
        before = float(loss())
    for _ in range(8):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = float(loss())
    assert after < before - 0.05, (name, knobs, before, after)
