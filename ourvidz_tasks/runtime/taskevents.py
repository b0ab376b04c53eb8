"""Celery task events published at once, so that Flower sees a running job while it runs.

A solo pool flushes the task events it buffered only between jobs; the worker's consumer (kept
on the app at ``worker_ready``: its event dispatcher changes on reconnect, so it is looked up
each time) flushes them on demand.
"""

from __future__ import annotations

from typing import Any


def keep_consumer(worker: Any) -> None:
    """Remember the worker's consumer on its app (``worker_ready``)."""
    worker.app.ourvidz_consumer = worker


def flush_task_events(app: Any) -> None:
    """Publish the task events the worker buffered (Flower sees them at once)."""
    consumer = getattr(app, "ourvidz_consumer", None)
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is not None:
        dispatcher.flush()


def announce_start(task: Any) -> None:
    """``task_prerun``: send task-received/task-started now. A job task does it itself, right after
    its ``processing`` callback is on its way (off the dispatch path)."""
    if getattr(task, "marks_own_start", False):
        return
    mark = getattr(task, "mark_started", None)
    if mark is not None:
        mark()
    else:
        flush_task_events(getattr(task, "app", None))
