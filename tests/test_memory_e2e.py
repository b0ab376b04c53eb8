"""One GPU, three pools, real worker processes: the ledger and time limits (OOM step-down: test_faults_e2e.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.sink import Sink

from .faults import HOLD_LOG_ENV
from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal
from .support.process import wait_for
from .wire import publish


def sdxl_job(**config: Any) -> dict[str, Any]:
    return {"id": new_id(), "type": config.pop("type", "sdxl_image_fast"), "user_id": "user_123",
            "prompt": "a red kite", "config": {"resolution": "256x256", "num_inference_steps": 2, "seed": 9, **config}}


@pytest.mark.slow
def test_a_larger_job_runs_reserved_for_its_own_shape_and_gives_it_back_after(
        isolated_broker: str, start_worker: Callable[..., WorkerProcess], sink: Sink, tmp_path: Path) -> None:
    """Issue 25, defect 1: a pool warmed on batch-1 jobs held its batch-1 reservation while its first
    batch-6 job ran (the shape's memory was reserved only after, if it fit). Now the ledger holds the
    job's shape before the model call, and only the weights again once the job is over."""
    from ourvidz_tasks.runtime.ledger import Ledger

    broker = redis.Redis.from_url(isolated_broker)
    host, log = f"shape-{new_id()[:6]}", tmp_path / "holdings.jsonl"
    start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=host, OURVIDZ_MEMORY_SLACK="0",
                 OURVIDZ_RUNTIME_PLUGINS="tests.faults:record_holdings", **{HOLD_LOG_ENV: str(log)})
    for config in ({}, {}, {"num_images": 6}):
        job = sdxl_job(resolution="512x512", **config)
        publish(broker, "ourvidz.sdxl.generate", job, "sdxl")
        assert terminal(sink, job["id"])["status"] == "completed"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["batch"] for c in calls] == [1, 1, 6]
    ledger = Ledger(broker, host, "cpu", 10**6)
    sizes = ledger.sizes("sdxl")
    weights = sizes["weights"] + sizes["resident"]
    need = weights + sizes["work"]["512x512x6"]  # what the batch-6 call measured it needed
    print(f"held during the batch-6 call {calls[2]['held_mb']} MB, it needed {need} MB; "
          f"during the batch-1 calls {calls[1]['held_mb']} MB; weights {weights} MB; "
          f"after {sum(ledger.holders('sdxl').values())} MB")
    # reserved before the call, for its shape: the first estimate of an unmeasured shape is the batch-1
    # figure scaled by the shape model, and on a loaded CPU a measurement varies by some 15% (the defect
    # held 120 MB against 428)
    assert calls[2]["held_mb"] >= 0.8 * need and calls[2]["held_mb"] > 3 * calls[1]["held_mb"]
    assert sum(ledger.holders("sdxl").values()) == weights  # the working memory went back after the job


@pytest.mark.slow
def test_time_limit_ends_the_job_and_the_worker_goes_on(isolated_broker: str,
                                                        start_worker: Callable[..., WorkerProcess], sink: Sink) -> None:
    broker = redis.Redis.from_url(isolated_broker)
    start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"limit-{new_id()[:6]}",
                 OURVIDZ_TIME_LIMITS=json.dumps({"sdxl_image_high": 1}))
    slow = sdxl_job(type="sdxl_image_high", resolution="512x512", num_inference_steps=150)
    publish(broker, "ourvidz.sdxl.generate", slow, "sdxl")
    body = terminal(sink, slow["id"])
    assert body["status"] == "failed" and body["error"]["code"] == "TIMEOUT_ERROR" and "1s" in body["error"]["message"]
    fast = sdxl_job()
    publish(broker, "ourvidz.sdxl.generate", fast, "sdxl")
    assert terminal(sink, fast["id"])["status"] == "completed"


@pytest.mark.slow
@pytest.mark.stress
def test_a_killed_pools_memory_is_reclaimed_and_idle_wan_is_released(
        isolated_broker: str, start_worker: Callable[..., WorkerProcess], sink: Sink) -> None:
    import signal

    from ourvidz_tasks.runtime.ledger import Ledger

    broker = redis.Redis.from_url(isolated_broker)
    host = f"reclaim-{new_id()[:6]}"
    lease, idle = 2, 2
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=host, OURVIDZ_LEASE_SECONDS=str(lease),
               OURVIDZ_IDLE_UNLOAD_SECONDS=json.dumps({"wan": idle}))
    ledger = Ledger(broker, host, "cpu", 10**6)
    sdxl = start_worker("sdxl", **env)
    wan = start_worker("wan", **env)
    assert ledger.holders("sdxl") and ledger.holders("wan"), ledger.holders()
    sdxl.stop(signal.SIGKILL)
    killed = time.time()
    wait_for(lambda: not ledger.holders("sdxl"), 15 * lease, interval=lease / 10, what="the reservation reclaimed")
    reclaimed_in = time.time() - killed
    assert reclaimed_in < 5 * lease  # a lease and the scan that finds it lapsed, not a fixed wait
    # WAN loads on demand and is released after its idle time
    wait_for(lambda: not ledger.holders("wan"), 15 * idle, interval=idle / 10, what="idle WAN released")
    assert f"idle for {idle}" in wan.text()
    print(f"killed pool's reservation reclaimed in {reclaimed_in:.1f}s (lease {lease}s); idle WAN released")


@pytest.mark.slow
def test_a_graceful_sigterm_releases_the_ledger_as_the_pool_exits(
        isolated_broker: str, start_worker: Callable[..., WorkerProcess], sink: Sink) -> None:
    """SIGTERM (a supervisor's stop): the pool unloads and hands its reservation back as it exits; with a lease
    of 10 minutes, nothing but the shutdown itself can have released it by the time the process is gone."""
    import signal

    from ourvidz_tasks.runtime.ledger import Ledger

    broker = redis.Redis.from_url(isolated_broker)
    host = f"sigterm-{new_id()[:6]}"
    ledger = Ledger(broker, host, "cpu", 10**6)
    sdxl = start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=host, OURVIDZ_LEASE_SECONDS="600")
    assert list(ledger.holders("sdxl")) == ["sdxl/sdxl"] and ledger.status()["reserved_mb"] > 0
    stopped = time.monotonic()
    assert sdxl.stop(signal.SIGTERM) == 0, sdxl.text()[-3000:]
    took = time.monotonic() - stopped
    assert ledger.holders() == {} and ledger.status()["reserved_mb"] == 0, ledger.status()
    assert "Unrecoverable" not in sdxl.text() and "Traceback" not in sdxl.text()
    print(f"SIGTERM: the pool exited in {took:.1f}s and its reservation was gone (lease 600s)")
