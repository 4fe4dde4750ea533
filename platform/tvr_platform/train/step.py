"""The one ``nn.Module`` the training strategies wrap (DDP / DeepSpeed engine).

Every use of the method's parameters goes through ``forward`` — training loss, text and video
embedding, and similarity blocks — because DDP's gradient hooks and DeepSpeed ZeRO-3's parameter
gathering only act inside the wrapped module's forward.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from tvr.losses import gather_features
from tvr.methods.base import Features, prepare_video


class RetrievalStep(nn.Module):
    def __init__(self, method: nn.Module, gather: Callable[[Tensor], Tensor]):
        super().__init__()
        self.method = method
        self.gather = gather

    def _cast(self, x: Tensor) -> Tensor:
        # DeepSpeed bf16 keeps params in bf16 but does not cast inputs.
        dtype = next(self.method.parameters()).dtype
        return x.to(dtype) if x.is_floating_point() else x

    def forward(self, mode: str = "loss", *, frames: Tensor | None = None, text: Tensor | None = None,
                captions: Tensor | None = None, text_feats: Features | None = None,
                video_feats: Features | None = None):
        """mode 'loss': frames (B,T,3,H,W) + text (B,L) -> loss dict over the global batch;
        'text' -> text features; 'video' -> video features; 'similarity' -> (N_t, N_v) block;
        'prepare_video' -> video features with the method's text-independent tensors added."""
        if mode == "loss":
            t = self.method.encode_text(text)
            v = self.method.encode_video(self._cast(frames), captions)
            return self.method.loss(gather_features(t, self.gather), gather_features(v, self.gather))
        if mode == "text":
            return self.method.encode_text(text)
        if mode == "video":
            return self.method.encode_video(self._cast(frames), captions)
        if mode == "similarity":
            return self.method.similarity(text_feats, video_feats)
        if mode == "prepare_video":
            return prepare_video(self.method, video_feats)
        raise ValueError(f"RetrievalStep: unknown mode {mode!r} (loss | text | video | similarity | prepare_video)")
