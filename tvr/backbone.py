"""One wrapper over open_clip ViT models, shared by every method.

For a batch of clips ``frames`` of shape (B, T, 3, H, W) and captions ``text`` of token ids (B, L)
it returns, all in CLIP's joint embedding space (dimension D = ``embed_dim``):

- per-frame CLS features   (B, T, D)
- per-frame patch tokens   (B, T, P, D)       on request (``patches=True``)
- the sentence feature     (B, D)             CLIP's EOS ("argmax") token after ``text_projection``
- word tokens              (B, L, D)          every position projected the same way, with
- the padding mask         (B, L) bool        True at real tokens (SOT .. EOS), False at padding.

Model names are any open_clip model (``ViT-B-32`` ... ``ViT-bigG-14``) plus the tiny random-init
configs shipped in ``tvr/model_configs`` (``tvr-tiny``, ``tvr-small``) for tests and the quickstart.
``pretrained`` is an open_clip tag (downloaded by open_clip where a network exists) or a local
checkpoint file; ``s3://`` checkpoints are fetched to a local file by the platform before this runs.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

TVR_MODEL_CONFIGS = Path(__file__).parent / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in TVR_MODEL_CONFIGS.glob("*.json")))


@dataclass(kw_only=True)
class BackboneCfg:
    name: str = "tvr-tiny"
    """open_clip model name (ViT-B-32, ViT-L-14, ViT-bigG-14, ...) or a tvr tiny config."""
    pretrained: str | None = None
    """open_clip pretrained tag, a local checkpoint path, or an s3:// URI; None = random init."""
    grad_checkpointing: bool = False
    """Activation checkpointing in both towers (open_clip's set_grad_checkpointing)."""


def register_tvr_model_configs() -> None:
    """Make tvr's tiny configs known to open_clip (idempotent, called lazily, never at import)."""
    if not set(TINY_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(TVR_MODEL_CONFIGS)


def get_tokenizer(name: str):
    """open_clip's tokenizer for model ``name`` (tvr tiny configs included): list[str] -> (N, L)."""
    register_tvr_model_configs()
    return open_clip.get_tokenizer(name)


def create_clip(name: str, pretrained: str | None = None) -> nn.Module:
    """Build an open_clip CLIP model. No network access unless ``pretrained`` is a remote tag."""
    register_tvr_model_configs()
    if name not in open_clip.list_models():
        raise ValueError(
            f"model.backbone.name={name!r} is not an open_clip model; choose one of "
            f"{', '.join(m for m in open_clip.list_models() if m.startswith('ViT'))[:400]}... "
            f"or a tvr test config {TINY_MODELS}"
        )
    if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"model.backbone.pretrained: checkpoint file {pretrained} does not exist")
    return open_clip.create_model(name, pretrained=pretrained or None)


class ClipBackbone(nn.Module):
    """open_clip CLIP model with per-frame, per-patch and per-word outputs."""

    def __init__(self, cfg: BackboneCfg, model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.clip = model if model is not None else create_clip(cfg.name, cfg.pretrained)
        if not hasattr(self.clip, "visual") or not hasattr(self.clip.visual, "transformer"):
            raise ValueError(f"model.backbone.name={cfg.name!r}: tvr supports open_clip ViT models only")
        if cfg.grad_checkpointing:
            self.clip.set_grad_checkpointing(True)
        self.tokenizer = get_tokenizer(cfg.name)

    # -- static facts ---------------------------------------------------------------------------
    @property
    def text_tower(self) -> nn.Module:
        """The module holding token_embedding .. text_projection (CLIP itself, or CustomTextCLIP.text)."""
        return getattr(self.clip, "text", self.clip)

    @property
    def embed_dim(self) -> int:
        proj = self.text_tower.text_projection
        return int(proj.out_features) if isinstance(proj, nn.Linear) else int(proj.shape[1])

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    @property
    def context_length(self) -> int:
        return int(self.text_tower.context_length)

    @property
    def image_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (tuple(self.clip.visual.image_mean or open_clip.OPENAI_DATASET_MEAN),
                tuple(self.clip.visual.image_std or open_clip.OPENAI_DATASET_STD))

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def tokenize(self, texts: list[str]) -> Tensor:
        """(N,) strings -> (N, L) token ids (padded with 0, truncated with EOS kept)."""
        return self.tokenizer(texts)

    # -- video tower ----------------------------------------------------------------------------
    def encode_frames(self, frames: Tensor, patches: bool = False) -> tuple[Tensor, Tensor | None]:
        """frames (B, T, 3, H, W) -> CLS (B, T, D) and, if asked, patch tokens (B, T, P, D)."""
        B, T = frames.shape[:2]
        images = frames.flatten(0, 1)                                    # (B*T, 3, H, W)
        visual = self.clip.visual
        if not patches:
            cls = self.clip.encode_image(images)                         # (B*T, D)
            return cls.view(B, T, -1), None
        visual.output_tokens = True
        try:
            cls, tokens = visual(images)                                 # (B*T, D), (B*T, P, width)
        finally:
            visual.output_tokens = False
        if visual.proj is not None:
            tokens = tokens @ visual.proj                                # (B*T, P, D)
        return cls.view(B, T, -1), tokens.view(B, T, tokens.shape[1], -1)

    # -- text tower -----------------------------------------------------------------------------
    def encode_text(self, text: Tensor, tokens: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        """text ids (B, L) -> sentence (B, D), word tokens (B, L, D) or None, mask (B, L) bool.

        The sentence feature is open_clip's own ``encode_text`` (EOS pooling); word tokens are
        the same final-layer states after ``ln_final`` and ``text_projection``.
        """
        mask = text != 0                                                 # (B, L)
        if not tokens:
            return self.clip.encode_text(text), None, mask
        states = self.text_states(text)                                  # (B, L, width)
        words = self.project_text(states)                                # (B, L, D)
        eos = words[torch.arange(text.shape[0], device=text.device), text.argmax(dim=-1)]
        return eos, words, mask

    def text_states(self, text: Tensor) -> Tensor:
        """Final-layer text states after ``ln_final``: (B, L) ids -> (B, L, width)."""
        c = self.text_tower
        cast_dtype = c.transformer.get_cast_dtype()
        x = c.token_embedding(text).to(cast_dtype)                       # (B, L, width)
        x = x + c.positional_embedding.to(cast_dtype)
        x = c.transformer(x, attn_mask=c.attn_mask)
        return c.ln_final(x)

    def project_text(self, states: Tensor) -> Tensor:
        proj = self.text_tower.text_projection
        return proj(states) if isinstance(proj, nn.Linear) else states @ proj


def set_trainable(module: nn.Module, patterns: list[str], trainable: bool) -> list[str]:
    """Freeze or unfreeze every parameter whose name matches one of the glob ``patterns``.

    Returns the matched names, so callers can check that a pattern matched something.
    """
    matched = [n for n, _ in module.named_parameters() if any(fnmatch.fnmatch(n, p) for p in patterns)]
    for name, p in module.named_parameters():
        if name in matched:
            p.requires_grad_(trainable)
    return matched
