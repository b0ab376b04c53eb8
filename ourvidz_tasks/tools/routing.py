"""How the bridge routes a raw legacy job: by its ``type`` to a task, with task ids derived from its id.

The deployed edge function's raw job JSON (CONTRACT.md section 1) becomes
the generate task of its family; ``*_enhanced`` WAN types not yet enhanced
become the chain ``ourvidz.chat.enhance → ourvidz.wan.generate``. Task ids
derive from the job id (:func:`task_ids`), so the result backend can tell
later whether a publish happened (:meth:`CeleryPublisher.known`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..contract import names
from ..contract.jobs import FAMILY_OF_TYPE, usable_id

#: namespace of the task ids derived from job ids
TASK_NAMESPACE = uuid.UUID("5b0b4c1e-0d8f-4c52-9f5e-6f1f1d7a2b10")


@dataclass(frozen=True)
class Route:
    """Where a raw job goes: the generate task, after enhancement or not."""

    job_id: str
    job_type: str
    family: str
    enhance: bool

    @property
    def task(self) -> str:
        return names.GENERATE[self.family]

    def task_ids(self) -> list[str]:
        """The ids of the tasks published for this job, in chain order."""
        return task_ids(self.job_id, self.enhance)

    def chain_name(self) -> str:
        """What the log says it was published as."""
        return f"{names.CHAT_ENHANCE} -> {self.task}" if self.enhance else self.task


def task_ids(job_id: str, enhance: bool) -> list[str]:
    """Task ids derived from the job id: ``[enhance id,] generate id``."""
    steps = ["enhance", "generate"] if enhance else ["generate"]
    return [str(uuid.uuid5(TASK_NAMESPACE, f"{job_id}/{step}")) for step in steps]


class Unroutable(ValueError):
    """A raw item that cannot become a task; the message is the dead letter's reason."""


def route(payload: object) -> Route:
    """The route of a raw job, by its ``type`` (never by the list it came from)."""
    if not isinstance(payload, dict):
        raise Unroutable(f"a job must be a JSON object, got {type(payload).__name__}")
    job_id = usable_id(payload)
    if job_id is None:
        raise Unroutable("no usable job id (`id` must be 1-128 characters of [A-Za-z0-9_-])")
    job_type = payload.get("type") or payload.get("job_type")
    family = FAMILY_OF_TYPE.get(job_type) if isinstance(job_type, str) else None
    if family is None:
        shown = repr(job_type)[:60] if job_type is not None else "none"
        raise Unroutable(f"unknown job type {shown}")
    metadata = payload.get("metadata")
    enhanced = isinstance(metadata, dict) and (
        metadata.get("enhanced_prompt") is not None or metadata.get("enhancement_error") is not None
    )
    enhance = family == "wan" and str(job_type).endswith("_enhanced") and not enhanced
    return Route(job_id, str(job_type), family, enhance)


class Publisher(Protocol):
    """Publishes a routed job; tells whether a task id already reached a worker."""

    def publish(self, job: dict[str, Any], route: Route) -> None: ...

    def known(self, task_ids: Sequence[str]) -> bool: ...


class CeleryPublisher:
    """Publishes through a Celery app (by task name; the message names the job id only)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def publish(self, job: dict[str, Any], route: Route) -> None:
        from celery import chain

        ids = route.task_ids()
        if route.enhance:
            signature = chain(
                self.app.signature(names.CHAT_ENHANCE, args=[job]).set(task_id=ids[0]),
                self.app.signature(route.task).set(task_id=ids[1]),
            )
        else:
            signature = self.app.signature(route.task, args=[job]).set(task_id=ids[0])
        signature.apply_async()

    def known(self, task_ids: Sequence[str]) -> bool:
        """True when the result backend has any state for one of the tasks (started or later)."""
        return any(self.app.AsyncResult(task_id).state != "PENDING" for task_id in task_ids)
