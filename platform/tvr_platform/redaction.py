"""Redaction by value: what tvr prints or logs (a spec, a URI, params, a runtime_env) never carries
a credential, whatever key it sits under.

Three kinds of secret are replaced by ``***``:

- the userinfo of a URL (``http://user:pass@host`` -> ``http://***@host``), in any string;
- the value of every environment variable whose *name* looks like a credential
  (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``, ``OPENAI_API_KEY``, ...), and the key
  material of the AWS credential chain, wherever that value appears;
- the value under a credential-looking key in a mapping (``cluster.env_vars.DB_PASSWORD``).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

MASK = "***"
# Names (env vars, config keys) that carry credentials.
# TOKEN, but not TOKENIZER(S) or TOKENS (counts such as model.excae.max_text_tokens, whose value
# 70 was masked everywhere it was printed, and broke resuming a run whose logged spec held "***")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN(?!IZ|S)|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|API_KEY|APIKEY|"
                         r"SESSION_KEY", re.IGNORECASE)
# scheme://userinfo@ -- credentials inside a URL (user[:password] before the host).
URL_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@", re.IGNORECASE)
_MIN_SECRET = 6  # shorter values (flags like 'false') would mask ordinary words


def _aws_chain() -> list[str]:
    try:
        import boto3

        creds = boto3.session.Session().get_credentials()
        if creds is None:
            return []
        frozen = creds.get_frozen_credentials()
        return [frozen.access_key or "", frozen.secret_key or "", frozen.token or ""]
    except Exception:  # noqa: BLE001 - redaction must never fail
        return []


def secret_values(extra: tuple[str, ...] = ()) -> list[str]:
    """Every value that must never be printed: env values of credential-looking names, the AWS
    chain's key material, and ``extra``; longest first (so a secret containing another goes whole)."""
    vals = {v for k, v in os.environ.items() if SECRET_NAME.search(k)}
    vals |= set(_aws_chain()) | set(extra)
    return sorted((v for v in vals if v and len(v) >= _MIN_SECRET), key=len, reverse=True)


def redact_text(text: str, extra: tuple[str, ...] = ()) -> str:
    """``text`` with URL userinfo and every secret value replaced by ``***``."""
    text = URL_USERINFO.sub(rf"\1{MASK}@", text)
    for s in secret_values(extra):
        text = text.replace(s, MASK)
    return text


def redact(obj: Any, extra: tuple[str, ...] = ()) -> Any:
    """A copy of ``obj`` (str / mapping / list / tuple / scalar) with every secret masked; values
    under credential-looking mapping keys become ``***`` whatever they are."""
    if isinstance(obj, str):
        return redact_text(obj, extra)
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(k, str) and SECRET_NAME.search(k) and v not in (None, "")
                    else redact(v, extra)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, extra) for v in obj)
    return obj


class RedactingStream:
    """A text stream wrapper that redacts every write (the CLI's stdout / stderr: tvr's own prints
    and the worker logs Ray forwards to the driver)."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._secrets = tuple(secret_values())

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text, self._secrets) if isinstance(text, str) else text)
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output():
    """sys.stdout / sys.stderr redacted for the duration (nested use is harmless)."""
    import sys

    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if isinstance(s, RedactingStream) else RedactingStream(s) for s in old)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old
