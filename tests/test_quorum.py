"""RabbitMQ quorum queues (``OURVIDZ_AMQP_QUEUE_TYPE=quorum``) on the local single-node RabbitMQ.

In a vhost of its own (made with ``rabbitmqctl``, so the classic queues of
tests/test_brokers.py are untouched), a real SDXL pool declares its queues as
quorum queues with a delivery limit; it consumes without global QoS (RabbitMQ
refuses global QoS on quorum queues), a countdown waits in Celery's native
delayed-delivery queues rather than in the worker, a retry goes the same way,
and a job that kills every worker still ends with the poison guard's ``failed``
callback before RabbitMQ's delivery limit would drop it silently. Cluster
failover cannot be shown on one node (docs/brokers.md).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from devtools.sink import Sink

from .faults import MARKER, RULES_ENV, fired, set_rules
from .support.cluster import Pools, WorkerProcess
from .support.env import AMQP, BROKER, amqp_reachable, worker_env
from .support.jobs import new_id, terminal, terminal_counts, tiny_job
from .support.process import ROOT, wait_for
from .support.rabbit import RABBITMQCTL, ctl, fresh_vhost, url

VHOST = "ourvidz_quorum_test"
URL = url(VHOST)
MAX_DELIVERIES = 2  # the guard's; the queues' x-delivery-limit is this + 2
TASK = "ourvidz.sdxl.generate"

pytestmark = [
    pytest.mark.skipif(not amqp_reachable(), reason=f"no RabbitMQ at {AMQP}"),
    pytest.mark.skipif(not RABBITMQCTL, reason="rabbitmqctl is needed to make a vhost for the quorum queues"),
]

#: a Python publisher as deployed: the project's Celery app, configured from the environment
_PUBLISH = (
    "import json, sys\n"
    "from ourvidz_tasks.celery import app\n"
    "job = json.loads(sys.argv[1])\n"
    "countdown = float(sys.argv[2]) or None\n"
    "print(app.send_task('ourvidz.sdxl.generate', args=[job], countdown=countdown,\n"
    "                    argsrepr=repr((job['id'],)), kwargsrepr='{}').id)\n"
)


#: Celery's native delayed delivery: a message with a countdown is published to the top level of its
#: delay exchanges (one per bit of the delay), which dead-letter it down to ``celery_delayed_delivery``
DELAYED_EXCHANGE = "celery_delayed_27"


@contextmanager
def traced_publishes(exchange: str) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """RabbitMQ's firehose (``rabbitmqctl trace_on``) for the test vhost: a function returning the task
    messages published to ``exchange`` so far, as ``{"id", "retries", "routing_key"}`` (the trace's own
    routing key names the exchange as the publisher wrote it; its ``exchange_name`` header is exact)."""
    from kombu import Connection

    ctl("trace_on", "-p", VHOST)
    seen: list[dict[str, Any]] = []
    try:
        with Connection(URL, connect_timeout=10) as conn:
            channel = conn.default_channel
            queue = channel.queue_declare(queue="", exclusive=True, auto_delete=True).queue
            channel.queue_bind(queue=queue, exchange="amq.rabbitmq.trace", routing_key="publish.#")

            def published() -> list[dict[str, Any]]:
                while (msg := channel.basic_get(queue=queue, no_ack=True)) is not None:
                    trace = msg.properties.get("application_headers") or {}
                    headers = (trace.get("properties") or {}).get("headers") or {}
                    if _text(trace.get("exchange_name")) == exchange:
                        seen.append({"id": headers.get("id"), "retries": headers.get("retries"),
                                     "routing_key": _text((trace.get("routing_keys") or [""])[0])})
                return list(seen)

            yield published
    finally:
        ctl("trace_off", "-p", VHOST)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def env(**extra: str) -> dict[str, str]:
    return dict(OURVIDZ_BROKER_URL=URL, OURVIDZ_RESULT_BACKEND=BROKER, OURVIDZ_REDIS_URL=BROKER,
                OURVIDZ_AMQP_QUEUE_TYPE="quorum", OURVIDZ_MAX_DELIVERIES=str(MAX_DELIVERIES), **extra)


def send(sink: Sink, job: dict[str, Any], countdown: float = 0) -> str:
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", _PUBLISH, json.dumps(job), str(countdown)],
                         cwd=ROOT, env=worker_env(sink, "publisher", **env()), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def queues() -> dict[str, tuple[str, int, str]]:
    """name -> (type, messages ready + unacknowledged, arguments) in the test vhost."""
    return {name: (kind, int(messages), arguments)
            for name, kind, messages, arguments in ctl("list_queues", "-p", VHOST, "name", "type", "messages",
                                                       "arguments")}


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    """A fresh vhost (queues are declared by the first worker, with this module's delivery limit)."""
    with fresh_vhost(VHOST) as name:
        yield name


@pytest.mark.slow
@pytest.mark.stress
def test_quorum_queues_without_global_qos_and_native_delayed_retries(vhost: str, pools: Pools, sink: Sink,
                                                                      tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    set_rules(rules)
    worker: WorkerProcess = pools.start("sdxl", OURVIDZ_HOSTNAME=f"quorum-{new_id()[:6]}",
                                        **env(OURVIDZ_RUNTIME_PLUGINS="tests.faults:inject", **{RULES_ENV: str(rules)}))
    declared = queues()
    kind, _, arguments = declared["sdxl"]
    assert kind == "quorum" and f'{{"x-delivery-limit",{MAX_DELIVERIES + 2}}}' in arguments, declared
    # Celery's native delayed delivery: its quorum queues, and our queue bound to its exchange
    assert any(name.startswith("celery_delayed_") for name in declared), declared
    bindings = ctl("list_bindings", "-p", VHOST, "source_name", "destination_name", "routing_key")
    for family in ("sdxl", "chat", "wan", "outbox"):  # every queue, not only the one this pool consumes
        assert ["celery_delayed_delivery", "ourvidz", f"#.{family}"] in bindings, bindings
        assert ["ourvidz", family, f"#.{family}"] in bindings, bindings
    assert "Failed to bind" not in worker.text() and "will not be available" not in worker.text()
    # no global QoS on any channel of the vhost; the pool's consumer has its own prefetch of 1
    channels = [row for row in ctl("list_channels", "vhost", "global_prefetch_count", "prefetch_count")
                if row[0] == VHOST]
    assert channels and all(row[1] == "0" for row in channels), channels
    # the pool's Celery consumer takes the ready queue one at a time; its fair relay takes sdxl in
    # batches (docs/fairness.md)
    consumers = ctl("list_consumers", "-p", VHOST, "queue_name", "prefetch_count")
    assert ["sdxl.fair", "1"] in consumers and ["sdxl", "64"] in consumers, consumers

    # a plain job
    plain = tiny_job()
    send(sink, plain)
    assert terminal(sink, plain["id"], 180)["status"] == "completed"

    # a countdown waits in RabbitMQ's delayed-delivery queues, not in the worker nor in sdxl
    # (quorum queues report their counts every few seconds: poll, well inside the countdown)
    countdown = 30.0
    delayed = tiny_job()
    published = time.time()
    send(sink, delayed, countdown)

    def held_by_rabbitmq() -> dict[str, tuple[str, int, str]] | None:
        waiting = queues()
        in_delay = sum(n for name, (_, n, _) in waiting.items() if name.startswith("celery_delayed_"))
        return waiting if in_delay == 1 and waiting["sdxl"][1] == 0 else None

    wait_for(held_by_rabbitmq, countdown / 2, 1, "the countdown message in celery_delayed_*")
    assert not sink.callbacks(delayed["id"])  # seen waiting there before the pool had it
    body = terminal(sink, delayed["id"], 180 + countdown)
    first = min(c["at"] for c in sink.callbacks(delayed["id"]))
    assert body["status"] == "completed" and first >= published + countdown - 2

    # a retry (out of memory on every remedy, once): raised with a countdown, it goes the same way: RabbitMQ's
    # own trace of what was published shows the retry (same task id, retries 1) sent to the delayed exchange
    set_rules(rules, {"stage": "txt2img", "error": "oom", "times": 3})
    retried = tiny_job()
    with traced_publishes(DELAYED_EXCHANGE) as published_delayed:
        task_id = send(sink, retried)
        body = terminal(sink, retried["id"], 240)
        assert body["status"] == "completed" and body["metadata"]["attempt"] == 2, body
        assert len(fired(rules)) == 3
        retries = wait_for(lambda: [p for p in published_delayed() if p["id"] == task_id], 10, 0.2,
                           "the retry published to the delayed exchange")
    assert [(p["retries"], p["routing_key"].rsplit(".", 1)[-1]) for p in retries] == [(1, "sdxl")], retries
    assert terminal_counts(sink, [plain["id"], delayed["id"], retried["id"]]) == \
        {plain["id"]: 1, delayed["id"]: 1, retried["id"]: 1}
    assert "Global QoS is disabled" in worker.text()


@pytest.mark.slow
@pytest.mark.stress
def test_quorum_poison_job_ends_with_the_guards_failed_callback(vhost: str, pools: Pools, sink: Sink) -> None:
    """The guard gives up after ``MAX_DELIVERIES``, before the queue's delivery limit drops the message."""
    job = tiny_job(prompt=f"a {MARKER} prompt")
    poison = env(OURVIDZ_PROMPT_POLICY="tests.faults:kill_on_marker")
    tag = new_id()[:6]
    started = 0

    def failed() -> bool:
        return any(c["body"]["status"] == "failed" for c in sink.callbacks(job["id"]))

    while started < MAX_DELIVERIES + 2 and not failed():
        worker = pools.start("sdxl", OURVIDZ_HOSTNAME=f"quorum-poison-{started}-{tag}", **poison)
        if started == 0:
            send(sink, job)
        started += 1
        wait_for(lambda w=worker: not w.alive() or failed(), 120, what="a crash or the give-up")
    body = terminal(sink, job["id"], 10)
    print(f"quorum poison job: {started} workers started, {body['status']}: {body['error']['message']}")
    assert body["status"] == "failed" and f"given up after {MAX_DELIVERIES} deliveries" in body["error"]["message"]
    assert started == MAX_DELIVERIES + 1
    assert terminal_counts(sink, [job["id"]])[job["id"]] == 1
