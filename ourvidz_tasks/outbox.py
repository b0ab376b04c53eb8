"""The callback outbox: ``ourvidz.outbox.deliver`` on queue ``outbox``, run by ``bin/worker outbox``.

GPU pools hand every callback body to this queue (``OURVIDZ_CALLBACKS=outbox``,
the default) and move on. One light consumer (no torch, no model) delivers
them in the order they were queued, signed, with the inline transport's
retries, and while the endpoint is down it keeps retrying the body at the
head of the queue with capped backoff: the bodies behind it wait durably in
the broker, so a job's callbacks arrive in order once the edge is back. A
body the edge refuses (4xx) is a dead letter. Terminal bodies are recorded
as delivered here. Run one consumer per broker: more would break per-job order.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, signals

from . import events, metrics
from .app import app
from .delivery import HttpCallbacks
from .errors import DeliveryError, DeliveryRefused
from .guard import DeadLetters
from .lifecycle import BaseTask
from .recovery import Recovery
from .settings import Settings, load_settings

log = logging.getLogger(__name__)

QUEUE = "outbox"
MAX_PAUSE = 30.0


@dataclass
class OutboxRuntime:
    """What the outbox consumer needs, built once at start."""

    settings: Settings
    http: HttpCallbacks
    redis: redis.Redis
    dead: DeadLetters
    recovery: Recovery | None


@app.task(base=BaseTask, bind=True, name="ourvidz.outbox.deliver", send_events=False)
def deliver(self: BaseTask, job_id: str, body: str) -> bool:
    """Deliver one callback body; blocks (retrying) while the endpoint is down."""
    rt: OutboxRuntime | None = getattr(self.app, "ourvidz_outbox", None)
    if rt is None:
        raise RuntimeError("ourvidz.outbox.deliver runs only in bin/worker outbox")
    data = body.encode()
    status = json.loads(body).get("status")
    pause = rt.settings.http_backoff or 0.5
    while True:
        try:
            rt.http.send(job_id, data)
            break
        except DeliveryRefused as exc:
            rt.dead.push(f"callback refused by the edge: {exc}", raw=body, queue=QUEUE, job_id=job_id)
            events.callback_failed.send(sender="outbox", job_id=job_id, status=status)
            return False
        except DeliveryError as exc:
            log.warning("job %s: %s callback waits for the edge (%s); next try in %.1fs", job_id, status, exc, pause)
            events.callback_failed.send(sender="outbox", job_id=job_id, status=status)
            time.sleep(pause)
            pause = min(MAX_PAUSE, pause * 2)
    if status in ("completed", "failed"):
        rt.redis.set(f"ourvidz:job:{job_id}:delivered", "1", ex=rt.settings.idempotency_ttl)
    return True


@signals.celeryd_after_setup.connect
def _start(sender: str, instance: Any, **_: Any) -> None:
    consumer_app: Celery = instance.app
    if QUEUE not in (consumer_app.amqp.queues.consume_from or {}):
        return
    import httpx

    settings = load_settings()
    metrics.start(settings, QUEUE)
    store = redis.Redis.from_url(settings.redis)
    client = httpx.Client(timeout=settings.http_timeout, follow_redirects=False)
    recovery = None
    if settings.broker_is_redis:
        recovery = Recovery(redis.Redis.from_url(settings.broker_url), sender,
                            lease_seconds=settings.lease_seconds, owner_ttl=settings.visibility_timeout)
        recovery.start()
    consumer_app.ourvidz_outbox = OutboxRuntime(  # type: ignore[attr-defined]
        settings, HttpCallbacks(settings, client), store, DeadLetters(store), recovery
    )
    log.info("%s ready: delivering callbacks to %s", sender, settings.supabase_url)
