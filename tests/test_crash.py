"""Crash safety on Redis: SIGKILL mid-job, poison messages, without waiting for visibility_timeout."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis

from ourvidz_tasks.sink import Sink

from .conftest import WorkerProcess, new_id, terminal, wait_for
from .faults import MARKER
from .wire import publish

FAST = {"OURVIDZ_LEASE_SECONDS": "2", "OURVIDZ_PROMPT_POLICY": "tests.faults:kill_on_marker"}


def slow_job(steps: int = 30) -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a slow lighthouse",
            "config": {"resolution": "512x512", "num_inference_steps": steps, "seed": 1}}


def processing_worker(sink: Sink, job_id: str) -> str | None:
    for call in sink.callbacks(job_id):
        if call["body"]["status"] == "processing":
            return str(call["body"]["worker_id"])
    return None


@pytest.mark.slow
def test_sigkill_mid_job_is_redelivered_and_finishes_once(isolated_broker: str, start_worker: Callable[..., WorkerProcess],
                                                         sink: Sink) -> None:
    store = redis.Redis.from_url(isolated_broker)
    workers = {w.node: w for w in (
        start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"crash-a-{new_id()[:6]}", **FAST),
        start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"crash-b-{new_id()[:6]}", **FAST),
    )}
    job = slow_job()
    publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    victim = wait_for(lambda: processing_worker(sink, job["id"]), 60, what="processing")
    killed_at = time.time()
    workers[victim].stop(signal.SIGKILL)
    body = terminal(sink, job["id"], 120)
    recovered_in = time.time() - killed_at
    assert body["status"] == "completed" and body["worker_id"] != victim
    statuses = Counter(c["body"]["status"] for c in sink.callbacks(job["id"]))
    assert statuses["completed"] == 1 and statuses["failed"] == 0
    assert recovered_in < 60  # seconds, not the hours of visibility_timeout
    print(f"recovered in {recovered_in:.1f}s")


@pytest.mark.slow
def test_n_jobs_k_random_kills_no_loss_no_duplicates(isolated_broker: str,
                                                     start_worker: Callable[..., WorkerProcess], sink: Sink) -> None:
    store = redis.Redis.from_url(isolated_broker)
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, **FAST)
    workers = [start_worker("sdxl", OURVIDZ_HOSTNAME=f"kill-{i}-{new_id()[:6]}", **env) for i in range(2)]
    jobs = [slow_job(steps=12) for _ in range(8)]
    for job in jobs:
        publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        time.sleep(rng.uniform(2, 5))
        busy = [w for w in workers if w.alive()]
        victim = rng.choice(busy)
        victim.stop(signal.SIGKILL)
        kills += 1
        workers.remove(victim)
        workers.append(start_worker("sdxl", OURVIDZ_HOSTNAME=f"kill-r{kills}-{new_id()[:6]}", **env))
    bodies = [terminal(sink, job["id"], 300) for job in jobs]
    terminals = Counter()
    for job in jobs:
        for call in sink.callbacks(job["id"]):
            if call["body"]["status"] in ("completed", "failed"):
                terminals[job["id"]] += 1
    assert [b["status"] for b in bodies] == ["completed"] * len(jobs)
    assert set(terminals.values()) == {1}
    print(f"{len(jobs)} jobs, {kills} SIGKILLs: {len(bodies)} completed, {sum(terminals.values())} terminal callbacks")


@pytest.mark.slow
def test_poison_job_is_given_up_after_n_deliveries(isolated_broker: str, start_worker: Callable[..., WorkerProcess],
                                                   sink: Sink) -> None:
    store = redis.Redis.from_url(isolated_broker)
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_MAX_DELIVERIES="2", **FAST)
    job = {**slow_job(steps=2), "prompt": f"a {MARKER} prompt"}
    publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    started = 0
    deadline = time.time() + 240
    while time.time() < deadline and not any(c["body"]["status"] == "failed" for c in sink.callbacks(job["id"])):
        worker = start_worker("sdxl", OURVIDZ_HOSTNAME=f"poison-{started}-{new_id()[:6]}", **env)
        started += 1
        wait_for(lambda w=worker: not w.alive() or any(c["body"]["status"] == "failed"
                                                        for c in sink.callbacks(job["id"])), 60, what="a crash")
        if not worker.alive():
            assert worker.stop() == -signal.SIGKILL
    body = terminal(sink, job["id"], 5)
    assert body["status"] == "failed" and "given up after 2 deliveries" in body["error"]["message"]
    assert started == 3  # two deliveries killed a worker, the third gave up
    survivor = start_worker("sdxl", OURVIDZ_HOSTNAME=f"after-{new_id()[:6]}", **env)
    ok = slow_job(steps=2)
    publish(store, "ourvidz.sdxl.generate", ok, "sdxl")
    assert terminal(sink, ok["id"], 120)["status"] == "completed"
    assert survivor.alive()


@pytest.mark.slow
def test_device_fault_exits_the_worker_and_requeues_the_job(isolated_broker: str, tmp_path,
                                                            start_worker: Callable[..., WorkerProcess],
                                                            sink: Sink) -> None:
    from .faults import DEVICE_FAULT

    store = redis.Redis.from_url(isolated_broker)
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_LEASE_SECONDS="2",
               OURVIDZ_PROMPT_POLICY="tests.faults:cuda_fault_once", OURVIDZ_TEST_FAULT_FLAG=str(tmp_path / "faulted"))
    first = start_worker("sdxl", OURVIDZ_HOSTNAME=f"fault-{new_id()[:6]}", **env)
    job = {**slow_job(steps=2), "prompt": f"a {DEVICE_FAULT} prompt"}
    publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    wait_for(lambda: not first.alive(), 60, what="the worker to exit")
    assert first.stop() == 75
    start_worker("sdxl", OURVIDZ_HOSTNAME=f"clean-{new_id()[:6]}", **env)  # what the supervisor does
    body = terminal(sink, job["id"], 120)
    assert body["status"] == "completed"
    assert [c["body"]["status"] for c in sink.callbacks(job["id"])].count("completed") == 1


@pytest.mark.slow
def test_sigterm_lets_the_running_job_finish(isolated_broker: str, start_worker: Callable[..., WorkerProcess],
                                             sink: Sink) -> None:
    store = redis.Redis.from_url(isolated_broker)
    worker = start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"term-{new_id()[:6]}")
    job = slow_job(steps=20)
    publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    wait_for(lambda: processing_worker(sink, job["id"]), 60, what="processing")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(120) == 0
    assert terminal(sink, job["id"], 30)["status"] == "completed"
