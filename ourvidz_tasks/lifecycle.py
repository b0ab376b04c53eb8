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

from . import events
from .delivery import callback_body
from .errors import Cancelled, DeliveryError, JobError, JobTimeout, ModelLoadError, OutOfMemory, WorkerUnavailable
from .jobs import TIME_LIMITS, Job, parse_job, usable_id
from .media import Output
from .memory import measure_peak
from .recovery import count_delivery
from .worker import Runtime, runtime

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
        if self.rt.redis.exists(cancel_key(self.job_id)):
            raise Cancelled("the job was cancelled")
        now = time.monotonic()
        if now > self.deadline:
            raise JobTimeout(f"the job ran past its {self.limit:g}s time limit")
        if step < total and now - self._last < self.interval:
            return
        self._last = now
        percent = int(100 * step / max(total, 1))
        self.rt.delivery.processing(self.job_id, self.attempt, {"progress": percent})
        if self.task.request.id:
            meta = {"job_id": self.job_id, "percent": percent, "step": step, "total": total, "stage": self.stage}
            self.task.update_state(state="PROGRESS", meta=meta)
            # Flower reads events, not the result backend: the same as a custom task event
            self.task.send_event("task-progress", retry=False, result=meta)


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


#: exit status of a worker that stopped after a device fault (its supervisor restarts it)
EXIT_DEVICE_FAULT = 75


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory: the process's device state can't be trusted."""
    name = type(exc).__name__
    return name == "AcceleratorError" or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc)
                                          and "out of memory" not in str(exc))


def retries_for(error: JobError, default: int) -> int:
    """How many retries an error class gets: a model error one (after a reload), the rest ``default``."""
    return 1 if isinstance(error, ModelLoadError) else default


def as_job_error(exc: BaseException) -> JobError | None:
    """Map library exceptions to wire errors (None: not one we know)."""
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, DeliveryError):
        return WorkerUnavailable(str(exc))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if isinstance(exc, torch.OutOfMemoryError):
        return OutOfMemory("the device ran out of memory")
    return None


class BaseTask(Task):  # type: ignore[misc]
    """Base of every task here: acks late, no type checks, job-id-only argsrepr."""

    acks_late = True
    reject_on_worker_lost = True
    typing = False
    max_retries = 3
    Request = "ourvidz_tasks.redact:QuietRequest"

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Publish with ``argsrepr`` naming only the job id: Flower and logs show it, never prompts."""
        payload = args[0] if args else None
        options.setdefault("argsrepr", f"({usable_id(payload) or '?'!r},)")
        options.setdefault("kwargsrepr", "{}")
        return super().apply_async(args, kwargs, **options)


class JobTask(BaseTask):
    """Base of the generation tasks: the job lifecycle in :meth:`execute`."""

    def execute(self, payload: Any, family: str, work: Work) -> dict[str, Any]:
        rt = runtime(self.app)
        job_id = usable_id(payload)
        if job_id is None:
            raw = json.dumps(payload)[:65536] if payload is not None else None
            rt.dead.push("no usable job id", raw=raw, queue=family, task_id=self.request.id)
            return {"status": "dead_letter", "reason": "no usable job id"}
        recorded = rt.delivery.terminal_of(job_id)
        if recorded is not None:
            log.info("job %s already ended (%s); not run again", job_id, recorded["status"])
            rt.delivery.resend(job_id, recorded)
            return recorded

        attempt = self.request.retries + 1
        # every broker redelivers a message whose worker died (RabbitMQ at once, Redis via leases)
        deliveries = count_delivery(rt.redis, job_id, self.request.retries, rt.settings.idempotency_ttl)
        if deliveries > rt.settings.max_deliveries:
            return self._poison(rt, job_id, attempt, deliveries)
        started = time.perf_counter()
        rt.delivery.processing(job_id, attempt)
        metadata: dict[str, Any] = {}
        try:
            if rt.redis.exists(cancel_key(job_id)):
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
                with measure_peak(rt.device) as peak:
                    generated = work(rt, job, Progress(self, rt, job_id, attempt, limit))
                _remember_peak(rt, generated.shape or job.the_type, peak.mb)
                model_time = time.perf_counter() - started
                metadata.update(generated.metadata)
                assets = rt.delivery.publish(job.user_id or "", job_id, generated.outputs, generated.metadata)
            total = time.perf_counter() - started
            metadata.update(processing_time=round(total, 3), model_time=round(model_time, 3),
                            delivery_time=round(total - model_time, 3), batch_size=len(assets))
            body = callback_body(job_id, rt.worker_id, "completed", attempt=attempt, assets=assets, metadata=metadata)
            log.info("job %s completed in %.2fs (model %.2fs)", job_id, total, model_time)
        except Exception as exc:
            error = as_job_error(exc)
            if is_device_fault(exc):
                # the CUDA context may be corrupt: leave the job unacknowledged (it is requeued
                # when this worker's heartbeat stops) and exit so the supervisor starts a clean one
                log.critical("job %s: device fault (%s); the worker exits, the job is requeued", job_id,
                             type(exc).__name__)
                logging.shutdown()
                os._exit(EXIT_DEVICE_FAULT)  # no warm shutdown: it could ack the job
            if error is None:
                log.exception("job %s: unexpected %s", job_id, type(exc).__name__)
                error = WorkerUnavailable(f"internal error ({type(exc).__name__})")
                error_dict = {**error.as_dict(), "retryable": False}
            else:
                if error.retryable and self.request.retries < retries_for(error, self.max_retries):
                    log.warning("job %s: %s, retry %d", job_id, error.code, attempt)
                    raise self.retry(exc=error, countdown=backoff(self.request.retries)) from None
                error_dict = error.as_dict()
            metadata["processing_time"] = round(time.perf_counter() - started, 3)
            body = callback_body(job_id, rt.worker_id, "failed", attempt=attempt, metadata=metadata, error=error_dict)
            log.info("job %s failed: %s", job_id, error_dict["code"])
        return end_job(rt, payload, body)

    def _poison(self, rt: Runtime, job_id: str, attempt: int, deliveries: int) -> dict[str, Any]:
        log.error("job %s: delivered %d times, given up as poison", job_id, deliveries)
        error = _poison_error(deliveries)
        body = callback_body(job_id, rt.worker_id, "failed", attempt=attempt, metadata={}, error=error)
        return end_job(rt, {}, body)


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


def _remember_peak(rt: Runtime, shape: str, mb: int) -> None:
    """On CUDA, grow the reservations of the models this job used to weights + the largest peak seen."""
    if rt.ledger is None or rt.device.type != "cuda":
        return
    for name in rt.used:
        rt.ledger.record_peak(name, shape, mb)
        slot = rt.models[name]
        if slot.reservation is not None:
            slot.reservation.resize(rt.ledger.estimate(name, slot.default_mb))


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
