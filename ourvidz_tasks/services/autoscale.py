"""Signals a fleet autoscaler acts on (KEDA, an HPA on external metrics): docs/scaling.md.

Per family (= its Celery queue), read from Redis at scrape time, with no write on a job's path:

- ``ourvidz_waiting_jobs{family}``: messages waiting in the queue (every priority list).
- ``ourvidz_queue_oldest_wait_seconds{queue}``: how long the message first in line has been
  first in line. Envelopes carry no publish time (Celery protocol v2), so the exporters
  note when they first see a message at the head of its queue (one small hash per queue,
  shared by every exporter, expiring a day after the last scrape); the value is exact to
  one scrape interval and never more than the message's real wait. It grows when nothing
  consumes the queue; a queue drained steadily keeps it near one service time.
- ``ourvidz_service_seconds{family}``: the median ``processing_time`` of the last
  :data:`SERVICE_WINDOW` jobs of the family that ended (their terminal records, kept by
  :mod:`.delivery`), i.e. measured on this fleet's cards.
- ``ourvidz_pools{family}``: pools of the family with a live heartbeat (``runtime.recovery``).
- ``ourvidz_drain_seconds{family}``: waiting x service time / max(1, pools): how long the
  queue takes to empty at the measured rate if nothing more arrives.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Mapping

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ..contract import keys
from ..contract.names import FAMILIES
from ..contract.text import as_text

#: ended jobs the service time is measured over
SERVICE_WINDOW = 200
#: a queue's head-of-line note lives this long after the last scrape that saw it
HEAD_TTL = 24 * 3600


def _message_id(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return raw[:64].hex()  # not an envelope (a dead letter to be): still a stable id


def head_waits(broker: redis.Redis, lists: Mapping[str, list[str]], now: float | None = None) -> dict[str, float]:
    """Seconds the message first in line of each queue has been first in line (0 when empty).

    ``lists``: queue -> its Redis lists in the order the consumer empties them; the message
    taken next is the oldest (rightmost) of the first non-empty list.
    """
    now = time.time() if now is None else now
    with broker.pipeline(transaction=False) as pipe:
        for names in lists.values():
            for name in names:
                pipe.lindex(name, -1)
            pipe.hmget(keys.autoscale_head(next(iter(names))), "id", "since")
        replies = pipe.execute()
    waits: dict[str, float] = {}
    updates = broker.pipeline(transaction=False)
    i = 0
    for queue, names in lists.items():
        tails, (seen_id, seen_since) = replies[i:i + len(names)], replies[i + len(names)]
        i += len(names) + 1
        head = next((raw for raw in tails if raw is not None), None)
        key = keys.autoscale_head(next(iter(names)))
        if head is None:
            waits[queue] = 0.0
            updates.delete(key)
            continue
        head_id = _message_id(head)
        if seen_id is not None and as_text(seen_id) == head_id and seen_since is not None:
            waits[queue] = max(0.0, now - float(seen_since))
        else:
            waits[queue] = 0.0
            updates.hset(key, mapping={"id": head_id, "since": repr(now)})
        updates.expire(key, HEAD_TTL)
    updates.execute()
    return waits


def service_times(store: redis.Redis, window: int = SERVICE_WINDOW) -> dict[str, float]:
    """Median ``processing_time`` per family over the last ``window`` ended jobs."""
    ids = list(dict.fromkeys(store.lrange(keys.JOBS_ENDED, -window, -1)))
    if not ids:
        return {}
    with store.pipeline(transaction=False) as pipe:
        for raw in ids:
            pipe.get(keys.job_final(as_text(raw)))
        bodies = pipe.execute()
    seconds: dict[str, list[float]] = {}
    for body in bodies:
        try:
            parsed = json.loads(body)
            family = str(parsed["worker_id"]).split("@", 1)[0].split(".", 1)[0]
            value = float(parsed["metadata"]["processing_time"])
        except (TypeError, ValueError, KeyError):
            continue  # expired, or a body without a time (a poison give-up)
        seconds.setdefault(family, []).append(value)
    return {family: statistics.median(values) for family, values in seconds.items()}


def live_pools(broker: redis.Redis) -> Counter[str]:
    """Pools per family with a live heartbeat (:func:`~ourvidz_tasks.contract.keys.alive`)."""
    pools: Counter[str] = Counter()
    for key in broker.scan_iter(match=keys.ALIVE_PREFIX + "*", count=1000):
        node = as_text(key).removeprefix(keys.ALIVE_PREFIX)
        pools[node.split("@", 1)[0].split(".", 1)[0]] += 1
    return pools


def autoscale_metrics(broker: redis.Redis, store: redis.Redis, lists: Mapping[str, list[str]],
                      waiting: Mapping[str, int]) -> Iterator[Metric]:
    """The gauges above; ``waiting``: queue -> messages waiting (already read by the caller)."""
    oldest = GaugeMetricFamily("ourvidz_queue_oldest_wait_seconds",
                               "Seconds the message first in line has waited there (to one scrape)", labels=["queue"])
    for queue, seconds in head_waits(broker, lists).items():
        oldest.add_metric([queue], seconds)
    yield oldest
    service = service_times(store)
    pools = live_pools(broker)
    jobs = GaugeMetricFamily("ourvidz_waiting_jobs", "Jobs waiting per family", labels=["family"])
    served = GaugeMetricFamily("ourvidz_service_seconds", "Median processing time of the family's recent jobs",
                               labels=["family"])
    alive = GaugeMetricFamily("ourvidz_pools", "Pools of the family with a live heartbeat", labels=["family"])
    drain = GaugeMetricFamily("ourvidz_drain_seconds",
                              "Seconds to empty the queue at the measured service time (waiting x service / pools)",
                              labels=["family"])
    for family in FAMILIES:
        jobs.add_metric([family], waiting.get(family, 0))
        alive.add_metric([family], pools[family])
        if family in service:
            served.add_metric([family], service[family])
            drain.add_metric([family], waiting.get(family, 0) * service[family] / max(1, pools[family]))
    yield from (jobs, served, alive, drain)
