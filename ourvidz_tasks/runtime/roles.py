"""Which roles a worker process plays, read from the queues it consumes, and how it refuses to start.

``bin/worker sdxl|chat|wan`` is a model pool of that family; ``bin/worker outbox`` the callback
outbox consumer. A worker that consumes two families' queues would take jobs it has no model
for: it exits before consuming anything.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from ..contract import names
from .faults import exit_process

log = logging.getLogger(__name__)

#: exit status of a worker started on more than one family's queue
EXIT_BAD_QUEUES = 2


def exit_before_consuming(status: int) -> NoReturn:
    """End a worker that never consumed: Celery would turn a SystemExit raised here into status 0."""
    exit_process(status)


def family_of(app: Any, sender: str) -> str | None:
    """The model family (``sdxl``, ``chat``, ``wan``) this worker's pool serves, or None.

    Exits (status :data:`EXIT_BAD_QUEUES`) when it consumes more than one family's queue.
    """
    queues = _queues(app)
    families = [names.family_of_queue(q) for q in queues if names.family_of_queue(q) in names.FAMILIES]
    if len(families) > 1:
        log.critical("worker %s consumes %s: one model family per pool (bin/worker sdxl|chat|wan)", sender, queues)
        exit_before_consuming(EXIT_BAD_QUEUES)
    if not families and queues != [names.OUTBOX]:
        log.warning("worker %s consumes %s: no model family to warm up", sender, queues)
    return families[0] if families else None


def consumes_outbox(app: Any) -> bool:
    """This worker consumes the ``outbox`` queue (``bin/worker outbox``)."""
    return names.OUTBOX in _queues(app)


def _queues(app: Any) -> list[str]:
    return sorted(app.amqp.queues.consume_from or {})
