"""Chat and enhancement through real chat and SDXL worker processes (tiny Qwen2 and SDXL)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from celery import chain
from celery.exceptions import TimeoutError as CeleryTimeout

from devtools.sink import Sink
from ourvidz_tasks.publish import chat, enhance, sdxl_generate

from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal
from .wire import envelope, signature

MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}]


@pytest.mark.parametrize("model", ["qwen_instruct", "qwen_base"])
def test_chat_returns_text_and_token_counts(model: str, chat_worker: WorkerProcess) -> None:
    result = chat.delay({"messages": MESSAGES, "model": model, "max_tokens": 8, "seed": 3,
                         "sfw_mode": True}).get(timeout=120)
    assert result["model"] == model and isinstance(result["response"], str)
    assert result["prompt_tokens"] > 5 and 1 <= result["completion_tokens"] <= 8
    assert result["finish_reason"] in ("stop", "length") and result["generation_time"] > 0
    again = chat.delay({"messages": MESSAGES, "model": model, "max_tokens": 8, "seed": 3}).get(timeout=120)
    assert again["response"] == result["response"]


@pytest.mark.parametrize(
    ("request_", "start"),
    [
        ({"messages": []}, "INVALID_JOB: `messages`"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
         "INVALID_JOB: messages[1].role must be one of system, user, assistant"),
        ({"messages": MESSAGES, "model": "gpt-9"}, "INVALID_JOB: `model`"),
        ({"messages": MESSAGES, "max_tokens": 0}, "INVALID_JOB: `max_tokens`"),
        ({"messages": MESSAGES, "max_tokens": 100000}, "INVALID_JOB: `max_tokens`"),
    ],
)
def test_bad_chat_requests_fail_with_the_code_first(request_: dict[str, Any], start: str, chat_worker: WorkerProcess) -> None:
    result = chat.delay(request_)
    with pytest.raises(Exception) as info:
        result.get(timeout=60)
    assert str(info.value).startswith(start), str(info.value)
    assert not isinstance(info.value, CeleryTimeout)


def sdxl_job(**fields: Any) -> dict[str, Any]:
    job = {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a cat on a sofa",
           "config": {"resolution": "256x256", "num_inference_steps": 3, "seed": 5}}
    job.update(fields)
    return job


def test_enhance_then_generate_chain(chat_worker: WorkerProcess, sdxl_worker: WorkerProcess, sink: Sink) -> None:
    job = sdxl_job(metadata={"enhance": {"system_prompt": "Rewrite the prompt.", "max_tokens": 12, "temperature": 0.8}})
    chain(enhance.s(job), sdxl_generate.s()).apply_async()
    body = terminal(sink, job["id"])
    assert body["status"] == "completed", body
    meta = body["metadata"]
    assert meta["original_prompt"] == "a cat on a sofa"
    assert isinstance(meta["enhanced_prompt"], str) and meta["enhanced_prompt"]
    assert meta["enhancement_source"] == "qwen_instruct"
    statuses = [c["body"]["status"] for c in sink.callbacks(job["id"])]
    assert statuses.count("completed") + statuses.count("failed") == 1


def test_chain_published_like_the_edge(chat_worker: WorkerProcess, sdxl_worker: WorkerProcess, store: redis.Redis,
                                       sink: Sink) -> None:
    job = sdxl_job()
    env = envelope("ourvidz.chat.enhance", [job], "chat", chain=[signature("ourvidz.sdxl.generate", queue="sdxl")])
    store.lpush("chat", json.dumps(env))
    body = terminal(sink, job["id"])
    assert body["status"] == "completed" and body["metadata"]["original_prompt"] == "a cat on a sofa"


def test_failed_enhancement_keeps_the_original_prompt(chat_worker: WorkerProcess, sdxl_worker: WorkerProcess,
                                                      sink: Sink) -> None:
    job = sdxl_job(metadata={"enhance": {"max_tokens": 0}})
    chain(enhance.s(job), sdxl_generate.s()).apply_async()
    body = terminal(sink, job["id"])
    assert body["status"] == "completed"
    assert "max_tokens" in body["metadata"]["enhancement_error"]
    assert body["metadata"]["original_prompt"] == "a cat on a sofa"
    assert "enhanced_prompt" not in body["metadata"]


def test_enhance_returns_the_same_job(chat_worker: WorkerProcess) -> None:
    job = sdxl_job(extra_field={"kept": True})
    out = enhance.delay(job).get(timeout=120)
    assert out["id"] == job["id"] and out["extra_field"] == {"kept": True} and out["config"] == job["config"]
    assert out["metadata"]["original_prompt"] == job["prompt"]
    assert out["prompt"] == out["metadata"]["enhanced_prompt"] != job["prompt"]


def test_policy_runs_on_the_enhanced_prompt(sdxl_worker: WorkerProcess, sink: Sink) -> None:
    """The generate half of enhance → generate: a clean original prompt that enhancement turned into a refused
    one is refused; the same original with a clean enhanced prompt is generated."""
    original = "a child on a sofa"
    refused = sdxl_job(prompt="a nude child on a sofa",
                       metadata={"original_prompt": original, "enhanced_prompt": "a nude child on a sofa"})
    clean = sdxl_job(prompt="a child on a sofa, soft light",
                     metadata={"original_prompt": original, "enhanced_prompt": "a child on a sofa, soft light"})
    sdxl_generate.delay(refused)
    sdxl_generate.delay(clean)
    body = terminal(sink, refused["id"])
    assert body["error"]["code"] == "INVALID_PROMPT" and body["error"]["retryable"] is False
    assert "nude" not in body["error"]["message"]
    done = terminal(sink, clean["id"])
    assert done["status"] == "completed", done
    assert done["metadata"]["enhanced_prompt"] == clean["prompt"] != original
