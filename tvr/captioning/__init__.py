"""ExCae caption self-improvement (CSI), plain PyTorch: interfaces, the prompt score, the loop
(Algorithm 1), offline backends (retrieval captioner, rule-based prompt engineer), semantic
extractors ψ and untrusted-text hygiene. The platform adds LLM backends, MLflow and Ray Data
(``tvr_platform.captions``). See :mod:`tvr.captioning.core` for the equations."""

from tvr.captioning.core import (
    PAPER_INITIAL_PROMPT,
    Candidate,
    Captioner,
    CSIResult,
    Example,
    PromptEngineer,
    PromptScore,
    RoundReport,
    SemanticExtractor,
    VideoSample,
    caption_samples,
    initial_prompt,
    pair_mean_offdiag,
    score_captions,
    self_improve,
)
from tvr.captioning.extractors import ClipTextExtractor, SentenceTransformerExtractor, make_extractor
from tvr.captioning.offline import RetrievalCaptioner, RuleBasedPromptEngineer, parse_directives
from tvr.captioning.text import clean_caption, clean_prompt, count_tokens, parse_caption_list, truncate_tokens

__all__ = [
    "PAPER_INITIAL_PROMPT", "CSIResult", "Candidate", "Captioner", "ClipTextExtractor", "Example",
    "PromptEngineer", "PromptScore", "RetrievalCaptioner", "RoundReport", "RuleBasedPromptEngineer",
    "SemanticExtractor", "SentenceTransformerExtractor", "VideoSample", "caption_samples", "clean_caption",
    "clean_prompt", "count_tokens", "initial_prompt", "make_extractor", "pair_mean_offdiag",
    "parse_caption_list", "parse_directives", "score_captions", "self_improve", "truncate_tokens",
]
