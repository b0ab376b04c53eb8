"""RabbitMQ quorum queues (``OURVIDZ_AMQP_QUEUE_TYPE=quorum``): every queue exists before Celery binds it.

Celery's native delayed delivery (what a countdown or a retry uses on quorum
queues) binds *every* queue of the app to its delivery exchange when a worker
starts, but a pool declares only the queue it consumes: on a fresh vhost the
first ``sdxl`` pool failed to bind ``chat``, ``wan`` and ``outbox`` and logged
"Native delayed delivery will not be available". So each pool declares all of
them (same arguments, idempotent) first, at ``worker_init``
(:mod:`ourvidz_tasks.runtime.signals`).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def uses_quorum_queues(app: Any) -> bool:
    return app.conf.task_default_queue_type == "quorum"


def declare_every_queue(app: Any) -> None:
    """Declare every queue of ``app`` (idempotent); a broker that does not answer yet is only logged."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=3)
            channel = connection.default_channel
            for queue in app.amqp.queues.values():
                queue.bind(channel).declare()
    except Exception as exc:  # the broker is late: the pool's own queue is still bound when it connects
        log.warning("could not declare the quorum queues before start (%s); delayed delivery binds what exists",
                    type(exc).__name__)
