"""Riding out a broker / bookkeeping-Redis outage inside a running job.

A Redis restart is not the job's fault: a step that must reach Redis (the admission round trip,
the terminal record) waits for it with backoff for up to ``OURVIDZ_BROKER_PATIENCE`` seconds
(:func:`through_outage`), and bookkeeping that only helps (peak memory, progress) is skipped
while Redis is away. Only when Redis stays away longer than that is the job handed back
(:class:`BrokerAway`), without counting against its attempts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from kombu.exceptions import OperationalError

from .backoff import Backoff

log = logging.getLogger(__name__)

T = TypeVar("T")

#: what a Redis that restarts, fails over or is still loading its data raises
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError, OperationalError,
)


class BrokerAway(Exception):
    """Redis stayed away longer than the patience: the job goes back to its queue, no attempt used."""


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says Redis was unreachable, not that the job is wrong."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OUTAGE_ERRORS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def through_outage(call: Callable[[], T], patience: float, what: str, *,
                   sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, retried with backoff while Redis is away, for up to ``patience`` seconds.

    Raises :class:`BrokerAway` when Redis is still away after that.
    """
    pauses, deadline, waited = Backoff(0.1, 2.0), time.monotonic() + patience, False
    while True:
        try:
            result = call()
        except OUTAGE_ERRORS as exc:
            if time.monotonic() > deadline:
                raise BrokerAway(f"{what}: Redis away for more than {patience:g}s ({type(exc).__name__})") from exc
            if not waited:
                log.warning("%s: Redis away (%s); waiting for it", what, type(exc).__name__)
                waited = True
            sleep(pauses.next())
            continue
        if waited:
            log.info("%s: Redis is back", what)
        return result
