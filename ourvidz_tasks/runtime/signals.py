"""Every Celery signal handler of the worker side, registered here and nowhere else.

The task modules (``ourvidz_tasks.sdxl``, ``chat``, ``wan`` and ``outbox``) import this module, so a
worker registers these handlers when it imports its role's task module; the app module
(``ourvidz_tasks.celery``) does not, so publishers, Flower and the CLI load none of it. The app
is never imported here: each handler gets it from its signal's sender.

One handler per signal; the steps of a handler run in this order:

``worker_init``
    1. RabbitMQ quorum mode: every queue declared (:func:`~ourvidz_tasks.services.quorum.declare_every_queue`),
       before Celery binds them all for native delayed delivery;
    2. the idle timer (:class:`~.control.ServeRequests`) on the worker's consumer.
``celeryd_after_setup`` (logging configured, nothing consumed yet; consuming starts when it returns)
    1. the log filter that keeps prompts, keys and signed URLs out of the logs;
    2. a pool: its runtime built and warmed up (:func:`~.pool.start_pool`; exits when it cannot);
    3. the outbox consumer: its runtime, draining (:func:`~.outbox_consumer.start_outbox`).
``worker_ready``
    1. the consumer kept on the app (task events flushed on demand, :mod:`.taskevents`).
``task_received``
    1. the message owned (:meth:`~.recovery.Recovery.received`): a crash hands it back quickly.
``task_prerun``
    1. the start announced (task events; a non-job task's ``STARTED``), at dispatch;
    2. the job gate entered (:func:`~.between_jobs.job_entered`): waits for upkeep in flight, counts the
       job, marks the pool busy. In this order, Flower sees a task as soon as it is dispatched, even
       while it waits for a model load or unload between jobs to end.
``task_postrun``
    1. the message's owner record released (:meth:`~.recovery.Recovery.ended`);
    2. the job gate left (:func:`~.between_jobs.job_left`): idle mark, requests served, predictive load.
       In this order, the owner record's grace starts when the task ends, not after a model load
       the upkeep may do.
``task_revoked``
    1. a revoked or expired generate job's terminal callback (:func:`~.revoked.end_revoked`).
``worker_shutdown``
    1. a pool's models unloaded and clients closed (:func:`~.runtime.stop_pool`);
    2. the outbox consumer withdrawn (:func:`~.outbox_consumer.stop_outbox`): the pools drain again.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from ..services.quorum import declare_every_queue, uses_quorum_queues
from ..services.redact import install_log_filter
from .between_jobs import job_entered, job_left, upkept
from .control import install as install_idle_timer
from .outbox_consumer import start_outbox, stop_outbox
from .revoked import end_revoked
from .roles import consumes_outbox, family_of
from .runtime import stop_pool
from .taskevents import announce_start, keep_consumer


def _recovery_of(app: Any) -> Any:
    """The crash recovery of this worker (a pool's or the outbox consumer's), if any."""
    rt = getattr(app, "ourvidz_runtime", None) or getattr(app, "ourvidz_outbox", None)
    return getattr(rt, "recovery", None)


@signals.worker_init.connect
def _worker_init(sender: Any, **_: Any) -> None:
    if uses_quorum_queues(sender.app):
        declare_every_queue(sender.app)
    install_idle_timer(sender.app)


@signals.celeryd_after_setup.connect
def _after_setup(sender: str, instance: Any, **_: Any) -> None:
    app = instance.app
    install_log_filter()
    family = family_of(app, sender)
    if family is not None:
        # a pool's machinery (the model loaders: torch, PIL) is imported by a pool only: the outbox
        # consumer runs from the light install, which has none of it (not an import cycle: pool
        # imports nothing of this module)
        from .pool import start_pool

        start_pool(app, sender, family)
    if consumes_outbox(app):
        start_outbox(app, sender)


@signals.worker_ready.connect
def _ready(sender: Any, **_: Any) -> None:
    keep_consumer(sender)


@signals.task_received.connect
def _received(sender: Any = None, request: Any = None, **_: Any) -> None:
    # Celery's request.delivery_info has no delivery_tag; the kombu message has it
    tag = getattr(getattr(request, "message", None), "delivery_tag", None)
    recovery = _recovery_of(getattr(sender, "app", None))
    if recovery is not None and tag:
        recovery.received(getattr(request, "id", None), str(tag))


@signals.task_prerun.connect
def _prerun(sender: Any = None, **_: Any) -> None:
    announce_start(sender)
    rt = upkept(getattr(sender, "app", None))
    if rt is not None:
        job_entered(rt, getattr(sender, "marks_own_start", False))


@signals.task_postrun.connect
def _postrun(sender: Any = None, task_id: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    recovery = _recovery_of(app)
    if recovery is not None:
        recovery.ended(task_id)
    rt = upkept(app)
    if rt is not None:
        job_left(rt)


@signals.task_revoked.connect
def _revoked(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    rt = getattr(getattr(sender, "app", None), "ourvidz_runtime", None)  # the sender is the task
    if rt is not None:
        end_revoked(rt, sender, request, expired)


@signals.worker_shutdown.connect
def _shutdown(sender: Any, **_: Any) -> None:
    stop_pool(sender.app)
    stop_outbox(sender.app)
