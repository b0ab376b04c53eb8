"""The life of one generation job, the same for every family: :func:`run_job`.

``run_job(rt, ctx, payload, family, work)`` reads forward: id → already ended? → poison? →
``processing`` → validate → prompt policy → the family's ``work`` (model) → media + storage →
one terminal callback. It is a plain function of what it is given: the pool's runtime, the
running task (a :class:`JobContext`: its id and retry count, its start and progress reports)
and the job, so a test runs it in-process with a runtime it built.

Errors map to the contract's codes (:func:`as_job_error`, pure); retryable ones raise
:class:`RetryJob` (the task turns it into a Celery retry with backoff), and only the last
attempt sends ``failed``. A device fault ends the process through ``on_device_fault``
(status 75, nothing acknowledged). Families provide ``work(rt, job, progress) -> Generated``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import redis
from kombu.exceptions import OperationalError

from ..contract import keys
from ..contract.callbacks import callback_body
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
from ..services.backoff import full_jitter
from ..services.outage import OUTAGE_ERRORS, BrokerAway, is_outage, through_outage
from ..services.tracing import span
from . import bookkeeping
from .admission import admit, leave
from .faults import detach, exit_on_device_fault, exit_process, is_oom
from .recovery import count_delivery
from .runtime import Runtime

if TYPE_CHECKING:
    from ..services.media import Output  # PIL and numpy: a pool's only

log = logging.getLogger(__name__)

CANCEL_TTL = 24 * 3600


@dataclass
class Generated:
    """What a family's work returns: outputs plus job-level metadata."""

    outputs: list[Output]
    metadata: dict[str, Any] = field(default_factory=dict)
    #: the shape that ran (e.g. ``1024x1024x6``; a batch stepped down to 3 ran ``1024x1024x3``): peak
    #: memory is remembered per shape; None: it ran degraded (tiling, offload), no shape's figure
    shape: str | None = ""


class JobContext(Protocol):
    """What the lifecycle needs of the task that runs the job (:class:`~.tasks.JobTask` gives its own)."""

    @property
    def task_id(self) -> str | None: ...
    @property
    def retries(self) -> int:
        """Retries so far (0 on the first attempt)."""
    @property
    def max_retries(self) -> int: ...
    def started(self) -> None:
        """The job started: Flower's events, the ``STARTED`` state, the pool's busy mark."""
    def report(self, meta: dict[str, Any]) -> None:
        """Progress: the ``PROGRESS`` state and a ``task-progress`` event."""


class HandBack(Exception):
    """Redis went away under this attempt where it could not be waited out: the message goes back to
    its queue (a Celery reject with requeue) and no attempt is used."""


#: the status a pool exits with when Redis stays away longer than ``broker_patience`` under a job:
#: its message, never acknowledged, is handed back by the restarted process
EXIT_BROKER_AWAY = 69


class RetryJob(Exception):
    """This attempt failed retryably: run the job again in ``countdown`` seconds (a Celery retry)."""

    def __init__(self, error: JobError, countdown: float) -> None:
        super().__init__(error.code)
        self.error, self.countdown = error, countdown


#: what ends the process on a device fault: ``(exception, what)``, a no-op when there is none
FaultExit = Callable[[BaseException, str], None]


class Progress:
    """``progress(step, total)``: throttled ``processing`` callbacks and Celery PROGRESS state."""

    def __init__(self, ctx: JobContext, rt: Runtime, job_id: str, attempt: int, limit: float) -> None:
        self.ctx, self.rt, self.job_id, self.attempt = ctx, rt, job_id, attempt
        self.interval = rt.settings.progress_interval
        self._last = time.monotonic()
        self.limit, self.deadline = limit, self._last + limit
        self.stage = "generating"
        #: the last percent published (a live preview's callback repeats it: progress never goes back)
        self.percent = 0

    def __call__(self, step: int, total: int) -> None:
        """Called after every denoising step: the watchdog (cancel, time limit), then progress."""
        if self._cancelled():
            raise Cancelled("the job was cancelled")
        now = time.monotonic()
        if now > self.deadline:
            raise JobTimeout(f"the job ran past its {self.limit:g}s time limit")
        events.job_step.send(sender=self.rt.family, job_id=self.job_id, step=step, total=total)
        if step < total and now - self._last < self.interval:
            return
        self._last = now
        percent = self.percent = int(100 * step / max(total, 1))
        try:  # progress is best effort: a broker outage must not end the job it reports on
            self.rt.delivery.processing(self.job_id, self.attempt, {"progress": percent})
            if self.ctx.task_id:
                self.ctx.report({"job_id": self.job_id, "percent": percent, "step": step, "total": total,
                                 "stage": self.stage})
        except (redis.RedisError, OSError, OperationalError) as exc:
            log.warning("job %s: progress not published (%s)", self.job_id, type(exc).__name__)

    def _cancelled(self) -> bool:
        """The cancel flag; while Redis is away it reads as not set (read again at the next step)."""
        try:
            return bool(self.rt.redis.exists(keys.cancel(self.job_id)))
        except redis.RedisError:
            return False


Work = Callable[[Runtime, Job, Progress], Generated]


def cancel(store: redis.Redis, job_id: str) -> None:
    """Ask the worker running ``job_id`` to stop at its next step (``failed``, ``CANCELLED``).

    Celery's revoke reaches a solo worker only between jobs; this flag is read
    at every denoising step. A job cancelled before it starts also ends with
    ``CANCELLED`` when it is picked up.
    """
    store.set(keys.cancel(job_id), "1", ex=CANCEL_TTL)


def backoff(retries: int, base: float = 2.0, cap: float = 600.0) -> int:
    """The countdown of Celery retry ``retries``: :func:`~ourvidz_tasks.services.backoff.full_jitter`,
    rounded up to whole seconds (at least 1).

    Celery's native delayed delivery (RabbitMQ quorum queues) sends ``int(countdown)``
    seconds and refuses 0, so a countdown under a second made the retry itself fail.
    """
    return max(1, math.ceil(full_jitter(retries, base, cap)))


def retries_for(error: JobError, default: int) -> int:
    """How many retries an error class gets: a model error one (after a reload), the rest ``default``."""
    return 1 if isinstance(error, ModelLoadError) else default


def as_job_error(exc: BaseException) -> JobError | None:
    """Map library exceptions to wire errors (None: not one we know); no side effect.

    Out-of-memory anywhere in the chain (a model load wraps it) is ``OOM_ERROR``. A device
    fault is not an error a job reports: call sites end the process first
    (:func:`~ourvidz_tasks.runtime.faults.exit_on_device_fault`), then classify.
    """
    if isinstance(exc, JobError) and not isinstance(exc, ModelLoadError):
        return exc
    if is_oom(exc):
        return exc if isinstance(exc, OutOfMemory) else OutOfMemory("the device ran out of memory")
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, DeliveryError):
        return WorkerUnavailable(str(exc))
    return None


def run_job(rt: Runtime, ctx: JobContext, payload: Any, family: str, work: Work, *,
            on_device_fault: FaultExit = exit_on_device_fault,
            on_broker_away: Callable[[int], object] = exit_process) -> dict[str, Any]:
    """Run one attempt of a generation job; return the terminal callback body recorded for it.

    Raises :class:`RetryJob` when the attempt failed retryably and retries are left, and
    :class:`HandBack` when Redis went away where the attempt could not wait for it. When Redis stays
    away longer than ``broker_patience``, ``on_broker_away(EXIT_BROKER_AWAY)`` ends the process
    (nothing acknowledged): a broker outage never ends a job.
    """
    try:
        return _run_job(rt, ctx, payload, family, work, on_device_fault)
    except BrokerAway as exc:
        log.error("job %s: %s; the worker exits with status %d, the job is handed back",
                  usable_id(payload), exc, EXIT_BROKER_AWAY)
        on_broker_away(EXIT_BROKER_AWAY)
        raise HandBack(str(exc)) from None


def _run_job(rt: Runtime, ctx: JobContext, payload: Any, family: str, work: Work,
             on_device_fault: FaultExit) -> dict[str, Any]:
    job_id = usable_id(payload)
    if job_id is None:
        raw = json.dumps(payload)[:65536] if payload is not None else None
        rt.dead.push("no usable job id", raw=raw, queue=family, task_id=ctx.task_id)
        return {"status": "dead_letter", "reason": "no usable job id"}
    recorded, deliveries, cancelled = admit(rt, job_id, ctx.retries)
    if recorded is not None:
        log.info("job %s already ended (%s); not run again", job_id, recorded["status"])
        rt.delivery.resend(job_id, recorded)
        return recorded
    try:
        return _attempt(rt, ctx, payload, family, work, on_device_fault, job_id, deliveries, cancelled)
    finally:
        leave(rt, job_id)


def _attempt(rt: Runtime, ctx: JobContext, payload: Any, family: str, work: Work, on_device_fault: FaultExit,
             job_id: str, deliveries: int, cancelled: bool) -> dict[str, Any]:
    attempt = ctx.retries + 1
    if deliveries > rt.settings.max_deliveries:
        return _poison(rt, job_id, attempt, deliveries)
    started = time.perf_counter()
    waited = bookkeeping.queue_wait(rt, job_id)  # None: no arrival recorded for it
    rt.delivery.processing(job_id, attempt, None if waited is None else {"queue_wait_s": waited}, wait=True)
    try:
        ctx.started()  # Flower's events and the STARTED state, while the callback travels
    except OUTAGE_ERRORS as exc:
        log.warning("job %s: start not recorded (%s)", job_id, type(exc).__name__)
    metadata: dict[str, Any] = {}
    done: list[dict[str, Any]] | None = None  # the assets of a job that completed
    model_time: float | None = None
    retry: JobError | None = None
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
            with span("model", **{"ourvidz.job_id": job_id, "ourvidz.family": family}), rt.measure() as peak:
                generated = work(rt, job, Progress(ctx, rt, job_id, attempt, limit))
            if generated.shape is not None:  # None: a stepped-down run, no figure of any shape
                bookkeeping.remember_peak(rt, generated.shape or job.the_type, peak)
            rt.settle()  # the job's working memory back to the card and the ledger, before the uploads
            model_time = time.perf_counter() - started
            metadata.update(generated.metadata)
            assets = rt.delivery.publish(job.user_id or "", job_id, generated.outputs, generated.metadata)
        events.job_uploaded.send(sender=rt.family, job_id=job_id)
        total = time.perf_counter() - started
        metadata.update(processing_time=round(total, 3), model_time=round(model_time, 3),
                        delivery_time=round(total - model_time, 3), batch_size=len(assets))
        log.info("job %s completed in %.2fs (model %.2fs)", job_id, total, model_time)
        done = assets
    except Exception as exc:
        model_time = time.perf_counter() - started if model_time is None else model_time
        # a device fault ends the process here (status 75, the message unacknowledged: it is requeued)
        on_device_fault(exc, f"job {job_id}")
        if is_outage(exc):  # Redis went away under a step that could not wait for it: not the job's fault
            through_outage(rt.redis.ping, rt.settings.broker_patience, f"job {job_id}")
            log.warning("job %s: Redis went away mid-attempt (%s); handed back", job_id, type(exc).__name__)
            raise HandBack(type(exc).__name__) from None
        error = as_job_error(exc)
        oom = isinstance(error, OutOfMemory)
        if error is None:
            log.exception("job %s: unexpected %s", job_id, type(exc).__name__)
            error = WorkerUnavailable(f"internal error ({type(exc).__name__})")
            error_dict = {**error.as_dict(), "retryable": False}
        elif error.retryable and ctx.retries < retries_for(error, ctx.max_retries):
            log.warning("job %s: %s, retry %d", job_id, error.code, attempt)
            retry = error
        else:
            error_dict = error.as_dict()
        if oom:
            detach(error)  # its traceback would keep the failed run's tensors alive
    if oom:
        release_memory(rt.device)  # outside the except: the failed run's frames are gone
    rt.settle()
    if retry is not None:
        bookkeeping.attempt_retried(rt, job_id, model_time or 0.0)
        raise RetryJob(retry, backoff(ctx.retries))
    metadata["gpu_seconds"] = bookkeeping.gpu_seconds(rt, job_id, ctx.retries, model_time or 0.0)
    if waited is not None:
        metadata["queue_wait_s"] = waited
    if done is not None:
        body = callback_body(job_id, rt.worker_id, "completed", attempt=attempt, assets=done, metadata=metadata)
    else:
        metadata["processing_time"] = round(time.perf_counter() - started, 3)
        body = callback_body(job_id, rt.worker_id, "failed", attempt=attempt, metadata=metadata, error=error_dict)
        log.info("job %s failed: %s", job_id, error_dict["code"])
    return end_job(rt, payload, body)


def _poison(rt: Runtime, job_id: str, attempt: int, deliveries: int) -> dict[str, Any]:
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
        queue_wait=meta.get("queue_wait_s"), gpu_seconds=meta.get("gpu_seconds"),
    )
    recorded = through_outage(lambda: rt.delivery.finish(body), rt.settings.broker_patience,
                              f"job {body['job_id']}: terminal record")
    rt.delivery.discard(body["job_id"])
    if recorded is body:  # this attempt recorded it (not an earlier one's record): counted once
        bookkeeping.job_ended(rt, payload, body)
    bookkeeping.fair_share(rt, body)
    return recorded


def poison_guard(task: Any, rt: Runtime, kind: str) -> str | None:
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
