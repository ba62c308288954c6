"""Secrets never leave the process: scrubbing for configs, log lines, cards, reports and file names.

Config values under secret-looking keys (key, token, secret, password) are replaced; in any
text, credentials in URLs (``user:password@``, ``?token=...``) and the values of secret-looking
environment variables (``WANDB_API_KEY``, ``HF_TOKEN``, any ``*_TOKEN``, ``*KEY*``...) are
blanked out. The environment is read only to take its secrets back out of a text.

Where each channel is scrubbed: the console (stdout and stderr, whatever prints to them) and the
command reports in ``embedtune.logs``; ``train.log`` by its formatter, also there; the run's
files and W&B in ``embedtune.training.tracking``; checkpoints in ``embedtune.training.checkpoint``;
the model card in ``embedtune.training.model_card``.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

SECRET_WORDS = ("key", "token", "secret", "password")
REDACTED = "<redacted>"
URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][\w+.-]*://)[^/\s@]+@")
# The value ends before a trailing ":" "," "." or ";", which in a message is punctuation, not the secret.
URL_SECRET_PARAM = re.compile(
    r"(?P<name>[?&][^=&\s]*(?:key|token|secret|password|signature|sig|credential)[^=&\s]*=)"
    r"[^&\s#)`'\"]*[^&\s#)`'\".,:;]", re.I)
MIN_SECRET_LEN = 8  # shorter environment values ("true", "1") are settings, not secrets


def secret_key(key: Any) -> bool:
    return isinstance(key, str) and any(word in key.lower() for word in SECRET_WORDS)


def scrub_config(value: Any) -> Any:
    """A copy with the value under any key containing key/token/secret/password replaced."""
    if isinstance(value, dict):
        return {k: (REDACTED if secret_key(k) and v not in (None, "") else scrub_config(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_config(v) for v in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value


def scrub_value(value: Any) -> Any:
    """A copy of a JSON-like value (a report, a table) with every text in it scrubbed, keys too.

    Unlike ``scrub_config`` no value is replaced for its key: a report's keys are the program's
    own names (``tokens``, ``max_tokens``), not settings someone filled in.
    """
    if isinstance(value, dict):
        return {scrub_value(k): scrub_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_value(v) for v in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value


def scrub_text(text: str) -> str:
    """Blank out credentials in URLs (user:password@, ?token=...) and secret environment values.

    The environment is only read here to take its secrets back out of the text, in case one
    slipped into a config value such as a file URL or a tag.
    """
    text = URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)
    text = URL_SECRET_PARAM.sub(rf"\g<name>{REDACTED}", text)
    for name, value in os.environ.items():
        if secret_key(name) and len(value) >= MIN_SECRET_LEN and value in text:
            text = text.replace(value, REDACTED)
    return text


def command_line_holds_secret() -> bool:
    line = " ".join(sys.argv)
    return scrub_text(line) != line
