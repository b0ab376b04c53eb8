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

Its runtime (built at start, withdrawn at shutdown) is
:mod:`~ourvidz_tasks.runtime.outbox_consumer`; the signal handlers that do it are
:mod:`~ourvidz_tasks.runtime.signals`. This module imports neither torch, PIL nor numpy: the
consumer runs from the light install (``pip install .``).
"""

from __future__ import annotations

from .celery import app
from .contract import names
from .runtime import signals  # noqa: F401  (a worker registers its signal handlers with its task module)
from .runtime.outbox_consumer import outbox_runtime
from .runtime.tasks import BaseTask

QUEUE = names.OUTBOX


@app.task(base=BaseTask, bind=True, name=names.OUTBOX_DELIVER, send_events=False)
def deliver(self: BaseTask, job_id: str, body: str) -> bool:
    """A body published by an earlier pool version: append it to the Redis outbox (delivered in order)."""
    rt = outbox_runtime(self.app)
    rt.outbox.push(job_id, body.encode())
    rt.drainer.wake()
    return True
