"""The callback outbox: the GPU pool never waits on the edge; an outage loses nothing."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import redis

from ourvidz_tasks.delivery import Delivery
from ourvidz_tasks.settings import Settings
from ourvidz_tasks.sink import Sink

from .conftest import WorkerProcess, new_id, terminal, wait_for
from .wire import publish

OUTAGE = float(os.environ.get("OURVIDZ_TEST_OUTAGE_SECONDS", "10"))


def job() -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a quiet harbour",
            "config": {"resolution": "256x256", "num_inference_steps": 2, "seed": 3}}


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
        time.sleep(max(0.0, OUTAGE - finished_in))
    finally:
        sink.faults()
    for payload in jobs:
        body = terminal(sink, payload["id"], 120)
        assert body["status"] == "completed"
        calls = sink.callbacks(payload["id"])
        statuses = [c["body"]["status"] for c in calls]
        assert statuses[0] == "processing" and statuses[-1] == "completed" and statuses.count("completed") == 1
        assert all(c["signature_ok"] for c in calls)
        progress = [c["body"]["metadata"].get("progress", 0) for c in calls if c["body"]["status"] == "processing"]
        assert progress == sorted(progress)
        wait_for(lambda p=payload: store.exists(f"ourvidz:job:{p['id']}:delivered"), 10, what="the delivered mark")
    print(f"{len(jobs)} jobs finished in {finished_in:.1f}s during a {OUTAGE:.0f}s callback outage; "
          f"all {len(jobs)} terminal callbacks delivered after it, in order")


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
