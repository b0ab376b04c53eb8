"""Keep prompts out of logs and Flower.

Celery reports a task's return value (``saferepr`` of it) in the worker log
line "Task ... succeeded" and in the ``task-succeeded`` event that Flower
shows. Our return values carry prompts (the enhanced job, the callback
metadata, chat responses), so :class:`QuietRequest` drops the value from the
event and :class:`ReturnValueFilter` from the log line. Task arguments are
reduced to the job id when the message is made (:class:`QuietAMQP`): every
message of our tasks, whoever sends it (a publisher, a chain's next step sent
by a pool, a retry, the bridge), names the job id only.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.app.amqp import AMQP
from celery.worker.request import Request

from ..contract import names
from ..contract.jobs import usable_id

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


class QuietAMQP(AMQP):  # type: ignore[misc]
    """The app's message maker: a message of one of our tasks shows its job id only (``argsrepr``),
    never its payload, in its headers and its ``task-sent`` event (Flower, events, logs), whoever
    sends it: a publisher, a pool sending a chain's next step or a retry, the bridge."""

    def as_task_v2(self, task_id: str, name: str, args: Any = None, kwargs: Any = None, *rest: Any,
                   **options: Any) -> Any:
        if name in names.TASKS:
            first = args[0] if isinstance(args, tuple | list) and args else None
            options["argsrepr"] = f"({usable_id(first) or '?'!r},)"
            options["kwargsrepr"] = "{}"
        return super().as_task_v2(task_id, name, args, kwargs, *rest, **options)


#: libraries whose warnings can quote prompts (e.g. diffusers' "truncated" CLIP warning)
QUIET_LIBRARIES = ("diffusers", "transformers")


def install_log_filter() -> None:
    """Attach the filter to Celery's trace logger and quiet prompt-quoting libraries (idempotent)."""
    logger = logging.getLogger("celery.app.trace")
    if not any(isinstance(f, ReturnValueFilter) for f in logger.filters):
        logger.addFilter(ReturnValueFilter())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
