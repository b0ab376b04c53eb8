"""The prompt policy: a pluggable check on the final prompt before generation.

A policy is any callable ``policy(prompt) -> None`` that raises
:class:`~ourvidz_tasks.contract.errors.InvalidPrompt` to refuse. ``OURVIDZ_PROMPT_POLICY``
names it as ``module:callable`` (a classifier of your own, say). The default
is a small deterministic rule set with no model: it refuses sexual content
involving minors, and nothing else. Refusals never repeat the prompt.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from ..contract.errors import InvalidPrompt
from .plugins import import_callable

PromptPolicy = Callable[[str], None]

_MINOR = re.compile(
    r"\b(child|children|kid|kids|minor|minors|underage|under-age|preteen|pre-teen|toddler|infant|"
    r"schoolgirl|schoolboy|little (?:girl|boy)|young (?:girl|boy)|"
    r"(?:[1-9]|1[0-7])[ -]?(?:yo|y/o|years?[ -]old|year-old))\b"
)
_SEXUAL = re.compile(
    r"\b(sex|sexual|sexy|nude|nudes|naked|nsfw|porn|porno|pornographic|erotic|explicit|lewd|"
    r"genitals?|penis|vagina|breasts?|nipples?|orgasm|intercourse|masturbat\w*|topless|undress\w*|"
    r"lingerie|fetish|seductive)\b"
)
_ALWAYS = re.compile(r"\b(loli|lolicon|shota|shotacon|jailbait|pedo|pedophil\w*|paedophil\w*|cp)\b")


def _normalize(prompt: str) -> str:
    text = unicodedata.normalize("NFKC", prompt).casefold()
    return re.sub(r"[_*~`|]+", " ", text)


def default_policy(prompt: str) -> None:
    """Refuse sexual content involving minors (``INVALID_PROMPT``, not retryable)."""
    text = _normalize(prompt)
    if _ALWAYS.search(text) or (_MINOR.search(text) and _SEXUAL.search(text)):
        raise InvalidPrompt("the prompt was refused by the content policy (sexual content involving minors)",
                            field="prompt")


def allow_all(prompt: str) -> None:
    """A policy that refuses nothing (for deployments that check upstream)."""


def load_policy(path: str) -> PromptPolicy:
    """Import ``module:callable``; a bad path is a ConfigError naming it."""
    return import_callable(path, "OURVIDZ_PROMPT_POLICY")
