"""Secrets and prompts stay out of everything an operator or Flower can see.

A private ``redis-server`` with a password is the broker, result backend and bookkeeping
Redis of an SDXL pool and its outbox. Through it run: a long prompt carrying a marker (past
CLIP's 77 tokens, so a truncation warning would quote it), jobs that fail (content policy,
validation), a job retried through a storage outage, and messages that become dead
letters. Then the service key, the callback secret and the broker password must appear
nowhere: worker logs, Celery task events (what Flower shows), dead letters, any Redis
value. The prompt marker must not appear in logs, events, dead-letter reasons, error
messages or result-backend entries; task events carry only the job id as arguments and
hide return values.
"""

from __future__ import annotations

import base64
import json
import pickle
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.contract import keys
from ourvidz_tasks.contract.keys import DEAD_LETTERS
from ourvidz_tasks.services.redact import HIDDEN

from .support.cluster import Pools, RedisServer
from .support.env import KEY, SECRET
from .support.jobs import new_id, terminal
from .support.process import wait_for
from .wire import envelope, publish

TASK = "ourvidz.sdxl.generate"
PASSWORD = "broker-pw-" + uuid.uuid4().hex[:12]
MARKER = "zqxmarker" + uuid.uuid4().hex[:8]  # one token-ish word no log line would contain by chance
FILLER = " ".join(["a quiet harbour with boats and gulls at dawn"] * 12)  # well past 77 CLIP tokens


def job(prompt: str, **fields: Any) -> dict[str, Any]:
    body = {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": prompt,
            "config": {"resolution": "128x128", "num_inference_steps": 2, "seed": 9}}
    body.update(fields)
    return body


class Events:
    """Every Celery event on the broker (what Flower would receive), captured in a thread."""

    def __init__(self, url: str) -> None:
        from celery import Celery

        self.app = Celery("event-capture", broker=url, set_as_current=False)
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _record(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(dict(event))

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self._record})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self) -> Events:
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(10)

    def of(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if kind is None or e.get("type") == kind]


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    yield server
    server.stop()


def redis_values(client: redis.Redis) -> dict[str, str]:
    """Every key's value as text (strings, lists, hashes, sets, sorted sets)."""
    out: dict[str, str] = {}
    for raw_key in client.scan_iter(count=1000):
        key = raw_key.decode("utf-8", "replace")
        kind_raw = client.type(raw_key)
        kind = kind_raw.decode() if isinstance(kind_raw, bytes) else str(kind_raw)
        if kind == "string":
            value: Any = client.get(raw_key)
        elif kind == "list":
            value = client.lrange(raw_key, 0, -1)
        elif kind == "hash":
            value = client.hgetall(raw_key)
        elif kind == "set":
            value = client.smembers(raw_key)
        elif kind == "zset":
            value = client.zrange(raw_key, 0, -1)
        else:
            value = kind
        out[key] = repr(value) if not isinstance(value, bytes) else value.decode("utf-8", "replace")
    return out


@pytest.mark.slow
def test_no_secret_or_prompt_leaks(private_redis: RedisServer, tmp_path: Path, sink: Sink) -> None:
    url = private_redis.url(0)
    client = private_redis.client()
    pools = Pools(sink, tmp_path / "logs")
    events = Events(url)
    try:
        tag = new_id()[:6]
        outbox = pools.start("outbox", OURVIDZ_BROKER_URL=url, OURVIDZ_HOSTNAME=f"secrets-outbox-{tag}")
        worker = pools.start("sdxl", OURVIDZ_BROKER_URL=url, OURVIDZ_HOSTNAME=f"secrets-sdxl-{tag}")
        events.start()
        wait_for(lambda: events.of("worker-heartbeat"), 30, what="the event receiver to hear the workers")

        long_prompt = f"{MARKER} {FILLER} {MARKER}"
        ok = job(long_prompt, negative_prompt=f"blurry {MARKER}")
        refused = job(f"a naked child, {MARKER}")
        too_long = job(f"{MARKER} " * 2000)
        retried = job(f"a retried {MARKER}")
        no_id = {**job(f"no id {MARKER}"), "id": "bad id!"}
        jobs = {"ok": ok, "refused": refused, "too_long": too_long}
        for payload in jobs.values():
            publish(client, TASK, payload, "sdxl")
        publish(client, TASK, no_id, "sdxl")
        # a raw prompt that is no envelope, and a pickled "task" carrying one
        client.lpush("sdxl", f"not json {MARKER}")
        pickled = envelope(TASK, [], "sdxl")
        pickled.update({"content-type": "application/x-python-serialize",
                        "body": base64.b64encode(pickle.dumps([[{"prompt": MARKER}], {}, {}])).decode()})
        client.lpush("sdxl", json.dumps(pickled))
        bodies = {name: terminal(sink, payload["id"], 180) for name, payload in jobs.items()}

        sink.faults(storage=503)
        try:
            publish(client, TASK, retried, "sdxl")
            wait_for(lambda: events.of("task-retried"), 60, what="a retry")
        finally:
            sink.faults()
        bodies["retried"] = terminal(sink, retried["id"], 180)
        wait_for(lambda: client.llen(DEAD_LETTERS) >= 3, 30, what="three dead letters")
        wait_for(lambda: all(client.exists(keys.job_delivered(p["id"])) for p in (*jobs.values(), retried)),
                 60, what="every terminal callback delivered")
        time.sleep(3)  # the last events and log lines
    finally:
        events.stop()
        pools.stop()

    assert bodies["ok"]["status"] == "completed", bodies["ok"]
    assert bodies["refused"]["error"]["code"] == "INVALID_PROMPT"
    assert bodies["too_long"]["error"]["code"] == "INVALID_JOB"
    assert bodies["retried"]["status"] == "completed" and bodies["retried"]["metadata"]["attempt"] >= 2

    logs = {"sdxl log": worker.text(), "outbox log": outbox.text()}
    dead = [json.loads(e) for e in client.lrange(DEAD_LETTERS, 0, -1)]
    stored = redis_values(client)
    backend = {k: v for k, v in stored.items() if k.startswith("celery-task-meta-")}
    seen = events.of()
    secrets = {"service key": KEY, "callback secret": SECRET, "broker password": PASSWORD}

    leaks: list[str] = []
    for what, text in logs.items():
        leaks += [f"{name} in the {what}" for name, value in secrets.items() if value in text]
        if MARKER in text:
            line = next(ln for ln in text.splitlines() if MARKER in ln)
            leaks.append(f"the prompt in the {what}: {line[:200]!r}")
    for event in seen:
        text = json.dumps(event, default=str)
        leaks += [f"{name} in a {event['type']} event" for name, value in secrets.items() if value in text]
        if MARKER in text:
            leaks.append(f"the prompt in a {event['type']} event: {text[:300]}")
    for entry in dead:
        text = json.dumps(entry)
        leaks += [f"{name} in a dead letter" for name, value in secrets.items() if value in text]
        if MARKER in entry["reason"]:
            leaks.append(f"the prompt in a dead letter's reason: {entry['reason'][:200]!r}")
    for key, text in stored.items():
        leaks += [f"{name} in Redis key {key}" for name, value in secrets.items() if value in text]
    for key, text in backend.items():
        if MARKER in text:
            leaks.append(f"the prompt in result backend entry {key}: {text[:200]!r}")
    for name, body in bodies.items():
        if MARKER in json.dumps(body):
            leaks.append(f"the prompt in the {name} job's callback body")

    # task events name only the job id; results are hidden
    job_ids = {p["id"] for p in (*jobs.values(), retried)}
    for event in seen:
        if event["type"] in ("task-received", "task-sent"):
            args = event.get("args")
            if not (args in {repr((i,)) for i in job_ids} or args == repr((no_id["id"],)) or args == "()"):
                leaks.append(f"{event['type']} args {str(args)[:200]!r}")
            if event.get("kwargs") not in ("{}", None):
                leaks.append(f"{event['type']} kwargs {str(event.get('kwargs'))[:200]!r}")
        if event["type"] == "task-succeeded" and event.get("result") != HIDDEN:
            leaks.append(f"task-succeeded result shown: {str(event.get('result'))[:200]!r}")

    carriers = sorted(k for k, v in stored.items() if MARKER in v)
    kinds = Counter(e["type"] for e in seen)
    print(f"{len(seen)} task events {dict(kinds)}, {sum(len(t) for t in logs.values())} log chars, "
          f"{len(dead)} dead letters, {len(stored)} Redis keys ({len(backend)} result-backend entries): "
          f"{len(leaks)} leaks; Redis keys that still hold the prompt (by design: dead letters' raw, queues): "
          f"{carriers}")
    assert not leaks, "\n".join(leaks)
    assert kinds["task-received"] >= 5 and kinds["task-retried"] >= 1 and kinds["task-succeeded"] >= 5
