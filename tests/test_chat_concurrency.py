"""The chat pool serves many requests at once on its one model (real workers, tiny Qwen2)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from ourvidz_tasks.publish import chat, enhance

from .support.cluster import WorkerProcess
from .support.jobs import new_id
from .support.process import wait_for

LENGTHS = [12, 30, 7, 45, 20, 33, 9, 26]


def request(i: int, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"Describe scene {i} " + "with detail " * i}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def enhance_job() -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "u1", "prompt": "a cat on a roof",
            "metadata": {"enhance": {"max_tokens": 8, "temperature": 1.0}}}


def test_concurrent_chats_answer_exactly_as_alone(chat_worker: WorkerProcess) -> None:
    alone = [chat.delay(request(i, n)).get(timeout=120) for i, n in enumerate(LENGTHS)]
    pending = [chat.delay(request(i, n)) for i, n in enumerate(LENGTHS)]
    together = [p.get(timeout=120) for p in pending]
    for a, b, n in zip(alone, together, LENGTHS, strict=True):
        assert (a["response"], a["prompt_tokens"]) == (b["response"], b["prompt_tokens"])
        assert a["completion_tokens"] == b["completion_tokens"] == n
        assert a["finish_reason"] == b["finish_reason"] == "length"
    running = [int(m) for m in re.findall(r"admitted \(\w+, waited [\d.]+s, (\d+) running\)", chat_worker.text())]
    assert max(running) >= 4, running  # they really decoded together


@pytest.mark.slow
def test_an_enhance_behind_long_chats_joins_at_once_and_finishes_first(chat_worker: WorkerProcess,
                                                                      store: redis.Redis) -> None:
    longs = [chat.delay(request(i, 2048)) for i in range(3)]
    job = enhance_job()
    enhanced = enhance.delay(job).get(timeout=120)
    assert enhanced["metadata"].get("original_prompt") == "a cat on a roof", enhanced["metadata"]
    assert not any(r.ready() for r in longs)  # fewer than N ran: it joined the running batch
    # one process, several jobs: each running message has its live owner record (ended ones keep a short grace)
    live = [key for key in store.scan_iter("ourvidz:owner:*")
            if (store.get(key) or b"").decode().startswith(chat_worker.node) and store.ttl(key) > 300]
    assert len(live) >= 3, live
    for r in longs:
        assert r.get(timeout=600)["completion_tokens"] == 2048


@pytest.mark.slow
def test_enhancements_waiting_in_the_pool_pass_waiting_chats(isolated_broker: str,
                                                             start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker("chat", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"chat2-{new_id()[:6]}",
                 OURVIDZ_CHAT_CONCURRENCY="2", OURVIDZ_CALLBACKS="inline")  # 2 decode, 4 threads
    app = publisher(isolated_broker)

    def send(name: str, arg: Any) -> AsyncResult:
        return app.send_task(name, args=[arg])

    # one user's: the fair order across users keeps them in the order sent, so the pass happens in the pool
    short = send("ourvidz.chat.chat", request(0, 150, user_id="u1"))
    long_b, long_c = (send("ourvidz.chat.chat", request(i, 2048, user_id="u1")) for i in (1, 2))  # C waits: the batch is full
    enhanced = send("ourvidz.chat.enhance", enhance_job())  # waits inside the pool too, published after C
    enhanced.get(timeout=300)
    assert short.ready() and not long_b.ready() and not long_c.ready()  # it took the first free slot, not C
    assert wait_for(lambda: long_c.ready(), 600, what="the long chats")
    assert long_b.get()["completion_tokens"] == long_c.get()["completion_tokens"] == 2048


def publisher(broker: str) -> Celery:
    app = Celery("chat-publisher", set_as_current=False)
    app.config_from_object("ourvidz_tasks.celeryconfig")
    app.conf.update(broker_url=broker, result_backend=broker)
    return app


@pytest.mark.slow
def test_a_request_the_cache_cannot_hold_is_invalid_job_and_the_others_run(
        isolated_broker: str, start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker("chat", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"chatkv-{new_id()[:6]}",
                 OURVIDZ_CHAT_CACHE_TOKENS="512", OURVIDZ_CALLBACKS="inline")
    app = publisher(isolated_broker)
    running = app.send_task("ourvidz.chat.chat", args=[request(0, 400)])
    too_long = app.send_task("ourvidz.chat.chat", args=[request(1, 600)])
    too_big = app.send_task("ourvidz.chat.chat", args=[
        {"messages": [{"role": "user", "content": "describe " * 2000}], "max_tokens": 1}])
    for result, field in ((too_long, "`max_tokens` must be at most"), (too_big, "`messages` take")):
        with pytest.raises(Exception) as info:
            result.get(timeout=120)
        assert str(info.value).startswith(f"INVALID_JOB: {field}"), str(info.value)
    assert running.get(timeout=300)["completion_tokens"] == 400


def test_the_chat_pool_runs_task_threads_for_twice_its_batch() -> None:
    from ourvidz_tasks.contract.settings import load_settings
    from ourvidz_tasks.tools.launcher import worker_argv

    argv = worker_argv("chat", load_settings(chat_concurrency=3), [])
    assert argv[argv.index("--pool") + 1] == "threads" and argv[argv.index("--concurrency") + 1] == "6"
    sdxl = worker_argv("sdxl", load_settings(), [])
    assert sdxl[sdxl.index("--pool") + 1] == "solo"
