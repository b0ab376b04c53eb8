"""ourvidz_tasks.publish: the tasks by name, for publishers without the worker side."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from typing import Any

import redis
from celery import chain

from ourvidz_tasks.contract import names
from ourvidz_tasks.contract.jobs import parse_job
from ourvidz_tasks.contract.settings import load_settings
from ourvidz_tasks.publish import app, chat, enhance, sdxl_generate, wan_generate

from .support.jobs import tiny_job
from .support.process import ROOT


def queued(store: redis.Redis, queue: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in store.lrange(queue, 0, -1)]


def body(message: dict[str, Any]) -> list[Any]:
    decoded: list[Any] = json.loads(base64.b64decode(message["body"]))
    return decoded


def test_each_reference_names_its_task_and_routes_to_its_queue(isolated_broker: str) -> None:
    store = redis.Redis.from_url(isolated_broker)
    job = tiny_job()
    parse_job(job, load_settings())  # what a publisher checks before sending: the pools' own rules
    with app.connection_for_write(isolated_broker) as connection:
        sdxl_generate.apply_async([job], connection=connection)
        wan_generate.apply_async([{**job, "type": "video_fast"}], connection=connection)
        chat.apply_async([{"messages": [{"role": "user", "content": "hi"}]}], connection=connection)
    (sdxl_msg,), (wan_msg,), (chat_msg,) = (queued(store, q) for q in ("sdxl", "wan", "chat"))
    assert sdxl_msg["headers"]["task"] == names.SDXL_GENERATE
    assert wan_msg["headers"]["task"] == names.WAN_GENERATE
    assert chat_msg["headers"]["task"] == names.CHAT_CHAT
    assert body(sdxl_msg)[0] == [job]


def test_a_chain_of_references_carries_the_next_task(isolated_broker: str) -> None:
    store = redis.Redis.from_url(isolated_broker)
    job = tiny_job()
    with app.connection_for_write(isolated_broker) as connection:
        chain(enhance.s(job), sdxl_generate.s()).apply_async(connection=connection)
    (message,) = queued(store, "chat")
    assert message["headers"]["task"] == names.CHAT_ENHANCE
    args, _, embed = body(message)
    assert args == [job]
    assert [link["task"] for link in embed["chain"]] == [names.SDXL_GENERATE]


def test_publishing_loads_no_worker_code() -> None:
    script = ("import sys\nfrom ourvidz_tasks import sdxl_generate, enhance\nsdxl_generate.s({}); enhance.s({})\n"
              "loaded = [m for m in ('ourvidz_tasks.runtime.lifecycle', 'ourvidz_tasks.sdxl', 'torch', 'PIL')"
              " if m in sys.modules]\nprint(loaded)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_every_message_of_our_tasks_names_the_job_id_never_the_prompt(isolated_broker: str) -> None:
    """Whoever sends it (a reference, a chain step sent on by a pool, plain send_task): Flower, the
    task events and the logs show ``argsrepr``, which is the job id only."""
    store = redis.Redis.from_url(isolated_broker)
    job = tiny_job(prompt="a secret harbour prompt")
    with app.connection_for_write(isolated_broker) as connection:
        sdxl_generate.apply_async([job], connection=connection)
        app.send_task(names.WAN_GENERATE, args=[{**job, "type": "video_fast"}], connection=connection)
        chain(enhance.s(job), sdxl_generate.s()).apply_async(connection=connection)
        chat.apply_async([{"messages": [{"role": "user", "content": "a secret chat"}]}], connection=connection)
    messages = [m for queue in ("sdxl", "wan", "chat") for m in queued(store, queue)]
    assert len(messages) == 4
    for message in messages:
        headers = message["headers"]
        assert "secret" not in headers["argsrepr"] and headers["kwargsrepr"] == "{}"
        assert headers["argsrepr"] in (f"({job['id']!r},)", "('?',)")
    assert sum(m["headers"]["argsrepr"] == f"({job['id']!r},)" for m in messages) == 3
