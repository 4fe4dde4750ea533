"""Untrusted-text hygiene for generated captions and prompts (plain Python, no model math).

Everything a captioner or prompt engineer returns (an LLM reply above all) goes through here before
it is scored, stored or sent anywhere: control characters are removed, whitespace collapsed, list
markers / quotes stripped, lengths capped. Text is only ever treated as data: nothing here (or in
its callers) evaluates it, formats it into code or templates it into another format string.

Token counts use CLIP's BPE (open_clip ``SimpleTokenizer``), the tokenizer the captions will be
fed to: ``max_tokens`` = 70 leaves room for SOT/EOT in CLIP's 77-token context.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Iterable

MAX_CAPTION_TOKENS = 70
MAX_PROMPT_CHARS = 2000

_LIST_MARKER = re.compile(r"^\s*(?:[-*•·]+|\(?\d{1,3}[.):\]]|\(?[a-zA-Z][.)])\s+")
_CAPTION_LABEL = re.compile(r"^\s*(?:caption|description)\s*\d*\s*[:\-–]\s*", re.IGNORECASE)
_PROMPT_LABEL = re.compile(r"^\s*(?:new|rewritten|improved|revised|refined)?\s*prompt\s*[:\-–]\s*",
                           re.IGNORECASE)
_FENCE = re.compile(r"```(?:[a-zA-Z0-9_-]+)?\s*(.*?)```", re.DOTALL)
_QUOTES = "\"'`“”‘’«»"


@functools.lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@functools.lru_cache(maxsize=65536)
def _word_tokens(word: str) -> int:
    return len(_bpe().encode(word))


def count_tokens(text: str) -> int:
    """CLIP BPE tokens of ``text`` (without SOT/EOT)."""
    return len(_bpe().encode(text))


def truncate_tokens(text: str, max_tokens: int = MAX_CAPTION_TOKENS) -> str:
    """Keep whole words while the CLIP BPE count stays <= ``max_tokens``."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    words, kept, used = text.split(), [], 0
    for w in words:
        n = _word_tokens(w)
        if used + n > max_tokens:
            break
        kept.append(w)
        used += n
    out = " ".join(kept)
    while out and count_tokens(out) > max_tokens:     # BPE across word joins can differ slightly
        out = out.rsplit(" ", 1)[0] if " " in out else ""
    return out


def clean_text(text: object, *, max_chars: int = 4000) -> str:
    """Printable, single-spaced text; non-strings -> ''. Control / format characters are dropped."""
    if not isinstance(text, str):
        return ""
    text = unicodedata.normalize("NFKC", text[: max_chars * 4])
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    return " ".join(text.split())[:max_chars]


def clean_caption(text: object, max_tokens: int = MAX_CAPTION_TOKENS) -> str:
    """One caption: cleaned, list markers / labels / surrounding quotes removed, <= max_tokens."""
    s = clean_text(text, max_chars=2000)
    s = _CAPTION_LABEL.sub("", _LIST_MARKER.sub("", s)).strip().strip(_QUOTES).strip()
    if not any(ch.isalnum() for ch in s):
        return ""
    return truncate_tokens(s, max_tokens)


def dedupe(items: Iterable[str]) -> list[str]:
    """Drop repeats (case- and whitespace-insensitive), keeping first occurrences."""
    seen, out = set(), []
    for s in items:
        key = " ".join(s.lower().split())
        if s and key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _json_candidates(raw: str) -> list[object]:
    found = []
    for block in [*_FENCE.findall(raw), raw]:
        block = block.strip()
        for start, end in (("[", "]"), ("{", "}")):
            i, j = block.find(start), block.rfind(end)
            if 0 <= i < j:
                try:
                    found.append(json.loads(block[i:j + 1]))
                except (ValueError, RecursionError):
                    pass
    return found


def parse_caption_list(raw: object, k: int, max_tokens: int = MAX_CAPTION_TOKENS) -> list[str]:
    """An untrusted reply -> at most ``k`` clean, distinct captions ([] when nothing usable).

    Accepted shapes: a JSON array of strings, a JSON object with a ``captions`` array (either may be
    inside a ``` fence or surrounded by prose), or a numbered / bulleted list of at least two lines
    (other lines ignored). Anything else (prose, a refusal) gives []."""
    if not isinstance(raw, str) or not raw.strip():
        return []
    raw = raw[:100_000]
    items: list[object] | None = None
    for obj in _json_candidates(raw):
        if isinstance(obj, dict):
            obj = obj.get("captions")
        if isinstance(obj, list) and any(isinstance(x, str) for x in obj):
            items = [x for x in obj if isinstance(x, str)]          # non-strings are dropped
            break
    if items is None:                                      # a numbered / bulleted list, >= 2 items
        body = _FENCE.sub(lambda m: m.group(1), raw)
        items = [ln for ln in body.splitlines() if _LIST_MARKER.match(ln)]
        if len(items) < 2:
            return []                                      # prose (a refusal, a remark): malformed
    caps = dedupe(clean_caption(x, max_tokens) for x in items)
    return caps[:k]


def clean_prompt(raw: object, max_chars: int = MAX_PROMPT_CHARS) -> str | None:
    """An untrusted rewritten prompt -> a clean single-paragraph prompt, or None if unusable."""
    if not isinstance(raw, str):
        return None
    fenced = _FENCE.findall(raw)
    s = fenced[0] if fenced else raw
    for obj in _json_candidates(s):
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            s = obj["prompt"]
            break
    s = clean_text(s, max_chars=max_chars * 2)
    s = _PROMPT_LABEL.sub("", s).strip().strip(_QUOTES).strip()
    if len(s) > max_chars:
        cut = s[:max_chars]
        s = cut[: cut.rfind(". ") + 1] if ". " in cut else cut
    if len(s.split()) < 3 or not any(ch.isalpha() for ch in s):
        return None
    return s
