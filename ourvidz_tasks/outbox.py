"""``bin/worker outbox``: an optional consumer of the callback outbox.

Pools deliver their callbacks themselves and hand only what fails to the
durable outbox in Redis (:mod:`~ourvidz_tasks.services.outbox_store`), which any pool
drains while no consumer is alive: the pools alone are a complete
deployment. This consumer, when deployed, takes the draining off the pools
(its heartbeat tells them to leave it) and drains while no pool runs; set
``OURVIDZ_OUTBOX_CONSUMER=1`` on the pools to have a missing or stuck one
reported (logs, ``ourvidz status``, metrics).

It still consumes the Celery queue ``outbox`` that earlier versions of the
pools published to: such a message is appended to the Redis outbox, behind
what waits there, and delivered in order from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery, signals

from .celery import app
from .contract.settings import Settings, load_settings
from .runtime.lifecycle import BaseTask
from .runtime.recovery import Recovery
from .services import metrics
from .services.delivery import HttpCallbacks
from .services.outbox_store import CONSUMER, Drainer, Outbox
from .services.redis_client import connect

log = logging.getLogger(__name__)

QUEUE = "outbox"


@dataclass
class OutboxRuntime:
    """What the outbox consumer needs, built once at start."""

    settings: Settings
    outbox: Outbox
    drainer: Drainer
    recovery: Recovery | None


@app.task(base=BaseTask, bind=True, name="ourvidz.outbox.deliver", send_events=False)
def deliver(self: BaseTask, job_id: str, body: str) -> bool:
    """A body published by an earlier pool version: append it to the Redis outbox (delivered in order)."""
    rt: OutboxRuntime | None = getattr(self.app, "ourvidz_outbox", None)
    if rt is None:
        raise RuntimeError("ourvidz.outbox.deliver runs only in bin/worker outbox")
    rt.outbox.push(job_id, body.encode())
    rt.drainer.wake()
    return True


@signals.celeryd_after_setup.connect
def _start(sender: str, instance: Any, **_: Any) -> None:
    consumer_app: Celery = instance.app
    if QUEUE not in (consumer_app.amqp.queues.consume_from or {}):
        return
    import httpx

    settings = load_settings()
    metrics.start(settings, QUEUE)
    store = connect(settings.redis, settings)
    client = httpx.Client(timeout=settings.http_timeout, follow_redirects=False)
    outbox = Outbox.for_settings(store, settings)
    drainer = Drainer(outbox, HttpCallbacks(settings, client, tries=1).send, sender, consumer=True,
                      max_pause=settings.outbox_max_pause)
    recovery = None
    if settings.broker_is_redis:
        recovery = Recovery(connect(settings.broker_url, settings), sender,
                            lease_seconds=settings.lease_seconds, owner_ttl=settings.visibility_timeout)
        recovery.start()
    consumer_app.ourvidz_outbox = OutboxRuntime(settings, outbox, drainer.start(), recovery)  # type: ignore[attr-defined]
    log.info("%s ready: draining the callback outbox to %s", sender, settings.supabase_url)


@signals.worker_shutdown.connect
def _stop(sender: Any, **_: Any) -> None:
    rt: OutboxRuntime | None = getattr(sender.app, "ourvidz_outbox", None)
    if rt is not None:
        rt.drainer.stop()
        rt.outbox.redis.delete(CONSUMER)  # the pools take the draining over at once
