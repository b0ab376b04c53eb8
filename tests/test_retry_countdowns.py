"""The countdown a worker really applies to a retried job, seen from outside.

A real SDXL pool on a private broker and its own sink; the sink refuses uploads (503), so each
attempt ends ``WORKER_UNAVAILABLE`` (retryable) and the job is published again with an ETA. The test
reads each re-published message's ETA from the broker (Celery's ``eta`` header, on the queue, then
in ``unacked`` while the pool holds it) and when the next attempt's ``processing`` callback reaches the sink, and
checks both against :func:`~ourvidz_tasks.runtime.lifecycle.backoff`: whole seconds, at least 1,
at most ``ceil(2 * 2**n)`` for retry ``n``, and no attempt before its ETA.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.sink import Sink

from .support.cluster import Pools
from .support.env import KEY, SECRET
from .support.jobs import TASK, new_id, terminal, tiny_job
from .wire import publish

#: retries observed before the sink takes uploads again
RETRIES = 2
#: how often the broker is read for a re-published message (its delay bounds the countdown from below)
POLL = 0.01


def _held(store: redis.Redis, job_id: str) -> dict[int, float]:
    """``{retries: ETA}`` of the job's messages on its queue or in ``unacked`` (a pool holds an ETA'd
    message there until it is due)."""
    found: dict[int, float] = {}
    with store.pipeline(transaction=True) as pipe:  # one read of both: a message moving between them is seen
        queued, held = pipe.lrange("sdxl", 0, -1).hvals("unacked").execute()
    for envelope in [json.loads(raw) for raw in queued] + [json.loads(raw)[0] for raw in held]:
        headers = envelope["headers"]
        if job_id in str(headers.get("argsrepr")) and headers.get("eta"):
            found[int(headers["retries"])] = datetime.fromisoformat(headers["eta"]).timestamp()
    return found


def _watch(store: redis.Redis, job_id: str, retries: int, timeout: float) -> dict[int, tuple[float, float]]:
    """``{n: (ETA, first seen)}`` of retries 1..``retries``, reading the broker every :data:`POLL` s."""
    seen: dict[int, tuple[float, float]] = {}
    deadline = time.time() + timeout
    while len(seen) < retries:
        now = time.time()
        for n, eta in _held(store, job_id).items():
            seen.setdefault(n, (eta, now))
        assert now < deadline, f"retries seen: {sorted(seen)}"
        time.sleep(POLL)
    return seen


@pytest.mark.slow
@pytest.mark.stress
def test_a_retried_job_waits_its_backoff_in_whole_seconds(isolated_broker: str, tmp_path: Path) -> None:
    edge = Sink(tmp_path / "edge", KEY, SECRET).start()
    pools = Pools(edge, tmp_path / "logs")
    store = redis.Redis.from_url(isolated_broker)
    try:
        pools.start("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"countdown-{new_id()[:6]}",
                    OURVIDZ_HTTP_BACKOFF="0.05")
        edge.faults(storage=503)
        job = tiny_job()
        publish(store, TASK, job, "sdxl")
        # retry n (1-based) waits backoff(n - 1): at most ceil(2 * 2**(n - 1)) s
        held = _watch(store, job["id"], RETRIES, timeout=120 + sum(2 * 2**n for n in range(RETRIES)))
        edge.faults()
        body = terminal(edge, job["id"], 120)
        starts: dict[int, float] = {}
        for call in edge.callbacks(job["id"]):
            meta: dict[str, Any] = call["body"]["metadata"]
            if call["body"]["status"] == "processing" and "progress" not in meta:
                starts.setdefault(int(meta["attempt"]), call["at"])
        print(f"retries: { {n: f'ETA {eta - seen:.3f}s after seen' for n, (eta, seen) in held.items()} }, "
              f"attempts started at +{[round(starts[a] - starts[1], 3) for a in sorted(starts)]} s")
        assert body["status"] == "completed" and body["metadata"]["attempt"] == RETRIES + 1, body
        assert sorted(starts) == list(range(1, RETRIES + 2))
        for n, (eta, seen) in held.items():
            # published after attempt n started and before it was seen: the countdown lies in that span
            earliest, latest = eta - seen, eta - starts[n]
            whole = math.ceil(earliest - 1e-3)
            assert 1 <= whole <= math.ceil(2 * 2 ** (n - 1)), (n, earliest, latest)
            assert whole - earliest < 0.25, f"retry {n}: not a whole-second countdown ({earliest:.3f}..{latest:.3f} s)"
            assert starts[n + 1] >= eta - 0.01, f"retry {n} started {eta - starts[n + 1]:.3f}s before its ETA"
            assert starts[n + 1] - starts[n] >= 1.0
    finally:
        pools.stop()
        edge.stop()
