"""The ``captions`` section of a job spec (ExCae CSI and ``tvr captions generate``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class CaptionsCfg:
    backend: str = "retrieval"
    """Captioner backend: 'retrieval' (offline default) or 'openai' (OpenAI-compatible endpoint)."""
    captions_per_video: int = 10
    """K captions per video."""
