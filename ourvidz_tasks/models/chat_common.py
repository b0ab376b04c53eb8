"""What every chat backend shares, without torch: the ChatML turns, a request's sampling and its checks, the answer.

The in-process engine (:mod:`~ourvidz_tasks.models.chat_engine`), the one-shot
:func:`~ourvidz_tasks.models.qwen.generate_chat` and the remote server
(:mod:`~ourvidz_tasks.models.chat_remote`) render the same prompt and refuse
the same requests with the same ``INVALID_JOB`` fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..contract.errors import InvalidJob
from ..contract.names import CHAT_MODELS, CHAT_ROLES, ChatModel

#: the chat models a pool serves in-process
QwenName = ChatModel
QWEN_NAMES: tuple[str, ...] = CHAT_MODELS

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

#: Qwen2.5's ChatML turns, without the default system prompt Qwen's own
#: template invents when the caller sends none (and without tool calls).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class Sampling:
    """What a caller asked for: greedy when ``temperature`` is 0."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None


@dataclass
class ChatOutput:
    """One chat completion."""

    response: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    #: seconds spent generating
    generation_time: float


def chatml(messages: list[dict[str, str]]) -> str:
    """The prompt both Qwen models get: ChatML turns, then the assistant's turn opens."""
    check_messages(messages)
    turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return f"{turns}{IM_START}assistant\n"


def check_messages(messages: list[dict[str, str]]) -> None:
    """``INVALID_JOB`` on ``messages`` unless it is a non-empty list of ``{role, content}`` turns."""
    if not isinstance(messages, list) or not messages:
        raise InvalidJob("messages: must be a non-empty list", field="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidJob(f"messages[{index}]: must be an object", field="messages")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise InvalidJob(f"messages[{index}].role: must be one of {', '.join(CHAT_ROLES)}", field="messages")
        if not isinstance(content, str):
            raise InvalidJob(f"messages[{index}].content: must be a string", field="messages")


def check_sampling(sampling: Sampling) -> None:
    """``INVALID_JOB`` naming the first bad sampling parameter."""
    if isinstance(sampling.max_tokens, bool) or not isinstance(sampling.max_tokens, int) or sampling.max_tokens < 1:
        raise InvalidJob(f"`max_tokens` must be an integer >= 1; got {sampling.max_tokens!r}", field="max_tokens")
    if not isinstance(sampling.temperature, (int, float)) or not sampling.temperature >= 0:
        raise InvalidJob(f"`temperature` must be >= 0; got {sampling.temperature!r}", field="temperature")
    if not isinstance(sampling.top_p, (int, float)) or not 0 < sampling.top_p <= 1:
        raise InvalidJob(f"`top_p` must be in (0, 1]; got {sampling.top_p!r}", field="top_p")
    if sampling.seed is not None and (isinstance(sampling.seed, bool) or not isinstance(sampling.seed, int)):
        raise InvalidJob(f"`seed` must be an integer; got {sampling.seed!r}", field="seed")
