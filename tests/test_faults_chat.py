"""OOM and device faults in the chat pool (chat and enhance), through real worker processes.

A request longer than the model's window is ``INVALID_JOB`` naming the field. Faults come in through the runtime plug-in seam (``tests.faults:inject``), right before the
engine is asked for an answer: out of memory is released and retried once; a CUDA error
exits the worker with 75 and the request is answered by the next worker; a request that
stops its worker every time is given up by the poison guard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult

from .faults import fault_env, fired, set_rules
from .support.cluster import WorkerProcess
from .support.jobs import new_id
from .support.process import wait_for

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture()
def client(isolated_broker: str) -> Iterator[Celery]:
    app = Celery("faults-publisher", set_as_current=False)
    app.config_from_object("ourvidz_tasks.celeryconfig")
    app.conf.update(broker_url=isolated_broker, result_backend=isolated_broker)
    yield app
    app.close()


def ask(client: Celery, **request: Any) -> AsyncResult:
    return client.send_task("ourvidz.chat.chat", args=[{"messages": MESSAGES, "max_tokens": 4, "seed": 1, **request}])


def crash(worker: WorkerProcess, what: str) -> None:
    wait_for(lambda: not worker.alive(), 120, what=f"the chat worker to exit ({what})")
    assert worker.stop() == 75
    assert "device fault" in worker.text()


@pytest.mark.stress
def test_chat_and_enhance_survive_oom_and_device_faults(isolated_broker: str, tmp_path: Path, client: Celery,
                                                        start_worker: Callable[..., WorkerProcess]) -> None:
    rules = tmp_path / "rules.json"
    set_rules(rules)
    env = fault_env(isolated_broker, rules, OURVIDZ_MAX_DELIVERIES="2", OURVIDZ_CALLBACKS="inline",
                    OURVIDZ_CHAT_CACHE_TOKENS="256")  # the model's window here: 256 tokens

    def worker() -> WorkerProcess:
        return start_worker("chat", OURVIDZ_HOSTNAME=f"cf-{new_id()[:6]}", **env)

    first = worker()
    baseline = ask(client).get(timeout=240)

    # longer than the window: refused up front, naming the field, never truncated
    with pytest.raises(Exception, match=r"^INVALID_JOB: `max_tokens` must be at most \d+"):
        ask(client, max_tokens=300).get(timeout=240)
    with pytest.raises(Exception, match=r"^INVALID_JOB: `messages`"):
        ask(client, messages=[{"role": "user", "content": "word " * 400}]).get(timeout=240)

    # out of memory once: released, tried again, the same answer
    set_rules(rules, {"stage": "chat", "error": "oom", "times": 1})
    assert ask(client).get(timeout=240)["response"] == baseline["response"]
    assert [(f["remedy"], f["error"]) for f in fired(rules)] == [("first", "oom")]
    # out of memory twice: OOM_ERROR after Celery's retries, never a crash
    set_rules(rules, {"stage": "chat", "error": "oom"})
    with pytest.raises(Exception, match=r"^OOM_ERROR"):
        ask(client).get(timeout=240)
    assert first.alive()

    # a CUDA error behind a library's exception: exit 75, nothing acked, the next worker answers
    set_rules(rules, {"stage": "chat", "error": "cuda", "times": 1})
    pending = ask(client)
    crash(first, "chat")
    second = worker()
    assert pending.get(timeout=240)["response"] == baseline["response"]

    # the same in an enhancement (it gates a generation): requeued and enhanced by the next worker
    set_rules(rules, {"stage": "enhance", "error": "accelerator", "times": 1})
    job = {"id": new_id(), "type": "sdxl_image_fast", "prompt": "a cat", "metadata": {"enhance": {"max_tokens": 6}}}
    enhanced = client.send_task("ourvidz.chat.enhance", args=[job])
    crash(second, "enhance")
    third = worker()
    result = enhanced.get(timeout=240)
    assert result["metadata"]["original_prompt"] == "a cat" and "enhancement_error" not in result["metadata"]

    # a request that stops its worker every time: two deliveries, then given up (poison guard)
    set_rules(rules, {"stage": "chat", "error": "cuda"})
    poison = ask(client)
    crash(third, "poison 1")
    fourth = worker()
    crash(fourth, "poison 2")
    set_rules(rules)
    fifth = worker()
    with pytest.raises(Exception, match=r"^WORKER_UNAVAILABLE: given up after 2 deliveries"):
        poison.get(timeout=240)
    assert ask(client).get(timeout=240)["response"] == baseline["response"]
    assert fifth.alive()
