"""Generation jobs revoked or expired before they ran still get their one terminal callback."""

from __future__ import annotations

import logging
from typing import Any

from ..contract.callbacks import callback_body
from ..contract.errors import Cancelled, JobTimeout
from ..contract.jobs import usable_id
from .lifecycle import end_job
from .runtime import Runtime

log = logging.getLogger(__name__)


def end_revoked(rt: Runtime, task: Any, request: Any, expired: bool) -> dict[str, Any] | None:
    """``task_revoked``: send the ``failed`` callback (``CANCELLED``, or ``JOB_TIMEOUT`` when it
    expired) of a generate job that never ran; None for anything else."""
    if not str(getattr(task, "name", "")).endswith(".generate"):
        return None
    args = getattr(request, "args", None) or [None]
    job_id = usable_id(args[0])
    if job_id is None:
        return None
    error = JobTimeout("the job arrived after its expiry time") if expired else Cancelled("the job was revoked")
    log.info("job %s: %s", job_id, error.code)
    body = callback_body(job_id, rt.worker_id, "failed", attempt=1, metadata={}, error=error.as_dict())
    return end_job(rt, args[0], body)
