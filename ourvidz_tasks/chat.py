"""``ourvidz.chat.chat`` and ``ourvidz.chat.enhance``: Qwen2.5 inference.

Chat is pure inference on the caller's messages and sends no callbacks; a
failure is a task failure whose message starts with the error code. Enhance
takes a job and returns the same job with ``prompt`` enhanced; it never fails
the job: after its retries it returns the job unchanged with
``metadata.enhancement_error``, so a chain always reaches its generate step
and exactly one terminal callback.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

from .celery import app
from .contract import names
from .contract.errors import JobError, WorkerUnavailable
from .contract.jobs import EnhanceSpec, parse_chat, usable_id
from .contract.settings import Settings
from .models.chat_common import Sampling
from .runtime import signals  # noqa: F401  (a worker registers its signal handlers with its task module)
from .runtime.faults import exit_on_device_fault, retry_once
from .runtime.lifecycle import as_job_error, backoff, poison_guard
from .runtime.runtime import runtime
from .runtime.tasks import BaseTask

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You rewrite prompts for an image and video generation model. Keep the subject, the intent "
    "and every detail the user gave; add concrete visual detail (composition, lighting, setting, "
    "style). Answer with the rewritten prompt only, in one paragraph."
)


@app.task(base=BaseTask, bind=True, name=names.CHAT_CHAT)
def chat(self: BaseTask, request: dict[str, Any]) -> dict[str, Any]:
    """Answer a chat request (CONTRACT.md section 3)."""
    rt = runtime(self.app)
    poisoned = poison_guard(self, rt, "chat")  # a request that stopped its worker each time
    if poisoned is not None:
        raise WorkerUnavailable(poisoned)
    try:
        req = parse_chat(request, rt.settings)
        engine = rt.model(req.model)
        job = req.id or self.request.id or "?"
        sampling = Sampling(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        messages = [m.model_dump() for m in req.messages]
        # out of memory: released, then tried once more; a device fault exits (status 75)
        out = retry_once(lambda: engine.generate(messages, sampling, job=job), family="chat", stage="chat",
                         device=rt.device, hooks=rt.attempt_hooks, what=f"chat {job}")
    except Exception as exc:
        exit_on_device_fault(exc, f"chat {self.request.id or '?'}")  # a device fault ends the process here
        error = as_job_error(exc)
        if error is None:
            raise
        if error.retryable and self.request.retries < self.max_retries:
            raise self.retry(exc=error, countdown=backoff(self.request.retries)) from None
        raise error from None
    log.info("chat %s answered: %d+%d tokens", req.id or self.request.id, out.prompt_tokens, out.completion_tokens)
    return {
        "response": out.response, "model": req.model, "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens, "finish_reason": out.finish_reason,
        "generation_time": round(out.generation_time, 4),
    }


def system_prompt(settings: Settings, spec: EnhanceSpec | None) -> str:
    """The job's own system prompt, else the configured file, else the built-in one."""
    if spec is not None and spec.system_prompt:
        return spec.system_prompt
    path: Path | None = settings.enhance_system_prompt_file
    if path is not None:
        return path.read_text().strip()
    return DEFAULT_SYSTEM_PROMPT


@app.task(base=BaseTask, bind=True, name=names.CHAT_ENHANCE)
def enhance(self: BaseTask, job: Any) -> Any:
    """The same job with ``prompt`` enhanced (original kept in metadata)."""
    if not isinstance(job, dict):
        return job  # the generate step dead-letters or fails it
    job_id = usable_id(job) or "?"
    rt = runtime(self.app)
    poisoned = poison_guard(self, rt, "enhance")  # it stopped its worker each time: generate goes on
    if poisoned is not None:
        return _with_metadata(job, enhancement_error=poisoned)
    prompt = job.get("prompt")
    metadata = job.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    started = time.perf_counter()
    try:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: nothing to enhance")
        if len(prompt) > rt.settings.max_prompt_chars:
            raise ValueError(f"the prompt is over {rt.settings.max_prompt_chars} characters")
        spec = EnhanceSpec.model_validate(metadata.get("enhance") or {})
        name = spec.model or rt.settings.enhance_model
        sampling = Sampling(
            max_tokens=spec.max_tokens or rt.settings.enhance_max_tokens,
            temperature=spec.temperature if spec.temperature is not None else rt.settings.enhance_temperature,
            top_p=spec.top_p or rt.settings.enhance_top_p,
        )
        messages = [{"role": "system", "content": system_prompt(rt.settings, spec)}, {"role": "user", "content": prompt}]
        # an enhancement gates a generation: it joins the batch ahead of waiting chats
        engine = rt.model(name)
        out = retry_once(lambda: engine.generate(messages, sampling, urgent=True, job=job_id), family="chat",
                         stage="enhance", device=rt.device, hooks=rt.attempt_hooks, what=f"job {job_id}")
        enhanced = out.response.strip()
        if not enhanced:
            raise ValueError("the model returned an empty prompt")
    except Exception as exc:
        exit_on_device_fault(exc, f"job {job_id}")  # a device fault ends the process here
        error = as_job_error(exc)
        if error is not None and error.retryable and self.request.retries < self.max_retries:
            raise self.retry(exc=error, countdown=backoff(self.request.retries)) from None
        reason = error.message if isinstance(error, JobError) else f"{type(exc).__name__}: {exc}"[:300]
        log.warning("job %s: enhancement failed, generation goes on with the original prompt", job_id)
        return _with_metadata(job, enhancement_error=reason)
    log.info("job %s enhanced in %.2fs", job_id, time.perf_counter() - started)
    result = _with_metadata(
        job, original_prompt=prompt, enhanced_prompt=enhanced, enhancement_source=name,
        enhancement_time=round(time.perf_counter() - started, 3),
    )
    result["prompt"] = enhanced
    return result


def _with_metadata(job: dict[str, Any], **fields: Any) -> dict[str, Any]:
    out = copy.deepcopy(job)
    metadata = out.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    metadata.update(fields)
    out["metadata"] = metadata
    return out
