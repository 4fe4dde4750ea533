"""meanP is CLIP4Clip's: v = norm(mean_t(f_t / ‖f_t‖)), checked in float64 against an independent form."""

from __future__ import annotations

import torch

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr.methods.meanp import MeanP, MeanPCfg


def test_video_feature_is_normalise_mean_normalise_in_float64():
    torch.manual_seed(0)
    model = MeanP(MeanPCfg(), ClipBackbone(BackboneCfg(name="tvr-tiny"))).double().eval()
    frames = torch.rand(3, 5, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        cls, _ = model.backbone.encode_frames(frames)                    # (3, 5, D)
        # frame norms differ a lot so the raw mean and CLIP4Clip's form disagree
        scale = torch.tensor([1.0, 7.0, 0.2, 3.0, 0.5], dtype=torch.float64)
        model.backbone.encode_frames = lambda f, patches=False: (cls * scale[None, :, None], None)
        v = model.encode_video(frames)["video"]
    f = (cls * scale[None, :, None]).numpy()
    unit = f / ((f ** 2).sum(-1, keepdims=True) ** 0.5)
    mean = unit.mean(axis=1)
    ref = mean / ((mean ** 2).sum(-1, keepdims=True) ** 0.5)             # CLIP4Clip _loose_similarity
    assert torch.allclose(v, torch.from_numpy(ref), rtol=0, atol=1e-12)
    raw = f.mean(axis=1)
    raw = raw / ((raw ** 2).sum(-1, keepdims=True) ** 0.5)
    assert abs(ref - raw).max() > 1e-3                                   # the test can tell them apart
    text = {"text": torch.randn(4, cls.shape[-1], dtype=torch.float64)}
    t = text["text"].numpy() / ((text["text"].numpy() ** 2).sum(-1, keepdims=True) ** 0.5)
    assert torch.allclose(model.similarity(text, {"video": v}), torch.from_numpy(t @ ref.T), atol=1e-12)
