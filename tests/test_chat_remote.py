"""The chat tasks answered by an OpenAI-compatible server: a real worker, a local stand-in server."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery

from ourvidz_tasks.runtime.ledger import Ledger

from .chat_server import ChatServer
from .support.cluster import WorkerProcess
from .support.jobs import new_id
from .support.process import wait_for

USER = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "Name a colour."}]


@dataclass
class Remote:
    """The stand-in server, a publisher app, and the chat pool (named ``host``) that uses the server."""

    server: ChatServer
    app: Celery
    host: str
    worker: WorkerProcess


@pytest.fixture()
def remote(isolated_broker: str, start_worker: Callable[..., WorkerProcess]) -> Iterator[Remote]:
    with ChatServer() as server:
        host = f"remote-{new_id()[:6]}"
        worker = start_worker("chat", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=host,
                              OURVIDZ_CALLBACKS="inline", OURVIDZ_CHAT_SERVER_URL=server.url,
                              OURVIDZ_CHAT_SERVER_MEMORY_MB="123",
                              OURVIDZ_CHAT_SERVER_MODELS='{"qwen_instruct": "Qwen/Qwen2.5-7B-Instruct"}')
        app = Celery("remote-publisher", set_as_current=False)
        app.config_from_object("ourvidz_tasks.celeryconfig")
        app.conf.update(broker_url=isolated_broker, result_backend=isolated_broker)
        yield Remote(server, app, host, worker)


def ask(app: Celery, request: dict[str, Any]) -> Any:
    return app.send_task("ourvidz.chat.chat", args=[request]).get(timeout=60)


def test_chat_through_the_server_keeps_the_task_contract(remote: Remote,
                                                         isolated_broker: str) -> None:
    server, app, host = remote.server, remote.app, remote.host
    out = ask(app, {"messages": USER, "max_tokens": 5, "temperature": 0.3, "top_p": 0.8, "seed": 4})
    assert out["response"] == "word word word word word" and out["model"] == "qwen_instruct"
    assert (out["completion_tokens"], out["finish_reason"]) == (5, "length") and out["prompt_tokens"] > 2
    sent = server.seen[-1]
    assert sent["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert sent["prompt"] == ("<|im_start|>system\nAnswer.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
                              "<|im_start|>assistant\n")
    # every sampling parameter explicit: nothing from the server's generation config
    assert (sent["temperature"], sent["top_p"], sent["seed"], sent["max_tokens"]) == (0.3, 0.8, 4, 5)
    assert (sent["top_k"], sent["min_p"], sent["repetition_penalty"]) == (-1, 0.0, 1.0)
    stopped = ask(app, {"messages": [{"role": "user", "content": "STOP here"}], "model": "qwen_base", "max_tokens": 9})
    assert (stopped["finish_reason"], stopped["completion_tokens"]) == ("stop", 2)
    assert server.seen[-1]["model"] == "qwen_base"
    # the ledger reserves the server's declared memory for the pool
    held = Ledger(redis.Redis.from_url(isolated_broker), host, "cpu", 10**6).holders("chat")
    assert held.get("chat/qwen_instruct", 0) >= 123, held


@pytest.mark.parametrize(("content", "max_tokens", "field"), [
    ("short question", 600, "`max_tokens`"),
    ("word " * 600, 5, "`messages`"),
])
def test_a_context_the_server_refuses_is_invalid_job(remote: Remote, content: str,
                                                     max_tokens: int, field: str) -> None:
    app = remote.app
    with pytest.raises(Exception) as info:
        ask(app, {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
    assert str(info.value).startswith(f"INVALID_JOB: {field}"), str(info.value)


def test_enhance_through_the_server(remote: Remote) -> None:
    server, app = remote.server, remote.app
    job = {"id": new_id(), "type": "sdxl_image_fast", "user_id": "u1", "prompt": "a cat",
           "metadata": {"enhance": {"max_tokens": 3, "temperature": 0}}}
    out = app.send_task("ourvidz.chat.enhance", args=[job]).get(timeout=60)
    assert out["prompt"] == "word word word" and out["metadata"]["original_prompt"] == "a cat"
    assert wait_for(lambda: server.seen, what="a request")[-1]["temperature"] == 0.0


def _retries(worker: WorkerProcess, task_id: str) -> list[int]:
    """The countdowns (s) Celery logged for the retries of ``task_id``."""
    return [int(m) for m in re.findall(rf"\[{task_id}\] retry: Retry in (\d+)s", worker.text())]


@pytest.mark.slow
@pytest.mark.stress
def test_the_chat_server_down_then_back(remote: Remote) -> None:
    """An outage of the chat server: a request through all of it retries with backoff and fails as
    ``WORKER_UNAVAILABLE`` once its retries are spent; one whose retry comes after the server is back
    is answered; later requests are answered at once, by the same pool."""
    server, app, worker = remote.server, remote.app, remote.worker
    short = {"messages": USER, "max_tokens": 2}
    assert ask(app, short)["completion_tokens"] == 2
    pid, seen = worker.proc.pid if worker.proc else None, len(server.seen)
    server.down()
    lost = app.send_task("ourvidz.chat.chat", args=[short])
    # every attempt refused: 1 + max_retries (3) tries, countdowns of at most 2, 4, 8 s
    with pytest.raises(Exception) as info:
        lost.get(timeout=60, propagate=True)
    assert str(info.value).startswith("WORKER_UNAVAILABLE: the chat server is unreachable"), str(info.value)
    countdowns = _retries(worker, lost.id)
    assert len(countdowns) == 3 and all(1 <= c <= 2 * 2**n for n, c in enumerate(countdowns)), countdowns
    late = app.send_task("ourvidz.chat.chat", args=[short])
    wait_for(lambda: _retries(worker, late.id), 60, what="the first retry of a request during the outage")
    assert len(server.seen) == seen  # nothing reached the server while it was down
    server.up()
    assert late.get(timeout=60)["completion_tokens"] == 2  # its retry found the server back
    assert 1 <= len(_retries(worker, late.id)) <= 3
    started = time.monotonic()
    after = app.send_task("ourvidz.chat.chat", args=[short])
    assert after.get(timeout=60)["completion_tokens"] == 2 and _retries(worker, after.id) == []
    print(f"outage: {countdowns} s of retries, then failed; a request caught in it retried "
          f"{_retries(worker, late.id)} s; after it, answered in {time.monotonic() - started:.2f}s")
    assert worker.alive() and worker.proc is not None and worker.proc.pid == pid  # the same pool throughout
    assert [b["max_tokens"] for b in server.seen[seen:]] == [2, 2]
