"""Model-FLOPs accounting behind the MFU metric, against a hand count on a tiny open_clip model."""

from __future__ import annotations

import pytest
import torch

from tvr.backbone import BackboneCfg, ClipBackbone
from tvr_platform.train.perf import measure_peak_flops, mfu, tower_shapes, train_flops_per_clip


def _hand_forward_flops(width: int, layers: int, tokens: int, params: int) -> float:
    # per layer: qkv (3w^2) + out proj (w^2) + MLP (2 * 4 w^2) = 12 w^2 weights, 2 FLOPs per MAC;
    # attention: QK^T and AV, each s^2 w MACs.
    matmul = 2.0 * tokens * 12 * width**2 * layers
    attention = 2.0 * 2 * tokens**2 * width * layers
    return matmul, attention


def test_flops_match_a_hand_count_of_the_transformer_matmuls():
    clip = ClipBackbone(BackboneCfg(name="tvr-tiny")).clip
    vision, text = tower_shapes(clip)
    v = clip.visual
    assert vision.tokens == (v.image_size[0] // v.patch_size[0]) ** 2 + 1
    assert vision.layers == len(v.transformer.resblocks) and text.tokens == clip.context_length
    for tower in (vision, text):
        matmul, attention = _hand_forward_flops(tower.width, tower.layers, tower.tokens, tower.params)
        # the block weights dominate the tower's parameters; embeddings/norms/projections add a little
        assert matmul <= 2.0 * tower.params * tower.tokens < 1.6 * matmul
        assert tower.forward_flops() - 2.0 * tower.params * tower.tokens == pytest.approx(attention)
    assert train_flops_per_clip(clip, 4) == pytest.approx(3 * (4 * vision.forward_flops() + text.forward_flops()))


def test_mfu_and_measured_peak():
    peak = measure_peak_flops(torch.device("cpu"), torch.float32)
    assert peak > 1e6
    assert mfu(10.0, 1e9, 1e11) == pytest.approx(0.1) and mfu(10.0, 1e9, 0.0) == 0.0
