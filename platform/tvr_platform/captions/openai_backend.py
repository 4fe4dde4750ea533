"""OpenAI-compatible chat-completions backends (images in, text out) for the ExCae captioner and
prompt engineer, on the maintained ``openai`` client (``base_url`` points it at any compatible
server: OpenAI, vLLM, SGLang, Ollama, LiteLLM, ...).

Secrets. The key is read from the environment variable named by ``captions.api_key_env`` when a
client is built, handed to the ``openai`` client and nowhere else: it is not stored in any config,
MLflow param, artifact or log line, and every message this module composes (errors included) is
passed through :func:`redact` first, in case a server echoes the key back. Ray workers of the
corpus job may not share the driver's environment, so the driver reads the key once and ships it
to them wrapped in :class:`Secret` (it prints as ``***``; it is never a runtime-env variable,
which Ray's runtime-env agent would write to its log).

Untrusted output. A reply is only data: it is parsed by :func:`tvr.captioning.text.parse_caption_list`
/ :func:`~tvr.captioning.text.clean_prompt` (control characters stripped, lengths capped, captions
<= ``max_caption_tokens`` CLIP tokens), never executed, never used as a format string. A reply
that yields nothing usable is *malformed*: retried, and after ``max_retries`` the item is skipped
and counted (``Usage.malformed`` / ``Usage.failed``).

Retries. 429, 5xx, timeouts and connection errors are retried up to ``max_retries`` times with
exponential backoff and jitter, delay_n = min(backoff_max, backoff_base · 2^n) · U[0.5, 1]; a
``Retry-After`` header (seconds) wins when it is larger. The ``openai`` client's own retries are
switched off (``max_retries=0``) so this policy, the counters and the budget see every attempt.
Other 4xx (bad key, bad model, bad request) fail at once with an :class:`LLMError`.

Budget. Every reply's ``usage`` is charged to a :class:`Budget` (tokens and cost); once it is
spent, :class:`BudgetExhausted` stops new requests (in-flight ones may overshoot by at most one
request per worker / thread in flight).

Concurrency. :class:`OpenAICaptioner` sends the requests of a batch of videos from
``requests_in_flight`` threads at once (one HTTP connection pool, thread-safe counters), and a
shared :class:`RateLimiter` spaces request starts to at most ``requests_per_minute``
(retries included). :class:`Progress` logs videos done / total, tokens, cost and an ETA.

Resume. A :class:`ReplyCache` (``<captions>/csi/replies/*.jsonl`` for ``tvr captions improve``)
keeps every *validated* reply under the SHA-256 of its request (model, messages with the images,
temperature, token cap); a rerun after an interruption reads it back and re-validates it instead
of paying for the request again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
from torch import Tensor

from tvr.captioning.core import Candidate, Example
from tvr.captioning.text import MAX_CAPTION_TOKENS, clean_prompt, clean_text, parse_caption_list

log = logging.getLogger(__name__)
T = TypeVar("T")

CAPTIONER_SYSTEM = ("You write captions of videos for a text-video retrieval index. You are shown frames of "
                    "one video in temporal order. Follow the user's instructions.")
ENGINEER_SYSTEM = ("You are a prompt engineer. You improve an instruction prompt that asks a multimodal "
                   "model to write captions of a video. The captions are scored by their semantic "
                   "similarity to human descriptions of the same video plus their mutual diversity.")


class LLMError(RuntimeError):
    """A chat endpoint cannot be used (missing key, 4xx, retries exhausted); the key is never in it."""


class BudgetExhausted(LLMError):
    """The job's token / cost budget is spent."""


class Secret:
    """A string that never prints (``repr`` / ``str`` give ``Secret(***)``); ``reveal()`` returns it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


def read_api_key(api_key_env: str, base_url: str) -> Secret:
    """The key from environment variable ``api_key_env``; a clear :class:`LLMError` when unset."""
    key = os.environ.get(api_key_env, "")
    if not key:
        raise LLMError(f"no API key: set the environment variable {api_key_env} "
                       f"(named by captions.api_key_env) for {base_url}")
    return Secret(key)


def redact(text: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


# -- budget --------------------------------------------------------------------------------------

class Budget(Protocol):
    def spend(self, prompt_tokens: int, completion_tokens: int) -> None: ...

    def exhausted(self) -> bool: ...


@dataclass
class BudgetState:
    token_budget: int = 0
    cost_budget: float = 0.0
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def cost(self) -> float:
        return (self.prompt_tokens * self.price_input_per_mtok
                + self.completion_tokens * self.price_output_per_mtok) / 1e6

    def spend(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += max(int(prompt_tokens), 0)
        self.completion_tokens += max(int(completion_tokens), 0)

    def exhausted(self) -> bool:
        over_tokens = self.token_budget > 0 and self.prompt_tokens + self.completion_tokens >= self.token_budget
        over_cost = self.cost_budget > 0 and self.cost >= self.cost_budget
        return over_tokens or over_cost

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "cost": self.cost}


class LocalBudget(BudgetState):
    """A thread-safe in-process budget."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._lock = threading.Lock()

    def spend(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            super().spend(prompt_tokens, completion_tokens)


def budget_from_cfg(cfg: Any) -> LocalBudget:
    return LocalBudget(token_budget=cfg.token_budget, cost_budget=cfg.cost_budget,
                       price_input_per_mtok=cfg.price_input_per_mtok,
                       price_output_per_mtok=cfg.price_output_per_mtok)


# -- the client ----------------------------------------------------------------------------------

@dataclass
class Usage:
    requests: int = 0
    retries: int = 0
    malformed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class RateLimiter:
    """At most ``per_minute`` request starts per minute, evenly spaced (one every 60 / per_minute
    seconds), shared by every thread that calls :meth:`wait`; 0 = no limit."""

    def __init__(self, per_minute: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> float:
        """Block until this request may start; returns the seconds waited."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        delay = start - now
        if delay > 0:
            self.sleep(delay)
        return delay


class ReplyCache:
    """Validated replies keyed by the SHA-256 of their request, persisted as JSONL parts in a
    :mod:`tvr_platform.storage` folder (``replies/<uuid>.jsonl``); a rerun loads every part.

    Entries are untrusted text like any reply: the caller validates them again on reuse."""

    FOLDER = "replies"

    def __init__(self, store: Any | None = None):
        self.store = store
        self._mem: dict[str, str] = {}
        self._pending: list[dict[str, str]] = []
        self._lock = threading.Lock()
        if store is not None:
            for rel in store.list(self.FOLDER):
                if not rel.endswith(".jsonl"):
                    continue
                for line in store.read_text(rel).splitlines():
                    try:
                        row = json.loads(line)
                        if isinstance(row.get("key"), str) and isinstance(row.get("text"), str):
                            self._mem[row["key"]] = row["text"]
                    except (json.JSONDecodeError, AttributeError):
                        log.warning("skipping a damaged line of the reply cache %s", store.url(rel))

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=True).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self._mem)

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._mem.get(key)

    def put(self, key: str, text: str) -> None:
        with self._lock:
            if key not in self._mem:
                self._mem[key] = text
                self._pending.append({"key": key, "text": text})

    def flush(self) -> None:
        """Write the replies added since the last flush as one part (atomic per part)."""
        import uuid

        with self._lock:
            rows, self._pending = self._pending, []
        if rows and self.store is not None:
            data = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows).encode()
            self.store.write_bytes(f"{self.FOLDER}/{uuid.uuid4().hex}.jsonl", data)


class Progress:
    """Videos done / total, spend and an ETA, logged at most every ``every_s`` seconds (and at the end)."""

    def __init__(self, total: int, *, label: str = "captions", budget: Any = None, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] | None = None):
        self.total, self.label, self.budget, self.every_s, self.clock = total, label, budget, every_s, clock
        self.emit = emit or log.info
        self.done = 0
        self.start = clock()
        self._last = -float("inf")
        self._lock = threading.Lock()

    def spend(self) -> dict[str, float]:
        b = self.budget
        if b is None:
            return {}
        state = b() if callable(b) else b.to_dict()
        return {"tokens": state["prompt_tokens"] + state["completion_tokens"], "cost": state["cost"]}

    def eta_s(self) -> float | None:
        elapsed = self.clock() - self.start
        if self.done == 0 or elapsed <= 0:
            return None
        return (self.total - self.done) * elapsed / self.done

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.label}: {self.done}/{self.total} videos ({pct:.0f}%)"]
        sp = self.spend()
        if sp:
            parts.append(f"{int(sp['tokens'])} tokens, cost {sp['cost']:.4f}")
        eta = self.eta_s()
        parts.append("ETA " + ("?" if eta is None else f"{eta:.0f}s"))
        return ", ".join(parts)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = self.clock()
            due = now - self._last >= self.every_s or self.done >= self.total
            if due:
                self._last = now
        if due:
            self.emit(self.line())


class ChatClient:
    """chat.completions with retry/backoff, reply validation, usage accounting and a budget."""

    def __init__(self, *, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 4, backoff_base: float = 1.0,
                 backoff_max: float = 30.0, temperature: float = 0.7, max_completion_tokens: int = 1024,
                 budget: Budget | None = None, sleep: Callable[[float], None] = time.sleep,
                 api_key: Secret | None = None, rate_limiter: RateLimiter | None = None,
                 cache: ReplyCache | None = None):
        key = (api_key or read_api_key(api_key_env, base_url)).reveal()
        try:
            import openai
        except ImportError:
            raise LLMError("the OpenAI-compatible backend needs the openai package: pip install 'openai>=3.54,<4'") \
                from None
        self._openai = openai
        self._secrets = [key]
        self._client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout)
        self.base_url, self.model = base_url, model
        self.max_retries, self.backoff_base, self.backoff_max = max_retries, backoff_base, backoff_max
        self.temperature, self.max_completion_tokens = temperature, max_completion_tokens
        self.budget, self.sleep = budget, sleep
        self.rate_limiter, self.cache = rate_limiter, cache
        self.usage = Usage()
        self._lock = threading.Lock()

    def _count(self, **inc: int) -> None:
        with self._lock:
            for name, n in inc.items():
                setattr(self.usage, name, getattr(self.usage, name) + n)

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self.base_url!r}, model={self.model!r})"

    def __getstate__(self) -> dict:
        raise TypeError("ChatClient holds a live connection and a secret; build one per process instead")

    @classmethod
    def from_cfg(cls, cfg: Any, *, model: str | None = None, budget: Budget | None = None,
                 sleep: Callable[[float], None] = time.sleep, api_key: Secret | None = None,
                 rate_limiter: RateLimiter | None = None, cache: ReplyCache | None = None) -> ChatClient:
        return cls(base_url=cfg.api_base_url, model=model or cfg.api_model, api_key_env=cfg.api_key_env,
                   timeout=cfg.request_timeout, max_retries=cfg.max_retries, backoff_base=cfg.backoff_base,
                   backoff_max=cfg.backoff_max, temperature=cfg.temperature,
                   max_completion_tokens=cfg.max_completion_tokens, budget=budget, sleep=sleep,
                   api_key=api_key, rate_limiter=rate_limiter, cache=cache)

    def _delay(self, attempt: int, retry_after: str | None = None) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2 ** attempt) * (0.5 + random.random() / 2)
        try:
            if retry_after is not None:
                delay = max(delay, min(float(retry_after), self.backoff_max))
        except ValueError:
            pass
        return delay

    def _msg(self, text: str) -> str:
        return redact(clean_text(text, max_chars=300), self._secrets)

    def complete(self, messages: list[dict[str, Any]], validate: Callable[[str | None], T | None]) -> T | None:
        """One validated reply, or None after ``max_retries`` retries (counted as failed).

        ``validate`` turns the reply text into a value or None (malformed). A reply cached for the
        same request is re-validated and returned without a request (``Usage.cached``)."""
        oa = self._openai
        key = None
        if self.cache is not None:
            key = ReplyCache.key({"model": self.model, "messages": messages, "temperature": self.temperature,
                                  "max_tokens": self.max_completion_tokens})
            hit = self.cache.get(key)
            if hit is not None:
                value = validate(hit)
                if value is not None:
                    self._count(cached=1)
                    return value
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
            if self.budget is not None and self.budget.exhausted():
                raise BudgetExhausted("the captions token/cost budget is spent (captions.token_budget / "
                                      "captions.cost_budget); rerun to continue where it stopped")
            if self.rate_limiter is not None:
                self.rate_limiter.wait()
            self._count(requests=1)
            fatal = None
            try:
                resp = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature,
                    max_tokens=self.max_completion_tokens)
            except oa.APIStatusError as err:
                status = int(getattr(err, "status_code", 0) or 0)
                if status == 429 or status >= 500:
                    retry_after = err.response.headers.get("retry-after") if err.response is not None else None
                    delay = self._delay(attempt, retry_after)
                    log.warning("%s: HTTP %d, retry %d/%d in %.2fs", self.base_url, status, attempt + 1,
                                self.max_retries, delay)
                    if attempt < self.max_retries:
                        self.sleep(delay)
                    continue
                fatal = (status, self._msg(str(getattr(err, "message", ""))))
            except (oa.APITimeoutError, oa.APIConnectionError) as err:
                delay = self._delay(attempt)
                log.warning("%s: %s, retry %d/%d in %.2fs", self.base_url, type(err).__name__, attempt + 1,
                            self.max_retries, delay)
                if attempt < self.max_retries:
                    self.sleep(delay)
                continue
            except (oa.APIResponseValidationError, ValueError) as err:
                self._count(malformed=1)
                log.warning("%s: unreadable reply (%s), retry %d/%d", self.base_url, type(err).__name__,
                            attempt + 1, self.max_retries)
                continue
            if fatal is not None:     # raised outside the handler: no chained exception holds the reply
                raise LLMError(f"{self.base_url} (model {self.model}) answered HTTP {fatal[0]}: {fatal[1]}")
            text = self._reply_text(resp)
            value = validate(text)
            if value is None:
                self._count(malformed=1)
                log.warning("%s: malformed reply, retry %d/%d", self.base_url, attempt + 1, self.max_retries)
                continue
            if self.cache is not None and key is not None and text is not None:
                self.cache.put(key, redact(text, self._secrets))       # an echoed key never reaches storage
            return value
        self._count(failed=1)
        log.warning("%s: giving up on one request after %d attempts", self.base_url, self.max_retries + 1)
        return None

    def _reply_text(self, resp: Any) -> str | None:
        try:
            usage = getattr(resp, "usage", None)
            p = int(getattr(usage, "prompt_tokens", 0) or 0)
            c = int(getattr(usage, "completion_tokens", 0) or 0)
        except (TypeError, ValueError):
            p = c = 0
        self._count(prompt_tokens=p, completion_tokens=c)
        if self.budget is not None:
            self.budget.spend(p, c)
        try:
            content = resp.choices[0].message.content
        except (AttributeError, IndexError, TypeError, KeyError):
            return None
        return content if isinstance(content, str) else None


# -- captioner and prompt engineer ----------------------------------------------------------------

def frames_to_jpeg_urls(frames: Tensor, mean: Sequence[float], std: Sequence[float], n: int,
                        quality: int = 85) -> list[str]:
    """CLIP-normalised frames (T, 3, H, W) -> n uniformly spaced data:image/jpeg;base64 URLs."""
    from PIL import Image

    T = frames.shape[0]
    idx = np.linspace(0, T - 1, num=min(n, T)).round().astype(int)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    urls = []
    for t in idx:
        x = frames[int(t)].detach().float().cpu().numpy() * s + m              # (3, H, W) in [0, 1]
        img = (np.clip(x, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)  # (H, W, 3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return urls


def caption_format_instruction(k: int, max_tokens: int) -> str:
    words = max(8, int(max_tokens * 0.7))
    return (f"Reply with only a JSON array of exactly {k} strings, one caption per string, "
            f"each at most {words} words. No numbering, no other text.")


class OpenAICaptioner:
    """Captioner over a multimodal chat model: one request per video, K captions parsed from JSON;
    up to ``concurrency`` requests in flight at once (threads sharing the client)."""

    def __init__(self, client: ChatClient, *, mean: Sequence[float], std: Sequence[float],
                 frames_per_request: int = 4, jpeg_quality: int = 85, max_tokens: int = MAX_CAPTION_TOKENS,
                 concurrency: int = 1, progress: Progress | None = None):
        self.client, self.mean, self.std = client, tuple(mean), tuple(std)
        self.frames_per_request, self.jpeg_quality, self.max_tokens = frames_per_request, jpeg_quality, max_tokens
        self.concurrency, self.progress = max(1, int(concurrency)), progress
        self.exhausted = False

    def messages(self, frames: Tensor, prompt: str, k: int) -> list[dict[str, Any]]:
        images = [{"type": "image_url", "image_url": {"url": u}}
                  for u in frames_to_jpeg_urls(frames, self.mean, self.std, self.frames_per_request,
                                               self.jpeg_quality)]
        text = prompt + "\n\n" + caption_format_instruction(k, self.max_tokens)
        return [{"role": "system", "content": CAPTIONER_SYSTEM},
                {"role": "user", "content": [{"type": "text", "text": text}, *images]}]

    def _one(self, frames: Tensor, prompt: str, k: int) -> list[str]:
        if self.exhausted:
            return []
        try:
            caps = self.client.complete(self.messages(frames, prompt, k),
                                        lambda text: parse_caption_list(text, k, self.max_tokens) or None)
        except BudgetExhausted:
            self.exhausted = True
            caps = None
        if self.progress is not None:
            self.progress.advance(1)
        return caps or []

    def caption(self, frames: Tensor, prompt: str, k: int, *,
                video_ids: Sequence[str] | None = None) -> list[list[str]]:
        """frames (B, T, 3, H, W) -> B caption lists (in order); [] for a video skipped (malformed / budget)."""
        B = frames.shape[0]
        try:
            if self.concurrency == 1 or B == 1:
                return [self._one(frames[b], prompt, k) for b in range(B)]
            with ThreadPoolExecutor(max_workers=min(self.concurrency, B), thread_name_prefix="tvr-caption") as ex:
                return list(ex.map(lambda b: self._one(frames[b], prompt, k), range(B)))
        finally:
            if self.client.cache is not None:
                self.client.cache.flush()


def _quote(text: str, limit: int) -> str:
    return clean_text(text, max_chars=limit)


class OpenAIPromptEngineer:
    """Prompt engineer over a chat model: best prompt + scored examples + history -> a new prompt."""

    def __init__(self, client: ChatClient, *, max_history: int = 10):
        self.client, self.max_history = client, max_history

    def request_text(self, prompt: str, examples: Sequence[Example], history: Sequence[Candidate]) -> str:
        lines = ["Current best prompt:", "<<<", _quote(prompt, 2000), ">>>", "",
                 "Prompts tried so far with their scores (higher is better):"]
        for c in list(history)[-self.max_history:]:
            score = "not scored (repeat)" if c.score is None else f"{c.score:.4f}"
            lines.append(f"- [{score}] {_quote(c.prompt, 600)}")
        lines += ["", "Videos where the current best prompt did worst:"]
        for e in examples:
            lines.append(f"* human description: {_quote(' | '.join(e.texts[:3]), 400)}")
            lines.append(f"  generated captions: {_quote(' | '.join(e.captions[:10]), 1200)}")
            lines.append(f"  similarity {e.similarity:.3f}, diversity {e.diversity:.3f}, score {e.score:.3f}")
        lines += ["", "Write one improved prompt that will make the captions closer to how humans describe "
                  "these videos while keeping them varied. Reply with only the new prompt text."]
        return "\n".join(lines)

    def rewrite(self, prompt: str, examples: Sequence[Example], history: Sequence[Candidate]) -> str | None:
        messages = [{"role": "system", "content": ENGINEER_SYSTEM},
                    {"role": "user", "content": self.request_text(prompt, examples, history)}]
        try:
            return self.client.complete(messages, clean_prompt)
        except BudgetExhausted:
            return None
        finally:
            if self.client.cache is not None:
                self.client.cache.flush()
