"""Crash safety on Redis: SIGKILL mid-job, poison messages, without waiting for visibility_timeout.

Pools come back the way systemd, docker-compose (``restart: unless-stopped``) and Kubernetes
bring them back: under the same node name, at once or after a delay. The owner of a message
is one process incarnation, so the new process hands back what its dead predecessor held.
"""

from __future__ import annotations

import base64
import json
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.contract.settings import load_settings

from .faults import MARKER
from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal
from .support.process import wait_for
from .wire import publish

LEASE = 2.0
FAST = {"OURVIDZ_LEASE_SECONDS": f"{LEASE:g}", "OURVIDZ_PROMPT_POLICY": "tests.faults:kill_on_marker"}
#: a supervisor's restart delay long enough for the dead process's heartbeat to expire
DELAY = 3 * LEASE


def slow_job(steps: int = 30) -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a slow lighthouse",
            "config": {"resolution": "512x512", "num_inference_steps": steps, "seed": 1}}


def processing_worker(sink: Sink, job_id: str) -> str | None:
    for call in sink.callbacks(job_id):
        if call["body"]["status"] == "processing":
            return str(call["body"]["worker_id"])
    return None


def statuses(sink: Sink, job_id: str) -> list[str]:
    return [c["body"]["status"] for c in sink.callbacks(job_id)]


def runs(sink: Sink, job_id: str) -> int:
    """How many times the job started: one ``processing`` callback without progress per run."""
    return sum(c["body"]["status"] == "processing" and "progress" not in (c["body"].get("metadata") or {})
               for c in sink.callbacks(job_id))


def running_job(store: redis.Redis, node: str) -> str | None:
    """The id of the job the live incarnation of ``node`` holds now (its message is unacked, owned by it,
    and the job has not ended), read from the broker; None if it holds none."""
    incarnation = store.get(f"ourvidz:incarnation:{node}")
    identity = f"{node}/{incarnation.decode()}".encode() if incarnation else node.encode()  # older: the node
    for tag, raw in store.hgetall("unacked").items():
        if store.get(b"ourvidz:owner:" + tag) != identity:
            continue
        payload = json.loads(raw)[0]
        job_id = json.loads(base64.b64decode(payload["body"]))[0][0]["id"]
        if not store.exists(f"ourvidz:job:{job_id}:final"):
            return str(job_id)
    return None


def reclaimed_before_ready(worker: WorkerProcess) -> bool:
    """The restarted process handed back its predecessor's message before it took any job."""
    text = worker.text()
    return "earlier incarnation" in text and text.index("earlier incarnation") < text.index(f"{worker.node} ready.")


@pytest.mark.slow
@pytest.mark.stress
@pytest.mark.parametrize("delay", [0.0, DELAY], ids=["at-once", "after-delay"])
def test_sigkill_mid_job_restarted_under_the_same_name_finishes_once(
        delay: float, isolated_broker: str, start_worker: Callable[..., WorkerProcess], sink: Sink) -> None:
    """The only pool is killed mid-job and its supervisor restarts it as the same ``sdxl@host``.

    Before owners were incarnations, the new process's heartbeat made the dead one's message look
    owned by a live worker: stranded until ``visibility_timeout`` (hours).
    """
    store = redis.Redis.from_url(isolated_broker)
    name = f"crash-{new_id()[:6]}"
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, **FAST)
    worker = start_worker("sdxl", OURVIDZ_HOSTNAME=name, **env)
    job = slow_job()
    publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    wait_for(lambda: running_job(store, worker.node) == job["id"] and runs(sink, job["id"]), 120,
             what="the job to run")
    killed_at = time.time()
    worker.stop(signal.SIGKILL)
    assert not store.exists(f"ourvidz:job:{job['id']}:final")  # the kill interrupted it
    time.sleep(delay)  # its supervisor: the same node name again, at once or after a delay
    again = start_worker("sdxl", OURVIDZ_HOSTNAME=name, **env)
    body = terminal(sink, job["id"], 240)
    seen = statuses(sink, job["id"])
    print(f"restarted {delay:g}s after the kill under {again.node}: completed {time.time() - killed_at:.1f}s "
          f"after the kill (visibility_timeout {load_settings().visibility_timeout}s); runs {runs(sink, job['id'])}")
    assert body["status"] == "completed" and body["worker_id"] == worker.node
    assert seen.count("completed") == 1 and seen.count("failed") == 0
    assert runs(sink, job["id"]) == 2  # it ran again from the start
    assert reclaimed_before_ready(again)
    assert again.alive()


@pytest.mark.slow
@pytest.mark.stress
def test_sigkill_mid_job_is_redelivered_and_finishes_once(isolated_broker: str, start_worker: Callable[..., WorkerProcess],
                                                         sink: Sink) -> None:
    """Two pools: the survivor's scanner hands the killed one's job back while its supervisor restarts it."""
    store = redis.Redis.from_url(isolated_broker)
    tag = new_id()[:6]
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, **FAST)
    names = {f"sdxl@crash-a-{tag}": f"crash-a-{tag}", f"sdxl@crash-b-{tag}": f"crash-b-{tag}"}
    workers = {w.node: w for w in (start_worker("sdxl", OURVIDZ_HOSTNAME=name, **env) for name in names.values())}
    job = slow_job()
    publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    victim = wait_for(lambda: runs(sink, job["id"]) and next(
        (n for n in workers if running_job(store, n) == job["id"]), None), 120, what="the job to run")
    killed_at = time.time()
    workers[victim].stop(signal.SIGKILL)
    start_worker("sdxl", OURVIDZ_HOSTNAME=names[victim], **env)  # the supervisor, at once
    body = terminal(sink, job["id"], 240)
    seen = statuses(sink, job["id"])
    assert body["status"] == "completed"
    assert seen.count("completed") == 1 and seen.count("failed") == 0 and runs(sink, job["id"]) == 2
    print(f"recovered in {time.time() - killed_at:.1f}s")


@pytest.mark.slow
@pytest.mark.stress
def test_n_jobs_k_random_kills_no_loss_no_duplicates(isolated_broker: str,
                                                     start_worker: Callable[..., WorkerProcess], sink: Sink) -> None:
    """Kills at random moments, each of a pool in the middle of a job; each pool comes back under its name
    (restarted in the background, as a supervisor does, while the other pool keeps working)."""
    import os
    from concurrent.futures import Future, ThreadPoolExecutor

    store = redis.Redis.from_url(isolated_broker)
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, **FAST)
    tag = new_id()[:6]
    workers = {f"kill-{i}-{tag}": start_worker("sdxl", OURVIDZ_HOSTNAME=f"kill-{i}-{tag}", **env) for i in range(2)}
    jobs = [slow_job(steps=12) for _ in range(10)]
    for job in jobs:
        publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    seed = int(os.environ.get("OURVIDZ_TEST_SEED") or random.randrange(10**6))
    rng = random.Random(seed)
    interrupted: list[str] = []
    restarts: dict[str, Future[WorkerProcess]] = {}

    def supervise(name: str, delay: float) -> WorkerProcess:
        time.sleep(delay)  # the same name, at once or after a delay
        return start_worker("sdxl", OURVIDZ_HOSTNAME=name, **env)

    def running() -> list[tuple[str, str]]:
        """(pool, job) of the pools in the middle of a job whose current run has sent ``processing``;
        a job killed twice already is left alone: a third death makes it poison, rightly
        (``OURVIDZ_MAX_DELIVERIES``, 3), and a requeued job keeps its place, so it runs again first."""
        for name in [n for n, f in restarts.items() if f.done()]:
            workers[name] = restarts.pop(name).result()
        return [(n, j) for n, w in workers.items() if n not in restarts and w.alive()
                if (j := running_job(store, w.node)) is not None and runs(sink, j) > interrupted.count(j)
                and interrupted.count(j) < 2]

    with ThreadPoolExecutor(2) as supervisor:
        for _ in range(3):
            time.sleep(rng.uniform(0, 3))
            name, job_id = rng.choice(wait_for(running, 300, what="a pool running a job"))
            workers[name].stop(signal.SIGKILL)
            interrupted.append(job_id)
            restarts[name] = supervisor.submit(supervise, name, rng.choice([0.0, DELAY]))
        for name, future in restarts.items():
            workers[name] = future.result()
    bodies = [terminal(sink, job["id"], 300) for job in jobs]
    terminals = Counter({job["id"]: sum(s in ("completed", "failed") for s in statuses(sink, job["id"])) for job in jobs})
    print(f"seed {seed}: {len(jobs)} jobs, {len(interrupted)} SIGKILLs mid-job: {len(bodies)} completed, "
          f"{sum(terminals.values())} terminal callbacks; processing callbacks of the interrupted jobs: "
          f"{[runs(sink, j) for j in interrupted]}")
    assert [b["status"] for b in bodies] == ["completed"] * len(jobs)
    assert set(terminals.values()) == {1}
    for job_id in interrupted:  # each kill stopped a running job, which then ran again to completion
        assert runs(sink, job_id) >= 1 + interrupted.count(job_id)


@pytest.mark.slow
@pytest.mark.stress
def test_poison_job_is_given_up_after_n_deliveries(isolated_broker: str, start_worker: Callable[..., WorkerProcess],
                                                   sink: Sink) -> None:
    store = redis.Redis.from_url(isolated_broker)
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_MAX_DELIVERIES="2", **FAST)
    job = {**slow_job(steps=2), "prompt": f"a {MARKER} prompt"}
    publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    started = 0
    name = f"poison-{new_id()[:6]}"
    deadline = time.time() + 240
    while time.time() < deadline and not any(c["body"]["status"] == "failed" for c in sink.callbacks(job["id"])):
        worker = start_worker("sdxl", OURVIDZ_HOSTNAME=name, **env)  # its supervisor, same name
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
@pytest.mark.stress
def test_device_fault_exits_the_worker_and_requeues_the_job(isolated_broker: str, tmp_path,
                                                            start_worker: Callable[..., WorkerProcess],
                                                            sink: Sink) -> None:
    from .faults import DEVICE_FAULT

    store = redis.Redis.from_url(isolated_broker)
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_LEASE_SECONDS="2",
               OURVIDZ_PROMPT_POLICY="tests.faults:cuda_fault_once", OURVIDZ_TEST_FAULT_FLAG=str(tmp_path / "faulted"))
    name = f"fault-{new_id()[:6]}"
    first = start_worker("sdxl", OURVIDZ_HOSTNAME=name, **env)
    job = {**slow_job(steps=2), "prompt": f"a {DEVICE_FAULT} prompt"}
    publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    wait_for(lambda: not first.alive(), 60, what="the worker to exit")
    assert first.stop() == 75
    start_worker("sdxl", OURVIDZ_HOSTNAME=name, **env)  # what the supervisor does: the same name
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
