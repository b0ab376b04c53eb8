"""Publishing without the worker side: the tasks named, not imported.

What a publisher needs (``pip install .``, no torch)::

    from celery import chain
    from ourvidz_tasks.publish import chat, enhance, sdxl_generate

    sdxl_generate.delay(job)
    chain(enhance.s(job), sdxl_generate.s()).apply_async()
    answer = chat.delay(request).get(timeout=60)

Each name is a :class:`TaskRef`: the task's name (:mod:`ourvidz_tasks.contract.names`)
on the cluster's app, routed by name to its queue like any Celery message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery.canvas import Signature
from celery.result import AsyncResult

from .celery import app
from .contract import names

__all__ = ["TaskRef", "app", "chat", "enhance", "sdxl_generate", "standing", "wan_generate"]


@dataclass(frozen=True)
class TaskRef:
    """A task by name: ``.s()`` for canvases, ``.delay()`` / ``.apply_async()`` to send."""

    name: str

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        return app.signature(self.name, args=args, kwargs=kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: tuple[Any, ...] | list[Any] = (), kwargs: dict[str, Any] | None = None,
                    **options: Any) -> AsyncResult:
        result: AsyncResult = app.send_task(self.name, args=list(args), kwargs=kwargs or {}, **options)
        return result


sdxl_generate = TaskRef(names.SDXL_GENERATE)
wan_generate = TaskRef(names.WAN_GENERATE)
chat = TaskRef(names.CHAT_CHAT)
enhance = TaskRef(names.CHAT_ENHANCE)


_clients: dict[str, Any] = {}


def standing(job_id: str) -> dict[str, Any]:
    """Where a job stands (CONTRACT section 7): ``state`` (``queued``, ``running``, ``ended``,
    ``unknown``) and, while queued, ``family``, ``position`` (0: next to start), ``ahead``,
    ``eta_s`` and ``waited_s``. A few Redis commands, whatever the queue's length."""
    from .contract.settings import load_settings
    from .services import fairness
    from .services.redis_client import connect

    if not _clients:
        settings = load_settings()
        _clients["settings"] = settings
        _clients["broker"] = connect(settings.fair_url, settings)
        _clients["store"] = connect(settings.redis, settings) if settings.redis != settings.fair_url else None
    settings = _clients["settings"]
    return fairness.standing(_clients["broker"], job_id, present=settings.lease_seconds, store=_clients["store"])
