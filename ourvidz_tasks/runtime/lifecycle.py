"""The life of one generation job, the same for every family.

``JobTask.execute`` reads forward: id → already ended? → ``processing`` →
validate → prompt policy → the family's ``work`` (model) → media + storage →
one terminal callback. Errors map to the contract's codes; retryable ones are
Celery retries with exponential backoff and jitter, and only the last attempt
sends ``failed``. Families provide ``work(rt, job, progress) -> Generated``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

from ..contract.errors import (
    Cancelled,
    DeliveryError,
    JobError,
    JobTimeout,
    ModelLoadError,
    OutOfMemory,
    WorkerUnavailable,
)
from ..contract.jobs import TIME_LIMITS, Job, parse_job, usable_id
from ..models import release_memory
from ..services import events
from ..services.delivery import callback_body
from ..services.media import Output
from .control import job_started
from .faults import EXIT_DEVICE_FAULT as EXIT_DEVICE_FAULT
from .faults import detach, device_fault, exit_on_device_fault, is_oom
from .memprobe import Measurement
from .recovery import count_delivery, queue_count_delivery
from .worker import Runtime, flush_task_events, runtime

log = logging.getLogger(__name__)


@dataclass
class Generated:
    """What a family's work returns: outputs plus job-level metadata."""

    outputs: list[Output]
    metadata: dict[str, Any] = field(default_factory=dict)
    #: the job's shape (e.g. ``1024x1024x6``): peak memory is remembered per shape
    shape: str = ""


class Progress:
    """``progress(step, total)``: throttled ``processing`` callbacks and Celery PROGRESS state."""

    def __init__(self, task: Task, rt: Runtime, job_id: str, attempt: int, limit: float) -> None:
        self.task, self.rt, self.job_id, self.attempt = task, rt, job_id, attempt
        self.interval = rt.settings.progress_interval
        self._last = time.monotonic()
        self.limit, self.deadline = limit, self._last + limit
        self.stage = "generating"

    def __call__(self, step: int, total: int) -> None:
        """Called after every denoising step: the watchdog (cancel, time limit), then progress."""
        if self._cancelled():
            raise Cancelled("the job was cancelled")
        now = time.monotonic()
        if now > self.deadline:
            raise JobTimeout(f"the job ran past its {self.limit:g}s time limit")
        if step < total and now - self._last < self.interval:
            return
        self._last = now
        percent = int(100 * step / max(total, 1))
        try:  # progress is best effort: a broker outage must not end the job it reports on
            self.rt.delivery.processing(self.job_id, self.attempt, {"progress": percent})
            if self.task.request.id:
                meta = {"job_id": self.job_id, "percent": percent, "step": step, "total": total, "stage": self.stage}
                self.task.update_state(state="PROGRESS", meta=meta)
                # Flower reads events, not the result backend: the same as a custom task event
                self.task.send_event("task-progress", retry=False, result=meta)
        except (redis.RedisError, OSError, OperationalError) as exc:
            log.warning("job %s: progress not published (%s)", self.job_id, type(exc).__name__)

    def _cancelled(self) -> bool:
        """The cancel flag; while Redis is away it reads as not set (read again at the next step)."""
        try:
            return bool(self.rt.redis.exists(cancel_key(self.job_id)))
        except redis.RedisError:
            return False


Work = Callable[[Runtime, Job, Progress], Generated]
CANCEL_TTL = 24 * 3600


def cancel_key(job_id: str) -> str:
    return f"ourvidz:cancel:{job_id}"


def cancel(store: redis.Redis, job_id: str) -> None:
    """Ask the worker running ``job_id`` to stop at its next step (``failed``, ``CANCELLED``).

    Celery's revoke reaches a solo worker only between jobs; this flag is read
    at every denoising step. A job cancelled before it starts also ends with
    ``CANCELLED`` when it is picked up.
    """
    store.set(cancel_key(job_id), "1", ex=CANCEL_TTL)


def backoff(retries: int, base: float = 2.0, cap: float = 600.0) -> float:
    """Exponential backoff with full jitter: ``uniform(0.5, 1) * min(cap, base * 2^retries)``."""
    return random.uniform(0.5, 1.0) * min(cap, base * 2**retries)


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory anywhere in ``exc``'s chain (see :mod:`.faults`)."""
    return device_fault(exc) is not None


def retries_for(error: JobError, default: int) -> int:
    """How many retries an error class gets: a model error one (after a reload), the rest ``default``."""
    return 1 if isinstance(error, ModelLoadError) else default


def as_job_error(exc: BaseException, what: str = "a task") -> JobError | None:
    """Map library exceptions to wire errors (None: not one we know).

    Every pool maps its errors here, so a device fault can't be swallowed: the
    process exits with status 75 (:func:`~ourvidz_tasks.runtime.faults.exit_on_device_fault`;
    ``what`` names the job in that log line). Out-of-memory anywhere in the chain
    (a model load wraps it) is ``OOM_ERROR``.
    """
    exit_on_device_fault(exc, what)
    if isinstance(exc, JobError) and not isinstance(exc, ModelLoadError):
        return exc
    if is_oom(exc):
        return exc if isinstance(exc, OutOfMemory) else OutOfMemory("the device ran out of memory")
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, DeliveryError):
        return WorkerUnavailable(str(exc))
    return None


class BaseTask(Task):  # type: ignore[misc]
    """Base of every task here: acks late, no type checks, job-id-only argsrepr."""

    acks_late = True
    reject_on_worker_lost = True
    typing = False
    max_retries = 3
    Request = "ourvidz_tasks.services.redact:QuietRequest"

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Publish with ``argsrepr`` naming only the job id: Flower and logs show it, never prompts."""
        payload = args[0] if args else None
        options.setdefault("argsrepr", f"({usable_id(payload) or '?'!r},)")
        options.setdefault("kwargsrepr", "{}")
        return super().apply_async(args, kwargs, **options)

    #: a job task records its start itself, right after its ``processing`` callback is on its way
    marks_own_start = False

    def mark_started(self) -> None:
        """Flower's task events now (a solo pool would flush them only after the task), the
        ``STARTED`` state in the result backend (``ourvidz submit`` shows it) and, for a job
        task, the pool's busy mark in the memory ledger."""
        flush_task_events(self.app)
        if self.marks_own_start:
            job_started(self.app)
        if self.request.id and not self.request.is_eager:
            self.update_state(state="STARTED", meta={"pid": os.getpid(), "hostname": self.request.hostname})

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """A pool's job that reaches a process with no warmed-up runtime goes back to its queue.

        Pools consume only once warm (:func:`~ourvidz_tasks.runtime.worker.warm_up`), so this is the
        last guard: never a job taken and dropped without a callback.
        """
        if self.name.split(".")[1:2] != ["outbox"] and getattr(self.app, "ourvidz_runtime", None) is None:
            log.error("task %s reached %s before it was warm; back to its queue", task_id, self.request.hostname)
            time.sleep(NOT_READY_PAUSE)  # no hot loop while this process stays unready
            raise Reject("this process is not a warmed-up ourvidz pool", requeue=True)


#: seconds an unready process holds a job before handing it back
NOT_READY_PAUSE = 1.0


class JobTask(BaseTask):
    """Base of the generation tasks: the job lifecycle in :meth:`execute`."""

    marks_own_start = True

    def execute(self, payload: Any, family: str, work: Work) -> dict[str, Any]:
        rt = runtime(self.app)
        job_id = usable_id(payload)
        if job_id is None:
            raw = json.dumps(payload)[:65536] if payload is not None else None
            rt.dead.push("no usable job id", raw=raw, queue=family, task_id=self.request.id)
            return {"status": "dead_letter", "reason": "no usable job id"}
        recorded, deliveries, cancelled = _admit(rt, job_id, self.request.retries)
        if recorded is not None:
            log.info("job %s already ended (%s); not run again", job_id, recorded["status"])
            rt.delivery.resend(job_id, recorded)
            return recorded

        attempt = self.request.retries + 1
        if deliveries > rt.settings.max_deliveries:
            return self._poison(rt, job_id, attempt, deliveries)
        started = time.perf_counter()
        rt.delivery.processing(job_id, attempt, wait=True)
        self.mark_started()  # Flower's events and the STARTED state, while the callback travels
        metadata: dict[str, Any] = {}
        body: dict[str, Any] | None = None
        retry: BaseException | None = None
        oom = False
        error_dict: dict[str, Any] = {}
        try:
            if cancelled:
                raise Cancelled("the job was cancelled before it started")
            job = parse_job(payload, rt.settings, family)
            metadata.update(_enhancement(job))
            rt.policy(job.prompt)
            rt.used.clear()
            resumed = rt.delivery.resume(job.user_id or "", job_id)
            if resumed is not None:  # an earlier attempt computed it; storage failed
                assets, produced = resumed
                metadata.update(produced, resumed_from_spool=True)
                model_time = 0.0
            else:
                limit = rt.settings.time_limits.get(job.the_type, TIME_LIMITS.get(job.the_type, rt.settings.max_job_seconds))
                # working memory of the model call only: a load or an OOM attempt inside restarts it
                with rt.measure() as peak:
                    generated = work(rt, job, Progress(self, rt, job_id, attempt, limit))
                _remember_peak(rt, generated.shape or job.the_type, peak)
                model_time = time.perf_counter() - started
                metadata.update(generated.metadata)
                assets = rt.delivery.publish(job.user_id or "", job_id, generated.outputs, generated.metadata)
            total = time.perf_counter() - started
            metadata.update(processing_time=round(total, 3), model_time=round(model_time, 3),
                            delivery_time=round(total - model_time, 3), batch_size=len(assets))
            body = callback_body(job_id, rt.worker_id, "completed", attempt=attempt, assets=assets, metadata=metadata)
            log.info("job %s completed in %.2fs (model %.2fs)", job_id, total, model_time)
        except Exception as exc:
            # a device fault exits here (status 75, the message unacknowledged: it is requeued)
            error = as_job_error(exc, f"job {job_id}")
            oom = isinstance(error, OutOfMemory)
            if error is None:
                log.exception("job %s: unexpected %s", job_id, type(exc).__name__)
                error = WorkerUnavailable(f"internal error ({type(exc).__name__})")
                error_dict = {**error.as_dict(), "retryable": False}
            elif error.retryable and self.request.retries < retries_for(error, self.max_retries):
                log.warning("job %s: %s, retry %d", job_id, error.code, attempt)
                retry = error
            else:
                error_dict = error.as_dict()
            if oom:
                detach(error)  # its traceback would keep the failed run's tensors alive
        if oom:
            release_memory(rt.device)  # outside the except: the failed run's frames are gone
        if retry is not None:
            raise self.retry(exc=retry, countdown=backoff(self.request.retries))
        if body is None:
            metadata["processing_time"] = round(time.perf_counter() - started, 3)
            body = callback_body(job_id, rt.worker_id, "failed", attempt=attempt, metadata=metadata, error=error_dict)
            log.info("job %s failed: %s", job_id, error_dict["code"])
        return end_job(rt, payload, body)

    def _poison(self, rt: Runtime, job_id: str, attempt: int, deliveries: int) -> dict[str, Any]:
        log.error("job %s: delivered %d times, given up as poison", job_id, deliveries)
        error = _poison_error(deliveries)
        body = callback_body(job_id, rt.worker_id, "failed", attempt=attempt, metadata={}, error=error)
        return end_job(rt, {}, body)


def _admit(rt: Runtime, job_id: str, retries: int) -> tuple[dict[str, Any] | None, int, bool]:
    """One round trip before the ``processing`` callback: the terminal record (the job already
    ended?), one more delivery counted (every broker redelivers a message whose worker died:
    RabbitMQ at once, Redis via leases) and the cancel flag."""
    with rt.redis.pipeline(transaction=False) as pipe:
        pipe.get(rt.delivery.final_key(job_id))
        queue_count_delivery(pipe, job_id, retries, rt.settings.idempotency_ttl)
        pipe.exists(cancel_key(job_id))
        recorded, deliveries, _, cancelled = pipe.execute()
    return (json.loads(recorded) if recorded else None), int(deliveries), bool(cancelled)


def end_job(rt: Runtime, payload: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Every way a job ends: the ``job_finished`` signal, one recorded terminal callback, no spool."""
    meta = body["metadata"]
    job_type = payload.get("type") or payload.get("job_type") if isinstance(payload, dict) else None
    events.job_finished.send(
        sender=rt.family, job_id=body["job_id"], job_type=str(job_type or "?"), status=body["status"],
        code=body.get("error", {}).get("code"), processing_time=meta.get("processing_time"),
        model_time=meta.get("model_time"), delivery_time=meta.get("delivery_time"),
    )
    recorded = rt.delivery.finish(body)
    rt.delivery.discard(body["job_id"])
    return recorded


def _remember_peak(rt: Runtime, shape: str, peak: Measurement | None) -> None:
    """Record a job's measured working memory (a call that returned) and re-size what the models hold.

    Every device kind (the probe is chosen at start). The first call after a
    load also records what it left allocated (the model's caches) as resident;
    what the process's very first call leaves (libraries' one-time workspaces,
    kept whether a model is loaded or not) is the process's own, like its CUDA
    context: the per-pool allowance of the budget covers it, not the model.
    The reservation becomes weights + resident + the largest recent working
    memory of the model's shapes + slack: it shrinks when recent calls needed
    less, and grows only when that fits now.
    """
    if rt.ledger is None or peak is None:
        return
    first_call = rt.measured_calls == 0
    rt.measured_calls += 1
    if first_call and peak.resident_mb:
        log.info("%s: the process's first model call kept %d MB (one-time, the process's own)",
                 rt.family, peak.resident_mb)
    for name in rt.used:
        if name in rt.fresh:
            rt.ledger.record_resident(name, 0 if first_call else peak.resident_mb)
            rt.fresh.discard(name)
        rt.ledger.record_work(name, shape, peak.mb)
        slot = rt.models[name]
        if slot.reservation is not None:
            slot.reservation.resize(slot.estimate())
    rt.cap_memory()


def poison_guard(task: Task, rt: Runtime, kind: str) -> str | None:
    """The poison guard of a task without a job lifecycle (chat, enhance): why it is given up, or None.

    Counts one more delivery of this task attempt under its Celery id (a
    redelivered message keeps it); past ``max_deliveries`` (the request
    stopped its worker each time, e.g. a device fault) it is given up.
    """
    task_id = task.request.id
    if not task_id:
        return None
    deliveries = count_delivery(rt.redis, f"{kind}:{task_id}", task.request.retries, rt.settings.idempotency_ttl)
    if deliveries <= rt.settings.max_deliveries:
        return None
    log.error("%s %s: delivered %d times, given up as poison", kind, task_id, deliveries)
    return str(_poison_error(deliveries)["message"])


def _poison_error(deliveries: int) -> dict[str, Any]:
    message = f"given up after {deliveries - 1} deliveries: the job stopped its worker each time"
    return {"code": WorkerUnavailable.code, "message": message, "retryable": False}


def _enhancement(job: Job) -> dict[str, Any]:
    """The enhancement fields a generate callback carries for enhanced jobs."""
    m = job.metadata
    out: dict[str, Any] = {}
    if m.enhanced_prompt is not None:
        out["enhanced_prompt"] = m.enhanced_prompt
        out["original_prompt"] = m.original_prompt if m.original_prompt is not None else job.original_prompt
    if m.enhancement_error is not None:
        out["enhancement_error"] = m.enhancement_error
        out["original_prompt"] = job.prompt
    if m.enhancement_source is not None:
        out["enhancement_source"] = m.enhancement_source
    if m.enhancement_time is not None:
        out["enhancement_time"] = m.enhancement_time
    return out
