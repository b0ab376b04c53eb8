"""A model pool's start and stop: build its runtime, warm its models up, attach it to the app.

Run from ``celeryd_after_setup`` (:mod:`.signals`): logging is configured and nothing is consumed
yet, and Celery starts consuming only once this returns, so a pool never takes a job before it
is ready. ``worker_shutdown`` unloads and closes it (:func:`~.runtime.stop_pool`).
"""

from __future__ import annotations

import contextlib
import logging
import time

import redis
from celery import Celery

from ..contract.errors import ConfigError, ModelLoadError, OutOfMemory, WorkerUnavailable
from ..services import backoff, metrics
from ..services.guard import FairFetch, hooks
from .build import build_runtime
from .roles import exit_before_consuming
from .runtime import Runtime, warm_models

log = logging.getLogger(__name__)

#: exit status of a pool whose Redis did not answer within ``OURVIDZ_STARTUP_WAIT`` (its supervisor restarts it)
EXIT_NOT_READY = 69
#: exit status of a pool whose models cannot load (a configuration or model error)
EXIT_WARMUP_FAILED = 3


def start_pool(app: Celery, sender: str, family: str) -> Runtime:
    """Build the pool's runtime, warm it up, attach it to ``app`` and start its background threads."""
    rt = build_runtime(app, family, sender)
    metrics.start(rt.settings, family)  # before the warm loads, so they are counted
    log.info("%s warming up", sender)
    try:
        warm_up(rt, sender)
    except (ConfigError, ModelLoadError) as exc:
        log.critical("warmup failed: %s", exc)
        exit_before_consuming(EXIT_WARMUP_FAILED)
    app.ourvidz_runtime = rt  # type: ignore[attr-defined]
    if rt.recovery is not None:
        rt.recovery.start()  # hands back at once what an earlier process of this name held
    if rt.intake is not None:  # before Celery consumes: its fetch picks in fair order
        hooks.fair = FairFetch(frozenset(rt.intake.queues), present=rt.settings.lease_seconds,
                               keep=2.0 * rt.settings.max_job_seconds)
        rt.intake.start()
    if rt.relay is not None:
        rt.relay.start()
    if rt.drainer is not None:
        rt.drainer.start()
    log.info("%s ready: %s on %s", sender, ", ".join(warm_models(family, rt.settings)), rt.device)
    return rt


def _warm(rt: Runtime) -> None:
    """Load the pool's start models; Redis must answer (the ledger and the load counts live there)."""
    rt.redis.ping()
    if rt.recovery is not None:
        rt.recovery.broker.ping()
    for name in warm_models(rt.family, rt.settings):
        try:  # SDXL waits to be resident; the others load now only if they fit
            rt.models[name].get(wait=None if rt.family == "sdxl" else 0.0)
        except (WorkerUnavailable, OutOfMemory):
            log.info("%s: no GPU memory free at start; it loads on first use", name)


def warm_up(rt: Runtime, sender: str) -> None:
    """Warm up once Redis answers, again from scratch after every Redis error (a restart mid-warmup).

    After ``startup_wait`` seconds without Redis the process exits with :data:`EXIT_NOT_READY`
    and its supervisor restarts it.
    """
    deadline = time.monotonic() + rt.settings.startup_wait
    pauses = backoff.Backoff(0.5, 5.0)
    while True:
        try:
            _warm(rt)
            return
        except redis.RedisError as exc:
            for slot in rt.models.values():  # a load's bookkeeping may be half done: start over
                with contextlib.suppress(redis.RedisError):
                    slot.unload()
                if slot.reservation is not None and rt.heartbeat is not None:
                    rt.heartbeat.discard(slot.reservation)
                slot.model, slot.reservation = None, None
            left, pause = deadline - time.monotonic(), pauses.next()
            if left <= 0:
                log.critical("%s: Redis did not answer within %gs (%s); exiting so that the supervisor restarts it",
                             sender, rt.settings.startup_wait, type(exc).__name__)
                exit_before_consuming(EXIT_NOT_READY)
            log.warning("%s not ready: Redis does not answer (%s); warmup again in %.1fs", sender,
                        type(exc).__name__, min(pause, left))
            time.sleep(min(pause, left))
