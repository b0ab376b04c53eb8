"""One live run of a job at a time, on a Redis broker: what a delivery may do before it starts (issue 24).

kombu puts a connection's unacknowledged messages back on their queue when it reconnects, even
while their jobs still run elsewhere, and another pool (or the same one) receives them. So a
delivered job records the incarnation that runs it (``keys.job_running``) until its attempt
ends, and a later delivery of the same job

- starts when nobody runs it (no record, or a leftover of this incarnation);
- takes over when the recorded runner is proven gone (:func:`~.liveness.owner_gone`): that
  delivery is a death, and deaths are all the poison guard counts;
- otherwise does not start: the job runs in a live incarnation. It comes back later
  (:class:`Defer`) and then finds the job ended, or its runner gone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import redis

from ..contract import keys
from ..contract.text import as_text
from ..services.outage import through_outage
from .liveness import owner_gone
from .recovery import queue_count_delivery
from .runtime import Runtime

log = logging.getLogger(__name__)

#: deletes the running record only while it names the caller (a taker-over keeps its own)
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Defer(Exception):
    """The job runs in a live incarnation: this delivery comes back in ``countdown`` seconds."""

    def __init__(self, runner: str, countdown: float) -> None:
        super().__init__(f"running in {runner}")
        self.runner, self.countdown = runner, countdown


@dataclass(frozen=True)
class Claim:
    """What :func:`claim` found: a live runner elsewhere (do not start), or the dead one taken over."""

    runner: str | None = None
    died: str | None = None


def claim(broker: redis.Redis, job_id: str, identity: str, silence: float | None, ttl: int) -> Claim:
    """Record ``identity`` as the job's runner unless a live incarnation runs it (one transaction)."""
    key = keys.job_running(job_id)
    if broker.set(key, identity, nx=True, ex=max(1, ttl)):
        return Claim()  # the common case, one round trip: nobody runs it
    found = Claim()

    def transaction(pipe: Any) -> None:
        nonlocal found
        raw = pipe.get(key)
        runner = as_text(raw) if raw is not None else None
        if runner is not None and runner != identity and not owner_gone(broker, runner, silence):
            found = Claim(runner=runner)
            pipe.multi()
            pipe.exists(key)
            return
        found = Claim(died=runner if runner is not None and runner != identity else None)
        pipe.multi()
        pipe.set(key, identity, ex=max(1, ttl))

    broker.transaction(transaction, key)
    return found


def release(broker: redis.Redis, job_id: str, identity: str) -> None:
    """The attempt ended in this process: the job runs nowhere now (unless another took it over)."""
    broker.eval(_RELEASE, 1, keys.job_running(job_id), identity)


def queue_admission_count(pipe: Any, job_id: str, retries: int, ttl: int, died: bool) -> None:
    """The poison count of this attempt on the caller's pipeline (results: set, [incr], the count):
    1 for the first delivery, one more per runner that died mid-job; a hand-back or a deferred
    copy counts nothing."""
    key = keys.deliveries(job_id, retries)
    pipe.set(key, 1, nx=True, ex=ttl)
    if died:
        pipe.incr(key)
    pipe.get(key)


def admit(rt: Runtime, job_id: str, retries: int) -> tuple[dict[str, Any] | None, int, bool]:
    """Before the ``processing`` callback: the terminal record (the job already ended?), the job's
    poison count and its cancel flag, each read through a Redis outage.

    On Redis (crash recovery on) the delivery also claims the job (:func:`claim`), or raises
    :class:`Defer` when a live incarnation runs it; only deaths count. Without recovery (RabbitMQ:
    a message comes back only when its consumer's connection died) every delivery counts.
    """
    patience, ttl = rt.settings.broker_patience, rt.settings.idempotency_ttl
    recovery = rt.recovery
    died = False
    if recovery is not None:
        found = through_outage(lambda: claim(recovery.broker, job_id, recovery.identity, recovery.silence, ttl),
                               patience, f"job {job_id}")
        if found.runner is not None:
            raise Defer(found.runner, rt.settings.lease_seconds)
        if found.died:
            log.warning("job %s: its runner %s died mid-job; taken over", job_id, found.died)
        died = found.died is not None

    def read() -> list[Any]:
        with rt.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.job_final(job_id))  # after the claim: a runner that ended it recorded it first
            if recovery is None:
                queue_count_delivery(pipe, job_id, retries, ttl)
            else:
                queue_admission_count(pipe, job_id, retries, ttl, died)
            pipe.exists(keys.cancel(job_id))
            return list(pipe.execute())

    values = through_outage(read, patience, f"job {job_id}")
    recorded, count, cancelled = values[0], values[-3 if recovery is None else -2], values[-1]
    if recovery is not None and recorded:
        leave(rt, job_id)
    return (json.loads(recorded) if recorded else None), int(count), bool(cancelled)


def leave(rt: Runtime, job_id: str) -> None:
    """The attempt ended with this process alive: drop its claim (through a Redis outage)."""
    recovery = rt.recovery
    if recovery is not None:
        through_outage(lambda: release(recovery.broker, job_id, recovery.identity), rt.settings.broker_patience,
                       f"job {job_id}: claim")
