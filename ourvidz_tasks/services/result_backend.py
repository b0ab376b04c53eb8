"""Celery's Redis Sentinel result backend on the project's transient-aware connections.

A failover's ``NOREPLICAS``/``READONLY``/``LOADING``/``MASTERDOWN`` answers
(:class:`~.redis_client.TransientError`) are connection errors here, so
Celery's ``result_backend_always_retry`` waits them out like a lost primary
(``celeryconfig.py`` selects this class for ``sentinel://`` result backends).
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import SentinelBackend as CelerySentinelBackend

from .redis_client import SentinelConnection


class SentinelBackend(CelerySentinelBackend):
    def _get_sentinel_instance(self, **params: Any) -> Any:
        params.setdefault("connection_class", SentinelConnection)
        return super()._get_sentinel_instance(**params)
