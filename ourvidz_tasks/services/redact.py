"""Keep prompts out of logs and Flower.

Celery reports a task's return value (``saferepr`` of it) in the worker log
line "Task ... succeeded" and in the ``task-succeeded`` event that Flower
shows. Our return values carry prompts (the enhanced job, the callback
metadata, chat responses), so :class:`QuietRequest` drops the value from the
event and :class:`ReturnValueFilter` from the log line. Task arguments are
already reduced to the job id by ``argsrepr`` at publish time.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.request import Request

HIDDEN = "<hidden: may hold prompts; see the job's callback>"


class QuietRequest(Request):  # type: ignore[misc]
    """A Celery request whose ``task-succeeded`` event omits the return value."""

    def send_event(self, type: str, **fields: Any) -> None:
        if "result" in fields and type == "task-succeeded":
            fields["result"] = HIDDEN
        super().send_event(type, **fields)


class ReturnValueFilter(logging.Filter):
    """Blanks ``return_value`` in Celery's "Task ... succeeded" log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, dict) and "return_value" in args:
            record.args = {**args, "return_value": HIDDEN}
        return True


#: libraries whose warnings can quote prompts (e.g. diffusers' "truncated" CLIP warning)
QUIET_LIBRARIES = ("diffusers", "transformers")


def install_log_filter() -> None:
    """Attach the filter to Celery's trace logger and quiet prompt-quoting libraries (idempotent)."""
    logger = logging.getLogger("celery.app.trace")
    if not any(isinstance(f, ReturnValueFilter) for f in logger.filters):
        logger.addFilter(ReturnValueFilter())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
