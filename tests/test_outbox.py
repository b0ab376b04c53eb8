"""Callbacks with the pools alone: delivered at once, an outage waited out in the outbox, in order; nothing lost."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.contract.settings import Settings
from ourvidz_tasks.services.delivery import Delivery
from ourvidz_tasks.services.guard import DeadLetters
from ourvidz_tasks.services.outbox_store import CONSUMER, LIST
from ourvidz_tasks.services.outbox_store import JOBS as OUTBOX_JOBS

from .support.cluster import WorkerProcess
from .support.env import KEY, SECRET
from .support.jobs import new_id, terminal
from .support.process import wait_for
from .wire import publish

OUTAGE = float(os.environ.get("OURVIDZ_TEST_OUTAGE_SECONDS", "10"))


def job() -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a quiet harbour",
            "config": {"resolution": "256x256", "num_inference_steps": 2, "seed": 3}}


def _arrivals(sink: Sink, jobs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    ids = {j["id"] for j in jobs}
    return [(c["body"]["job_id"], c["body"]["status"]) for c in sink.callbacks() if c["body"]["job_id"] in ids]


def assert_in_order(sink: Sink, jobs: list[dict[str, Any]], terminal_status: dict[str, str] | None = None,
                    *, one_after_another: bool = True) -> None:
    """Every job: ``processing`` first, attempts and progress rising, exactly one terminal and it comes last,
    all signed; and (``one_after_another``: jobs that one solo pool ran one after the other, no retries)
    the jobs arrive one after the other, in publish order."""
    for payload in jobs:
        calls = sink.callbacks(payload["id"])
        statuses = [c["body"]["status"] for c in calls]
        want = (terminal_status or {}).get(payload["id"], "completed")
        assert statuses[0] == "processing" and statuses[-1] == want, statuses
        assert statuses.count("completed") + statuses.count("failed") == 1, statuses
        assert all(c["signature_ok"] for c in calls)
        progress = [(c["body"]["metadata"]["attempt"], c["body"]["metadata"].get("progress", 0))
                    for c in calls if c["body"]["status"] == "processing"]
        assert progress == sorted(progress), progress
    if not one_after_another:
        return
    arrived = [job_id for job_id, _ in _arrivals(sink, jobs)]
    runs = [job_id for i, job_id in enumerate(arrived) if i == 0 or arrived[i - 1] != job_id]
    assert runs == [j["id"] for j in jobs], "jobs arrived out of order or interleaved"


def test_the_pools_alone_deliver_every_callback(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    """CONTRACT section 5: `bin/worker sdxl` with nothing else running is a complete deployment."""
    assert not store.exists(CONSUMER)  # no `bin/worker outbox` on this broker
    jobs = [job() for _ in range(3)]
    bad = {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "x",
           "config": {"num_inference_steps": "x"}}
    for payload in [*jobs, bad]:
        publish(store, "ourvidz.sdxl.generate", payload, "sdxl")
    for payload in [*jobs, bad]:
        terminal(sink, payload["id"], 120)
    assert_in_order(sink, [*jobs, bad], {bad["id"]: "failed"})
    for payload in [*jobs, bad]:
        wait_for(lambda p=payload: store.exists(f"ourvidz:job:{p['id']}:delivered"), 10, what="the delivered mark")
    assert store.llen(LIST) == 0


@pytest.mark.slow
def test_callbacks_wait_out_an_outage_and_arrive_in_order(sdxl_worker: WorkerProcess, store: redis.Redis,
                                                          sink: Sink) -> None:
    jobs = [job() for _ in range(4)]
    sink.faults(callback=503)
    try:
        down_at = time.time()
        for payload in jobs:
            publish(store, "ourvidz.sdxl.generate", payload, "sdxl")
        # the pool finishes every job while the edge is down: it never waits on callbacks
        wait_for(lambda: all(store.exists(f"ourvidz:job:{j['id']}:final") for j in jobs), 120, what="jobs to end")
        finished_in = time.time() - down_at
        assert all(sink.callbacks(j["id"]) == [] for j in jobs)
        assert store.llen(LIST) >= 2 * len(jobs)  # every body waits, durably, in Redis
        time.sleep(max(0.0, OUTAGE - finished_in))
    finally:
        sink.faults()
    for payload in jobs:
        assert terminal(sink, payload["id"], 120)["status"] == "completed"
        wait_for(lambda p=payload: store.exists(f"ourvidz:job:{p['id']}:delivered"), 10, what="the delivered mark")
    assert_in_order(sink, jobs)
    print(f"{len(jobs)} jobs finished in {finished_in:.1f}s during a {OUTAGE:.0f}s callback outage; "
          f"all {len(jobs)} terminal callbacks delivered after it, in order")


@pytest.mark.slow
def test_an_edge_down_then_up_gets_every_callback_in_order_from_the_pool_alone(
        start_worker: Callable[..., WorkerProcess], isolated_broker: str, tmp_path: Path) -> None:
    """The edge's host is gone (connection refused), then back on the same address: no outbox consumer runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    edge = Sink(tmp_path / "edge", KEY, SECRET, port=port).start()
    store = redis.Redis.from_url(isolated_broker)
    pool = start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, SUPABASE_URL=edge.url,
                 OURVIDZ_HOSTNAME=f"edge-down-{new_id()[:6]}")
    edge.stop()  # Supabase is gone: storage and the callback endpoint
    jobs = [job() for _ in range(3)]
    for payload in jobs:
        publish(store, "ourvidz.sdxl.generate", payload, "sdxl")
    # each job computed, found storage down and waits for its retry; its callbacks wait in the outbox
    wait_for(lambda: all(f"job {j['id']}: WORKER_UNAVAILABLE, retry" in pool.text() for j in jobs), 120,
             what="every job to meet the outage")
    assert store.llen(LIST) >= len(jobs) and not store.exists(CONSUMER)
    # what waits, in the order it was handed over: the edge must get exactly this first, across jobs
    waiting = [json.loads(json.loads(raw)["body"]) for raw in store.lrange(LIST, 0, -1)]
    assert {b["job_id"] for b in waiting} == {j["id"] for j in jobs}
    edge = Sink(tmp_path / "edge", KEY, SECRET, port=port).start()
    try:
        for payload in jobs:
            assert terminal(edge, payload["id"], 120)["status"] == "completed"
        for payload in jobs:
            wait_for(lambda p=payload: store.exists(f"ourvidz:job:{p['id']}:delivered"), 10, what="the mark")
        assert_in_order(edge, jobs, one_after_another=False)
        arrived = [c["body"] for c in edge.callbacks()]
        assert arrived[:len(waiting)] == waiting, "the outbox was not delivered in the order it was filled"
        assert all(len({c["body"]["metadata"]["attempt"] for c in edge.callbacks(j["id"])}) > 1 for j in jobs)
        assert store.llen(LIST) == 0
    finally:
        edge.stop()


def test_replay_resends_the_last_callback(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    payload = job()
    publish(store, "ourvidz.sdxl.generate", payload, "sdxl")
    first = terminal(sink, payload["id"])
    delivery = Delivery(Settings(SUPABASE_URL=sink.url, callbacks="inline"), "cli", store)
    try:
        assert delivery.replay(payload["id"])
        assert not delivery.replay("no-such-job")
    finally:
        delivery.close()
    finals = [c["body"] for c in sink.callbacks(payload["id"]) if c["body"]["status"] == "completed"]
    assert len(finals) == 2 and finals[1]["metadata"]["callback_id"] == first["metadata"]["callback_id"]


def test_a_storage_outage_loses_nothing_and_computes_once(sdxl_worker: WorkerProcess, store: redis.Redis,
                                                          sink: Sink) -> None:
    payload = job()
    sink.faults(storage=503)
    try:
        publish(store, "ourvidz.sdxl.generate", payload, "sdxl")
        wait_for(lambda: f"job {payload['id']}: WORKER_UNAVAILABLE, retry" in sdxl_worker.text(), 60,
                 what="the retry after the outage")
    finally:
        sink.faults()
    body = terminal(sink, payload["id"], 120)
    assert body["status"] == "completed" and body["metadata"]["resumed_from_spool"] is True
    assert body["metadata"]["attempt"] == 2 and body["assets"][0]["thumbnail_url"]
    assert [c["body"]["status"] for c in sink.callbacks(payload["id"])].count("completed") == 1
    assert f"job {payload['id']}: resumed 1 asset(s) from the spool" in sdxl_worker.text()


def test_a_callback_the_edge_refuses_is_a_dead_letter(sdxl_worker: WorkerProcess, store: redis.Redis,
                                                      sink: Sink) -> None:
    """HTTP 400 for good, the pools alone (no outbox consumer): each refused body lands in ``ourvidz:dead``,
    where ``ourvidz dead`` lists it; the terminal one stays recorded for ``ourvidz replay``."""
    assert not store.exists(CONSUMER)
    payload = job()

    def letters() -> list[dict[str, Any]]:
        return [e for e in DeadLetters(store).entries() if e["job_id"] == payload["id"]]

    sink.faults(callback=400)
    try:
        publish(store, "ourvidz.sdxl.generate", payload, "sdxl")
        wait_for(lambda: store.exists(f"ourvidz:job:{payload['id']}:final"), 120, what="the job to end")
        wait_for(lambda: any(json.loads(e["raw"])["status"] == "completed" for e in letters()), 10,
                 what="the refused terminal callback as a dead letter")
    finally:
        sink.faults()
    assert sink.callbacks(payload["id"]) == []  # the edge took none of them
    statuses = [json.loads(e["raw"])["status"] for e in reversed(letters())]
    assert statuses[0] == "processing" and statuses.count("completed") == 1, statuses
    assert all(e["reason"].startswith("callback refused by the edge") and "HTTP 400" in e["reason"]
               for e in letters())
    assert not store.hexists(OUTBOX_JOBS, payload["id"])  # refused for good: not waiting in the outbox
    listed = subprocess.run([sys.executable, "-m", "ourvidz_tasks.tools.cli", "dead", "--json"],
                            capture_output=True, text=True, check=True).stdout
    assert [e["job_id"] for e in json.loads(listed)].count(payload["id"]) == len(statuses)
    text = subprocess.run([sys.executable, "-m", "ourvidz_tasks.tools.cli", "dead"],
                          capture_output=True, text=True, check=True).stdout
    assert f"job {payload['id']}" in text and "callback refused by the edge" in text
    # the edge takes it again: the recorded terminal callback is replayed as it was
    replay = subprocess.run([sys.executable, "-m", "ourvidz_tasks.tools.cli", "replay", payload["id"]],
                            env={**os.environ, "SUPABASE_URL": sink.url}, capture_output=True, text=True)
    assert replay.returncode == 0, replay.stderr
    assert terminal(sink, payload["id"], 10)["status"] == "completed"
