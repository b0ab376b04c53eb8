"""Chat answered by an OpenAI-compatible server (vLLM, SGLang) instead of an in-process model.

With ``OURVIDZ_CHAT_SERVER_URL`` set, the chat pool loads no model: each of
its model slots holds a :class:`RemoteChat`, which renders the same ChatML
prompt as the in-process engine (no system prompt invented) and POSTs it to
``/v1/completions`` with every sampling parameter explicit, so the server's
own ``generation_config`` defaults (vLLM applies the checkpoint's by default)
change nothing. The task contract, results and error codes are the
in-process ones: a refused context is ``INVALID_JOB`` naming ``max_tokens``
or ``messages``; an unreachable or failing server is ``WORKER_UNAVAILABLE``
(retried). The slot's ledger reservation is the server's declared memory
(``OURVIDZ_CHAT_SERVER_MEMORY_MB``, held by the instruct slot).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from ..contract.errors import InvalidJob, WorkerUnavailable
from ..contract.settings import Settings
from .chat_common import ENDOFTEXT, IM_END, ChatOutput, Sampling, chatml, check_sampling

log = logging.getLogger(__name__)


class RemoteChat:
    """One of our chat model names, answered by the configured server."""

    def __init__(self, settings: Settings, name: str, *, client: httpx.Client | None = None) -> None:
        if not settings.chat_server_url:
            raise ValueError("chat_server_url: not set")
        self.name = name
        self.server_model = settings.chat_server_models.get(name, name)
        self.url = settings.chat_server_url.rstrip("/") + "/v1/completions"
        self.declared = settings.chat_server_memory_mb * 2**20 if name == "qwen_instruct" else 0
        self.client = client or httpx.Client(timeout=settings.chat_server_timeout)

    def nbytes(self) -> int:
        """The server's declared memory (what the ledger reserves for it)."""
        return self.declared

    def unload(self) -> int:
        self.client.close()
        return 0

    def generate(self, messages: list[dict[str, str]], sampling: Sampling, *, urgent: bool = False,
                 job: str = "?") -> ChatOutput:
        """Answer ``messages`` through the server (``urgent`` is the server's scheduling business)."""
        check_sampling(sampling)
        body: dict[str, Any] = {
            "model": self.server_model, "prompt": chatml(messages), "max_tokens": sampling.max_tokens,
            "temperature": float(sampling.temperature), "top_p": float(sampling.top_p) if sampling.temperature else 1.0,
            "stop": [IM_END, ENDOFTEXT], "n": 1, "stream": False,
            # explicit neutral values: nothing from the server's generation_config
            "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0,
            "presence_penalty": 0.0, "skip_special_tokens": True,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        started = time.perf_counter()
        try:
            response = self.client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise WorkerUnavailable(f"the chat server is unreachable ({type(exc).__name__})") from exc
        elapsed = time.perf_counter() - started
        if response.status_code == 400:
            raise _refused(_message(response))
        if response.status_code >= 300:
            raise WorkerUnavailable(f"the chat server answered {response.status_code}: {_message(response)[:200]}")
        return _answer(response, elapsed)


def _answer(response: httpx.Response, elapsed: float) -> ChatOutput:
    try:
        data = response.json()
        choice = data["choices"][0]
        usage = data["usage"]
        finish = choice.get("finish_reason")
        return ChatOutput(
            response=str(choice["text"]), prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
            finish_reason="length" if finish == "length" else "stop", generation_time=elapsed,
        )
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise WorkerUnavailable(f"the chat server's answer is malformed ({type(exc).__name__})") from exc


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    error = (data.get("error") or data) if isinstance(data, dict) else data
    return str(error.get("message") if isinstance(error, dict) else error)


def _refused(message: str) -> InvalidJob:
    """A 400: the context does not fit (``max_tokens``, or ``messages`` alone), else the messages."""
    lowered = message.lower()
    if "context" in lowered or "max_tokens" in lowered or "maximum" in lowered:
        if "prompt" in lowered and ("too long" in lowered or "longer than" in lowered):
            return InvalidJob(f"`messages` do not fit the chat server's context: {message[:200]}", field="messages")
        return InvalidJob(f"`max_tokens` does not fit the chat server's context: {message[:200]}", field="max_tokens")
    return InvalidJob(f"`messages`: the chat server refused the request: {message[:200]}", field="messages")
