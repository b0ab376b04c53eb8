"""What the broker guard does with a queue item that is not a Celery message.

The guard (:mod:`~ourvidz_tasks.services.guard`) hands a raw job (the legacy format: a bare job
dict pushed on a queue) to :func:`republish_raw`, which publishes it as its family's generate
task; anything else, or a raw job it cannot route, becomes a dead letter.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from ..contract import names
from ..contract.jobs import FAMILY_OF_TYPE, usable_id
from ..services.guard import DeadLetters, hooks


def republish_raw(app: Celery, job: dict[str, Any]) -> bool:
    """Publish a raw job (legacy format) as its proper task; False if it can't be routed."""
    job_id = usable_id(job)
    family = FAMILY_OF_TYPE.get(str(job.get("type") or job.get("job_type")))
    if job_id is None or family is None:
        return False
    app.send_task(names.GENERATE[family], args=[job])
    return True


def route_raw_jobs(app: Celery, dead: DeadLetters) -> None:
    """Have this process's broker guard republish raw jobs through ``app`` and keep the rest in ``dead``."""
    hooks.dead = dead
    hooks.raw_job = lambda job: republish_raw(app, job)
