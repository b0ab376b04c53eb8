"""The runtime of ``bin/worker outbox``, the optional consumer of the callback outbox.

Built at ``celeryd_after_setup`` (:mod:`.signals`) when the worker consumes the ``outbox``
queue: it drains the Redis outbox (:mod:`~ourvidz_tasks.services.outbox_store`) and announces
itself, so the pools leave the draining to it; at ``worker_shutdown`` it withdraws, and the
pools take the draining over at once. No model, no torch: it runs from the light install.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx

from ..contract import names
from ..contract.settings import Settings, load_settings
from ..services import metrics
from ..services.delivery import HttpCallbacks
from ..services.outbox_store import CONSUMER, Drainer, Outbox
from ..services.redis_client import connect
from .recovery import Recovery

log = logging.getLogger(__name__)


@dataclass
class OutboxRuntime:
    """What the outbox consumer needs, built once at start."""

    settings: Settings
    outbox: Outbox
    drainer: Drainer
    recovery: Recovery | None


def start_outbox(app: Any, sender: str) -> OutboxRuntime:
    """Build the consumer's runtime, start draining and attach it to ``app`` (``app.ourvidz_outbox``)."""
    settings = load_settings()
    metrics.start(settings, names.OUTBOX)
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
    rt = OutboxRuntime(settings, outbox, drainer.start(), recovery)
    app.ourvidz_outbox = rt
    log.info("%s ready: draining the callback outbox to %s", sender, settings.supabase_url)
    return rt


def stop_outbox(app: Any) -> None:
    """Stop draining and withdraw (``worker_shutdown``): the pools take the draining over at once."""
    rt: OutboxRuntime | None = getattr(app, "ourvidz_outbox", None)
    if rt is not None:
        rt.drainer.stop()
        rt.outbox.redis.delete(CONSUMER)


def outbox_runtime(app: Any) -> OutboxRuntime:
    """The running outbox consumer's runtime (only ``bin/worker outbox`` has one)."""
    rt: OutboxRuntime | None = getattr(app, "ourvidz_outbox", None)
    if rt is None:
        raise RuntimeError(f"{names.OUTBOX_DELIVER} runs only in bin/worker outbox")
    return rt
