"""Every Redis key the project writes is bounded in size or in time.

The one exception is the dead-letter list, which only an operator empties
(its length is a metric). Terminal records outlive ``visibility_timeout``
plus the retry delays, so a redelivered or retried job still finds them.
"""

from __future__ import annotations

from typing import Any

import redis

from devtools.sink import Sink
from ourvidz_tasks.contract import keys
from ourvidz_tasks.contract.callbacks import callback_body
from ourvidz_tasks.contract.keys import DEAD_LETTERS
from ourvidz_tasks.contract.keys import JOBS_ENDED as ENDED
from ourvidz_tasks.contract.names import QUEUES, SDXL_GENERATE, ready_queue
from ourvidz_tasks.contract.settings import MAX_TASK_RETRIES, Settings, load_settings
from ourvidz_tasks.services import fair_scripts
from ourvidz_tasks.services.delivery import ENDED_LIMIT, Delivery

from .support.cluster import WorkerProcess
from .support.env import LOCK
from .support.jobs import new_id, terminal
from .support.process import wait_for
from .wire import publish


class Delivered:
    """A callback transport that delivers at once (the seam: no HTTP needed here)."""

    def __init__(self) -> None:
        self.sent = 0

    def send(self, job_id: str, body: bytes, queued: bool = False) -> bool:
        self.sent += 1
        return True


def test_ended_list_keeps_only_the_last_jobs(store: redis.Redis) -> None:
    """``ourvidz:jobs:ended`` once grew by one id per job forever (its TTL refreshed each time)."""
    transport = Delivered()
    delivery = Delivery(Settings(), "sdxl@test", store, transport=transport)
    store.delete(ENDED)
    try:
        ids = [new_id() for _ in range(ENDED_LIMIT + 300)]
        for job_id in ids:
            delivery.finish(callback_body(job_id, "sdxl@test", "completed", attempt=1))
        assert transport.sent == len(ids)
        assert store.llen(ENDED) == ENDED_LIMIT
        assert [i.decode() for i in store.lrange(ENDED, -3, -1)] == ids[-3:]
        assert 0 < store.ttl(ENDED) <= Settings().terminal_ttl
    finally:
        with store.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.delete(keys.job_final(job_id), keys.job_delivered(job_id))
            pipe.delete(ENDED)
            pipe.execute()
        delivery.close()


def test_terminal_records_outlive_visibility_timeout_and_retries() -> None:
    short = load_settings(idempotency_ttl=60)
    floor = short.visibility_timeout + MAX_TASK_RETRIES * short.max_retry_countdown
    assert short.terminal_ttl == floor > 60
    assert Settings().terminal_ttl == Settings().idempotency_ttl >= floor


def _snapshot(store: redis.Redis) -> dict[str, tuple[int, int]]:
    """``key -> (ttl, bytes)`` of every key in the test database but the run lock."""
    keys = [k for k in store.scan_iter(count=1000) if k != LOCK.encode()]
    with store.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.ttl(key)
            pipe.memory_usage(key)
        found = pipe.execute()
    return {k.decode(errors="replace"): (ttl, size or 0) for k, ttl, size in zip(keys, found[::2], found[1::2],
                                                                                  strict=True) if ttl != -2}


#: keys without a TTL that a running cluster keeps, each bounded by what it holds right now
#: (FETCHERS: the processing lists of live consumers; recovery forgets a dead one's; a queue's fair
#: order: its waiting jobs, the users with a place in it, the live pools, a capped bell)
BOUNDED = {*QUEUES, "unacked", "unacked_index", "unacked_mutex", DEAD_LETTERS, keys.FETCHERS,
           *(keys.fair(name, part) for queue in QUEUES for name in (queue, ready_queue(queue))
             for part in fair_scripts.PARTS)}


def _unbounded(snapshot: dict[str, tuple[int, int]]) -> set[str]:
    return {k for k, (ttl, _) in snapshot.items()
            if ttl == -1 and k not in BOUNDED and not k.startswith("_kombu.binding")}


def _round(store: redis.Redis, sink: Sink, count: int) -> None:
    jobs: list[dict[str, Any]] = []
    for i in range(count):
        config = {"width": 64, "height": 64, "num_inference_steps": 1, "seed": i}
        payload = {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a cat",
                   "config": config if i % 3 else {**config, "num_images": 2}}  # some fail (INVALID_JOB)
        publish(store, SDXL_GENERATE, payload, "sdxl")
        jobs.append(payload)
    for payload in jobs:
        assert terminal(sink, payload["id"], 300)["status"] in ("completed", "failed")
    # the last messages are acked just after their callbacks: wait until nothing is in flight
    wait_for(lambda: not store.exists("unacked", "unacked_index"), 120, what="every message acked")


def test_many_jobs_leave_key_counts_and_sizes_flat(sdxl_worker: WorkerProcess, store: redis.Redis,
                                                   sink: Sink) -> None:
    """Two rounds of jobs: every key but the bounded few has a TTL, and none of those grows.

    A bounded key may be there after one round and not the other: a user's place in the fair order
    (``users``) is pruned once the virtual clock passes their finish tag, which the jobs' real costs
    lower as they end, so whether it outlives a round depends on when the pool picked each job."""
    _round(store, sink, 6)
    first = _snapshot(store)
    _round(store, sink, 12)
    second = _snapshot(store)
    assert _unbounded(first) == set() and _unbounded(second) == set()
    lasting = {k for k, (ttl, _) in second.items() if ttl == -1} - {DEAD_LETTERS}
    assert lasting - set(first) <= BOUNDED, lasting - set(first) - BOUNDED
    grown = {k: (first[k][1], second[k][1]) for k in lasting & set(first) if second[k][1] > first[k][1] + 256}
    assert grown == {}
    # nothing waits: a fair order holds at most the one user who published, and no job
    assert store.zcard(keys.fair("sdxl", "users")) <= 1
    assert not store.exists(keys.fair("sdxl", "waiting"), keys.fair("sdxl", "messages"), keys.fair("sdxl", "counts"))
