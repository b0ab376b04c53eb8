"""The job lifecycle in process: :func:`~ourvidz_tasks.runtime.lifecycle.run_job` on a runtime built here.

No worker process and no mock of the core: a real :class:`Runtime` (real Redis in the run's
private database, real storage uploads and signed callbacks to the sink over HTTP), a small
``work`` function standing in for a model, and a :class:`Attempt` standing in for the Celery
task (its retry count, its start and progress reports). The device-fault exit goes through
its seam (``on_device_fault``), so the process that "exits" is not pytest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from PIL import Image

from devtools.sink import Sink
from ourvidz_tasks.contract import keys
from ourvidz_tasks.contract.errors import WorkerUnavailable
from ourvidz_tasks.contract.jobs import Job
from ourvidz_tasks.contract.settings import load_settings
from ourvidz_tasks.runtime.faults import EXIT_DEVICE_FAULT, exit_on_device_fault
from ourvidz_tasks.runtime.lifecycle import Generated, Progress, RetryJob, run_job
from ourvidz_tasks.runtime.runtime import Runtime
from ourvidz_tasks.services.delivery import Delivery
from ourvidz_tasks.services.durations import Durations, work_shape
from ourvidz_tasks.services.fetch import ReferenceFetcher
from ourvidz_tasks.services.guard import DeadLetters
from ourvidz_tasks.services.media import ImageOutput
from ourvidz_tasks.services.policy import load_policy
from ourvidz_tasks.services.usage import day_of, read_usage

from .support.env import KEY
from .support.jobs import new_id

WORKER = "sdxl@lifecycle-test"


@dataclass
class Attempt:
    """One delivery of a job's task, as the lifecycle sees it (a Celery task gives the same)."""

    retries: int = 0
    max_retries: int = 3
    task_id: str | None = field(default_factory=new_id)
    starts: int = 0
    reports: list[dict[str, Any]] = field(default_factory=list)

    def started(self) -> None:
        self.starts += 1

    def report(self, meta: dict[str, Any]) -> None:
        self.reports.append(meta)


class Model:
    """A stand-in for a family's model call: counts its runs, fails while ``failures`` has some left."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.runs = 0

    def __call__(self, rt: Runtime, job: Job, progress: Progress) -> Generated:
        self.runs += 1
        progress(1, 2)
        if self.failures:
            raise self.failures.pop(0)
        progress(2, 2)
        image = Image.new("RGB", (16, 16), (200, 40, 40))
        return Generated([ImageOutput(image, {"seed": 1})], {"pipeline": "test"}, shape="16x16x1")


class Exited(BaseException):
    """What the test's exit seam raises instead of ending pytest."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def exit_seam(status: int) -> None:
    raise Exited(status)


#: the real device-fault check, with the test's exit
on_device_fault = partial(exit_on_device_fault, exit=exit_seam)


def cuda_fault() -> Exception:
    """What a broken CUDA context raises, wrapped by a library (found by following ``__cause__``)."""
    try:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    except RuntimeError as exc:
        try:
            raise ValueError("the pipeline failed") from exc
        except ValueError as wrapped:
            return wrapped


@pytest.fixture
def rt(sink: Sink, store: redis.Redis, tmp_path: Path) -> Iterator[Runtime]:
    settings = load_settings(supabase_url=sink.url, spool_dir=tmp_path / "spool", http_tries=2, http_backoff=0.01,
                             callbacks="inline", progress_interval=0, max_deliveries=3)
    runtime = Runtime(
        settings=settings, family="sdxl", worker_id=WORKER, device=torch.device("cpu"), redis=store,
        delivery=Delivery(settings, WORKER, store), fetcher=ReferenceFetcher(settings),
        policy=load_policy(settings.prompt_policy), dead=DeadLetters(store),
    )
    yield runtime
    sink.faults()
    runtime.close()


def job() -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a red kite"}


def run(rt: Runtime, payload: dict[str, Any], work: Callable[..., Generated], attempt: Attempt) -> dict[str, Any]:
    return run_job(rt, attempt, payload, "sdxl", work, on_device_fault=on_device_fault)


def statuses(sink: Sink, job_id: str) -> list[tuple[str, int]]:
    return [(c["body"]["status"], c["body"]["metadata"]["attempt"]) for c in sink.callbacks(job_id)]


def test_a_job_completes_with_its_callbacks(rt: Runtime, sink: Sink) -> None:
    payload, model, attempt = job(), Model(), Attempt()
    body = run(rt, payload, model, attempt)
    assert body["status"] == "completed" and model.runs == 1 and attempt.starts == 1
    assert [r["percent"] for r in attempt.reports] == [50, 100]
    assert statuses(sink, payload["id"]) == [("processing", 1), ("processing", 1), ("processing", 1), ("completed", 1)]
    assert all(c["signature_ok"] for c in sink.callbacks(payload["id"]))
    url = f"{sink.url}/storage/v1/object/{body['assets'][0]['url']}"
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert run(rt, payload, model, Attempt()) == body and model.runs == 1  # ended: recorded, not run again


def test_a_retryable_error_retries_with_backoff_and_the_last_attempt_fails(rt: Runtime, sink: Sink) -> None:
    payload = job()
    model = Model(*(WorkerUnavailable("the engine is away") for _ in range(4)))
    for retries in range(3):
        with pytest.raises(RetryJob) as info:
            run(rt, payload, model, Attempt(retries=retries))
        assert info.value.error.code == "WORKER_UNAVAILABLE"
        assert 0 <= info.value.countdown <= 2.0 * 2**retries  # full jitter under a doubling ceiling
        assert not [s for s, _ in statuses(sink, payload["id"]) if s in ("completed", "failed")]
    body = run(rt, payload, model, Attempt(retries=3))
    assert body["status"] == "failed" and body["error"]["code"] == "WORKER_UNAVAILABLE" and model.runs == 4
    ended = [(s, a) for s, a in statuses(sink, payload["id"]) if s != "processing"]
    assert ended == [("failed", 4)]  # one terminal callback, from the last attempt


def test_a_retry_that_works_completes(rt: Runtime, sink: Sink) -> None:
    payload, model = job(), Model(WorkerUnavailable("the engine is away"))
    with pytest.raises(RetryJob):
        run(rt, payload, model, Attempt(retries=0))
    assert run(rt, payload, model, Attempt(retries=1))["status"] == "completed"
    assert [s for s, _ in statuses(sink, payload["id"]) if s != "processing"] == ["completed"]


def test_a_job_that_stops_its_worker_every_time_is_given_up_as_poison(rt: Runtime, sink: Sink) -> None:
    payload = job()
    model = Model(*(cuda_fault() for _ in range(3)))
    for _ in range(3):  # the same attempt, delivered again after each crash
        with pytest.raises(Exited):
            run(rt, payload, model, Attempt(retries=0))
    body = run(rt, payload, model, Attempt(retries=0))
    assert model.runs == 3  # the fourth delivery does not run it
    assert body["status"] == "failed" and body["error"]["code"] == "WORKER_UNAVAILABLE"
    assert body["error"]["retryable"] is False and "given up after 3 deliveries" in body["error"]["message"]
    assert [s for s, _ in statuses(sink, payload["id"]) if s != "processing"] == ["failed"]


def test_a_storage_outage_resumes_from_the_spool_without_computing_again(rt: Runtime, sink: Sink) -> None:
    payload, model = job(), Model()
    sink.faults(storage=500)
    with pytest.raises(RetryJob) as info:
        run(rt, payload, model, Attempt(retries=0))
    assert info.value.error.code == "WORKER_UNAVAILABLE" and model.runs == 1
    assert any((rt.settings.spool_dir / payload["id"]).iterdir())  # what was computed waits in the spool
    sink.faults()
    body = run(rt, payload, model, Attempt(retries=1))
    assert body["status"] == "completed" and model.runs == 1  # uploaded from the spool, not computed again
    assert body["metadata"]["resumed_from_spool"] is True and body["metadata"]["pipeline"] == "test"
    url = f"{sink.url}/storage/v1/object/{body['assets'][0]['url']}"
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert not (rt.settings.spool_dir / payload["id"]).exists()  # ended: the spool is gone


def test_a_device_fault_exits_75_without_a_terminal_callback_and_the_job_runs_again(rt: Runtime, sink: Sink) -> None:
    payload, model = job(), Model(cuda_fault())
    with pytest.raises(Exited) as info:
        run(rt, payload, model, Attempt(retries=0))
    assert info.value.status == EXIT_DEVICE_FAULT
    rt.delivery.close()  # waits for the progress callbacks on their way
    assert {s for s, _ in statuses(sink, payload["id"])} == {"processing"}  # nothing terminal
    rt.delivery = Delivery(rt.settings, WORKER, rt.redis)  # the fresh worker's
    body = run(rt, payload, model, Attempt(retries=0))  # the unacknowledged message, redelivered
    assert body["status"] == "completed" and model.runs == 2


def arrived(store: redis.Redis, job_id: str, ago: float) -> None:
    """What the pools' intake writes for an arriving job: its arrival by the broker's clock."""
    seconds, micros = store.time()
    store.hset(keys.fair_job(job_id), "arrived", seconds + micros / 1e6 - ago)
    store.expire(keys.fair_job(job_id), 600)  # as the intake's record does


class Slow(Model):
    """A model call that takes at least ``seconds`` (GPU seconds to count)."""

    def __init__(self, seconds: float, *failures: BaseException) -> None:
        super().__init__(*failures)
        self.seconds = seconds

    def __call__(self, rt: Runtime, job: Job, progress: Progress) -> Generated:
        time.sleep(self.seconds)
        return super().__call__(rt, job, progress)


def test_the_callbacks_carry_the_queue_wait_and_the_gpu_seconds_of_every_attempt(
        rt: Runtime, sink: Sink, store: redis.Redis) -> None:
    payload, model = job(), Slow(0.3, WorkerUnavailable("the engine is away"))
    arrived(store, payload["id"], 5.0)
    with pytest.raises(RetryJob):
        run(rt, payload, model, Attempt(retries=0))
    body = run(rt, payload, model, Attempt(retries=1))
    meta = body["metadata"]
    assert body["status"] == "completed" and 5.0 <= meta["queue_wait_s"] < 60
    assert meta["gpu_seconds"] >= 0.6 and meta["gpu_seconds"] >= meta["model_time"] + 0.3  # both attempts
    starts = [c["body"]["metadata"] for c in sink.callbacks(payload["id"])
              if c["body"]["status"] == "processing" and "progress" not in c["body"]["metadata"]]
    assert [m["attempt"] for m in starts] == [1, 2]  # the first processing callback of each attempt...
    assert 5.0 <= starts[0]["queue_wait_s"] <= starts[1]["queue_wait_s"] == meta["queue_wait_s"]  # ...waited
    assert not store.exists(keys.job_gpu(payload["id"]))  # the earlier attempts' seconds: counted, gone

    today = read_usage(store, [day_of(time.time())])
    mine = next(u for u in today if u.user == payload["user_id"])
    assert mine.gpu_seconds >= meta["gpu_seconds"] and mine.jobs >= 1
    shape, units = work_shape("sdxl", payload, rt.settings)
    assert shape == "1024x1024x1s15" and units == 15.0
    assert Durations(store, rt.settings).seconds("sdxl", shape, units) > 0
    assert store.lrange(keys.durations("sdxl", shape), 0, 0) == [f"{meta['processing_time']:.4f}".encode()]

    unknown = job()  # no arrival recorded (no intake): no queue wait, still its GPU seconds
    body = run(rt, unknown, Model(), Attempt())
    assert "queue_wait_s" not in body["metadata"] and body["metadata"]["gpu_seconds"] >= 0
    assert all("queue_wait_s" not in c["body"]["metadata"] for c in sink.callbacks(unknown["id"]))


def test_bookkeeping_that_cannot_be_written_never_fails_the_job(rt: Runtime, sink: Sink, store: redis.Redis,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    # a worker started in this process before (celery's logging setup) may have disabled existing loggers
    # or raised the root logger's level
    caplog.set_level(logging.INFO)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("ourvidz_tasks")]:
        logger = logging.getLogger(name)
        logger.disabled, logger.propagate = False, True
        logger.setLevel(logging.NOTSET)
    payload = job()
    store.hset(keys.fair_job(payload["id"]), "arrived", "not a time")
    store.expire(keys.fair_job(payload["id"]), 600)
    day = keys.usage(day_of(time.time()))
    saved = store.dump(day)
    store.delete(day)
    store.set(day, "a string, not the hash of the day")  # every usage write fails (WRONGTYPE)
    try:
        body = run(rt, payload, Model(), Attempt())
    finally:
        store.delete(day)
        if saved is not None:
            store.restore(day, 0, saved)
    assert body["status"] == "completed" and "queue_wait_s" not in body["metadata"]
    assert [s for s, _ in statuses(sink, payload["id"])][-1] == "completed"
    assert "queue wait not read (ValueError)" in caplog.text
    assert "duration and usage not recorded (ResponseError)" in caplog.text
