"""Throughput accounting for the training loop: model FLOPs per clip, measured peak, MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / peak FLOP/s, where the
model FLOPs of one training sample are 3x its forward FLOPs (backward = 2x forward) and do not
count activation recomputation. The forward FLOPs of a pre-LN transformer tower with L layers,
width w, s tokens and P parameters are approximately

    F_fwd = 2 * P_matmul * s  +  4 * L * s^2 * w        (matmuls + attention scores/values)

and one clip is T frames through the vision tower plus one caption through the text tower.
The peak is *measured* (a large bf16 matmul on the device), not taken from a data sheet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TowerShape:
    params: int
    """Parameters of the tower's linear layers (all parameters minus embeddings is close enough)."""
    layers: int
    width: int
    tokens: int

    def forward_flops(self) -> float:
        return 2.0 * self.params * self.tokens + 4.0 * self.layers * self.tokens**2 * self.width


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))                          # ZeRO-3 partitions params


def tower_shapes(clip: nn.Module) -> tuple[TowerShape, TowerShape]:
    """(vision, text) tower shapes of an open_clip CLIP model (meta-device models work too)."""
    visual = clip.visual
    grid = visual.grid_size if hasattr(visual, "grid_size") else (visual.image_size // visual.patch_size,) * 2
    v_tokens = int(grid[0] * grid[1]) + 1                                   # patches + CLS
    v_params = sum(_numel(p) for p in visual.parameters())
    text = getattr(clip, "text", clip)
    t_params = sum(_numel(p) for n, p in text.named_parameters()
                   if not n.startswith(("visual.", "token_embedding", "positional_embedding")))
    return (TowerShape(v_params, len(visual.transformer.resblocks), visual.transformer.width, v_tokens),
            TowerShape(t_params, len(text.transformer.resblocks), text.transformer.width,
                       int(text.context_length)))


def train_flops_per_clip(clip: nn.Module, num_frames: int) -> float:
    """Model FLOPs of one training sample (T frames + one caption), forward + backward."""
    vision, text = tower_shapes(clip)
    return 3.0 * (num_frames * vision.forward_flops() + text.forward_flops())


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                       repeats: int = 20) -> float:
    """Achievable matmul FLOP/s of ``device`` in ``dtype`` (the MFU denominator)."""
    if device.type != "cuda":
        n, repeats = min(n, 512), min(repeats, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b                                                                   # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2.0 * n**3 * repeats / (time.perf_counter() - start)


def mfu(clips_per_s_per_device: float, flops_per_clip: float, peak_flops: float) -> float:
    return clips_per_s_per_device * flops_per_clip / peak_flops if peak_flops > 0 else 0.0
