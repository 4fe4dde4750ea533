"""CLIP4Clip's ``seqTransf`` temporal encoder over per-frame features.

    x = f + P_t                       f: (B, T, D) frame features, P_t: learned frame positions
    y = Transformer(x, mask) + f      residual to the CLIP features (CLIP4Clip, eq. of "seqTransf")

Zero-initialised output projection keeps y == f at initialisation, so adding the encoder never
hurts a pretrained backbone at step 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TemporalEncoder(nn.Module):
    def __init__(self, *, dim: int, num_frames: int = 64, layers: int = 4, heads: int | None = None):
        super().__init__()
        heads = heads or max(1, dim // 64)
        self.position = nn.Parameter(torch.zeros(num_frames, dim))
        nn.init.normal_(self.position, std=0.01)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 4, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, frames: Tensor, mask: Tensor | None = None) -> Tensor:
        """frames (B, T, D), mask (B, T) True at real frames -> (B, T, D)."""
        T = frames.shape[1]
        if T > self.position.shape[0]:
            raise ValueError(f"TemporalEncoder supports at most {self.position.shape[0]} frames, got {T}")
        x = frames + self.position[:T]                                   # (B, T, D)
        pad = None if mask is None else ~mask
        return frames + self.out(self.transformer(x, src_key_padding_mask=pad))
