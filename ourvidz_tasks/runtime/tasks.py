"""The base classes of our Celery tasks: :class:`BaseTask` (every task) and :class:`JobTask` (generation).

A :class:`JobTask` hands its job to :func:`~ourvidz_tasks.runtime.lifecycle.run_job` with the
pool's runtime and itself as the job's context, and turns a :class:`~.lifecycle.RetryJob` into a
Celery retry. The task modules (``ourvidz_tasks.sdxl`` ...) stay thin: parameters and the model call.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, NoReturn

import redis
from celery import Task
from celery.exceptions import Ignore, Reject

from ..contract import names
from ..services.progress import PROGRESS
from .admission import Defer
from .between_jobs import mark_busy
from .lifecycle import HandBack, RetryJob, Work, run_job
from .runtime import runtime
from .taskevents import flush_task_events

log = logging.getLogger(__name__)

#: seconds an unready process holds a job before handing it back
NOT_READY_PAUSE = 1.0


class BaseTask(Task):  # type: ignore[misc]
    """Base of every task here: acks late, no type checks (messages name the job id only:
    :class:`~ourvidz_tasks.services.redact.QuietAMQP`)."""

    acks_late = True
    reject_on_worker_lost = True
    typing = False
    max_retries = 3
    Request = "ourvidz_tasks.services.redact:QuietRequest"

    #: a job task records its start itself, right after its ``processing`` callback is on its way
    marks_own_start = False

    def mark_started(self) -> None:
        """Flower's task events now (a solo pool would flush them only after the task), the
        ``STARTED`` state in the result backend (``ourvidz submit`` shows it) and, for a job
        task, the pool's busy mark in the memory ledger."""
        flush_task_events(self.app)
        rt = getattr(self.app, "ourvidz_runtime", None)
        if self.marks_own_start and rt is not None:
            mark_busy(rt)
        if self.request.id and not self.request.is_eager:
            try:
                self.update_state(state="STARTED", meta={"pid": os.getpid(), "hostname": self.request.hostname})
            except (redis.RedisError, OSError) as exc:  # a state for `ourvidz submit`: never worth the job
                log.warning("task %s: STARTED state not stored (%s)", self.request.id, type(exc).__name__)

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """A pool's job that reaches a process with no warmed-up runtime goes back to its queue.

        Pools consume only once warm (:func:`~ourvidz_tasks.runtime.pool.warm_up`), so this is the
        last guard: never a job taken and dropped without a callback.
        """
        if self.name.split(".")[1:2] != [names.OUTBOX] and getattr(self.app, "ourvidz_runtime", None) is None:
            log.error("task %s reached %s before it was warm; back to its queue", task_id, self.request.hostname)
            time.sleep(NOT_READY_PAUSE)  # no hot loop while this process stays unready
            raise Reject("this process is not a warmed-up ourvidz pool", requeue=True)


class TaskContext:
    """A running :class:`JobTask` as the lifecycle's :class:`~.lifecycle.JobContext`."""

    def __init__(self, task: BaseTask) -> None:
        self.task = task

    @property
    def task_id(self) -> str | None:
        task_id: str | None = self.task.request.id
        return task_id

    @property
    def retries(self) -> int:
        return int(self.task.request.retries)

    @property
    def max_retries(self) -> int:
        return int(self.task.max_retries)

    def started(self) -> None:
        self.task.mark_started()

    def report(self, meta: dict[str, Any]) -> None:
        self.task.update_state(state=PROGRESS, meta=meta)
        # Flower reads events, not the result backend: the same as a custom task event
        self.task.send_event("task-progress", retry=False, result=meta)


class JobTask(BaseTask):
    """Base of the generation tasks: the job lifecycle (:func:`~.lifecycle.run_job`) on this pool's runtime."""

    marks_own_start = True

    def execute(self, payload: Any, family: str, work: Work) -> dict[str, Any]:
        try:
            return run_job(runtime(self.app), TaskContext(self), payload, family, work)
        except RetryJob as exc:
            retry = exc
        except HandBack as exc:  # Redis went away mid-attempt: back to the queue, no attempt used
            raise Reject(str(exc), requeue=True) from None
        except Defer as exc:  # a redelivered copy of a job that runs in a live incarnation: not now
            self.defer(exc)
        raise self.retry(exc=retry.error, countdown=retry.countdown)  # outside the except, as Celery expects

    def defer(self, exc: Defer) -> NoReturn:
        """Publish this delivery again in ``exc.countdown`` seconds (same attempt) and drop this one."""
        log.info("task %s: its job runs in live incarnation %s; this copy comes back in %gs",
                 self.request.id, exc.runner, exc.countdown)
        self.signature_from_request(self.request, countdown=exc.countdown, retries=self.request.retries).apply_async()
        raise Ignore()
