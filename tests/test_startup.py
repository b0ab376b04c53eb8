"""A pool started before its broker, or whose Redis restarts while it warms up, loses no job.

Operators start ``bin/worker sdxl`` while a host boots or Redis restarts for a deploy. The pool
must warm up once Redis answers (never consume before it is ready), and every job published
meanwhile must end with its callbacks. A job that still reaches a process that is not warm goes
back to its queue.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from devtools.sink import Sink

from .support.cluster import RedisServer, WorkerProcess
from .support.env import worker_env
from .support.jobs import TASK, new_id, terminal, tiny_job
from .support.ports import free_port
from .support.process import wait_for
from .warmup_gate import HELD
from .wire import publish

NOT_READY = "not ready: Redis does not answer"


def _pool(sink: Sink, tmp_path: Path, url: str, name: str, **extra: str) -> WorkerProcess:
    env = worker_env(sink, "sdxl", OURVIDZ_BROKER_URL=url, OURVIDZ_REDIS_URL=url,
                     OURVIDZ_HOSTNAME=f"{name}-{new_id()[:6]}", OURVIDZ_LEASE_SECONDS="3", **extra)
    return WorkerProcess("sdxl", env, tmp_path / f"{name}.log")


def _three_jobs_complete(server: RedisServer, sink: Sink, worker: WorkerProcess) -> None:
    client = server.client()
    jobs = [tiny_job() for _ in range(3)]
    for job in jobs:
        publish(client, TASK, job, "sdxl")
    bodies = {job["id"]: terminal(sink, job["id"], 180) for job in jobs}
    terminals = Counter(job_id for job_id in bodies for c in sink.callbacks(job_id)
                        if c["body"]["status"] in ("completed", "failed"))
    statuses = Counter(b["status"] for b in bodies.values())
    print(f"3 jobs after the outage: {statuses['completed']} completed, worker alive: {worker.alive()}")
    assert statuses["completed"] == 3, {k: v.get("error") for k, v in bodies.items()}
    assert set(terminals.values()) == {1}
    for job in jobs:  # processing came before the terminal callback
        assert next(c["body"]["status"] for c in sink.callbacks(job["id"])) == "processing"
    assert "WORKER_UNAVAILABLE" not in worker.text()
    assert worker.alive()


@pytest.mark.slow
@pytest.mark.stress
def test_pool_started_before_redis_waits_then_runs_every_job(tmp_path: Path, sink: Sink) -> None:
    server = RedisServer(tmp_path / "redis", port=free_port())  # not started yet
    worker = _pool(sink, tmp_path, server.url(), "early")
    try:
        worker.launch()
        # the pool has met the missing broker: it waits, or (before the fix) its consumer retries
        wait_for(lambda: NOT_READY in worker.text() or "Cannot connect to" in worker.text() or not worker.alive(),
                 240, interval=0.2, what="the pool to find Redis missing")
        assert worker.alive(), worker.text()[-3000:]
        assert "ready." not in worker.text()
        server.start()
        worker.wait_ready(240)
        _three_jobs_complete(server, sink, worker)
    finally:
        worker.stop()
        server.stop()


@pytest.mark.slow
@pytest.mark.stress
def test_redis_restarted_while_the_pool_warms_up(tmp_path: Path, sink: Sink) -> None:
    server = RedisServer(tmp_path / "redis").start()
    gate = tmp_path / "gate"
    worker = _pool(sink, tmp_path, server.url(), "warming", OURVIDZ_RUNTIME_PLUGINS="tests.warmup_gate:hold_first_load",
                   OURVIDZ_TEST_WARMUP_GATE=str(gate))
    try:
        worker.launch()
        # memory reserved, the model load is held: Redis goes away in the middle of the warmup
        wait_for(lambda: HELD in worker.text() or not worker.alive(), 240, interval=0.2, what="the warmup to start")
        server.stop()
        gate.touch()
        wait_for(lambda: NOT_READY in worker.text() or "Signal handler" in worker.text()
                 or not worker.alive(), 120, interval=0.2, what="the pool to meet the outage")
        assert worker.alive(), worker.text()[-3000:]
        server.start()
        worker.wait_ready(240)
        _three_jobs_complete(server, sink, worker)
    finally:
        worker.stop()
        server.stop()


def test_a_job_reaching_a_pool_that_is_not_warm_goes_back_to_its_queue() -> None:
    """The last guard (pools consume only once warm): Celery's tracer sees a requeueing Reject,
    which the worker turns into ``message.reject(requeue=True)``."""
    from celery.app.trace import build_tracer
    from celery.exceptions import Reject

    from ourvidz_tasks.celery import app
    from ourvidz_tasks.sdxl import generate

    assert getattr(app, "ourvidz_runtime", None) is None  # this test process is no pool
    tracer = build_tracer(generate.name, generate, eager=False, propagate=False, app=app)
    task_id = new_id()
    result = tracer(task_id, (tiny_job(),), {}, {"id": task_id, "hostname": "test@unready"})
    state, reject = result.info.state, result.info.retval
    assert state == "REJECTED" and isinstance(reject, Reject) and reject.requeue is True


@pytest.mark.slow
def test_pool_exits_for_its_supervisor_when_redis_never_answers(tmp_path: Path, sink: Sink) -> None:
    from ourvidz_tasks.runtime.pool import EXIT_NOT_READY

    worker = _pool(sink, tmp_path, f"redis://127.0.0.1:{free_port()}/0", "never", OURVIDZ_STARTUP_WAIT="3")
    worker.launch()
    try:
        wait_for(lambda: not worker.alive(), 240, interval=0.2, what="the pool to give up")
    finally:
        code = worker.stop()
    assert code == EXIT_NOT_READY, worker.text()[-3000:]
    assert NOT_READY in worker.text() and "ready." not in worker.text()
