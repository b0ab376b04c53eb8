"""One GPU, three pools, real worker processes: the ledger, OOM step-down and time limits."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from ourvidz_tasks.sink import Sink

from .conftest import KEY, WorkerProcess, new_id, terminal
from .wire import publish


def sdxl_job(**config: Any) -> dict[str, Any]:
    return {"id": new_id(), "type": config.pop("type", "sdxl_image_fast"), "user_id": "user_123",
            "prompt": "a red kite", "config": {"resolution": "256x256", "num_inference_steps": 2, "seed": 9, **config}}


def images(sink: Sink, body: dict[str, Any]) -> list[np.ndarray]:
    out = []
    for asset in body["assets"]:
        r = httpx.get(f"{sink.url}/storage/v1/object/{asset['url']}", headers={"Authorization": f"Bearer {KEY}"})
        out.append(np.asarray(Image.open(io.BytesIO(r.content))).astype(int))
    return out


@pytest.mark.slow
def test_oom_steps_down_with_the_same_seeds(isolated_broker: str, start_worker: Callable[..., WorkerProcess],
                                            sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"oom-{new_id()[:6]}",
                 OURVIDZ_FAULT_OOM_BATCH="2")
    stepped_job = sdxl_job(num_images=6)
    publish(redis.Redis.from_url(isolated_broker), "ourvidz.sdxl.generate", stepped_job, "sdxl")
    stepped = terminal(sink, stepped_job["id"])
    assert stepped["status"] == "completed"
    assert stepped["metadata"]["oom_step_down"] == {"failed": ["batch:6", "batch:3"], "batch": 1, "remedy": "batch"}
    plain_job = sdxl_job(num_images=6)
    publish(store, "ourvidz.sdxl.generate", plain_job, "sdxl")
    plain = terminal(sink, plain_job["id"])
    assert "oom_step_down" not in plain["metadata"]
    for a, b in zip(images(sink, stepped), images(sink, plain), strict=True):
        assert np.abs(a - b).max() <= 2
    assert [x["metadata"]["seed"] for x in stepped["assets"]] == [9, 10, 11, 12, 13, 14]


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
def test_three_pools_under_a_small_budget(isolated_broker: str, start_worker: Callable[..., WorkerProcess],
                                          sink: Sink) -> None:
    broker = redis.Redis.from_url(isolated_broker)
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_VRAM_BUDGET_MB="4", OURVIDZ_MEMORY_WAIT="120")
    tag = new_id()[:6]
    host = f"budget-{tag}"  # one host name: the three pools share one GPU ledger
    for family in ("sdxl", "chat", "wan"):
        start_worker(family, OURVIDZ_HOSTNAME=host, **env)

    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        from ourvidz_tasks.memory import Ledger

        ledger = Ledger(broker, host, "cpu", 4)
        while not stop.is_set():
            samples.append(int(ledger.status()["reserved_mb"]))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from celery import Celery

    client = Celery(broker=isolated_broker, backend=isolated_broker)
    client.config_from_object("celeryconfig")
    client.conf.update(broker_url=isolated_broker, result_backend=isolated_broker)
    jobs = []
    chats = []
    for i in range(3):
        job = sdxl_job()
        publish(broker, "ourvidz.sdxl.generate", job, "sdxl")
        jobs.append(job)
        wan = {"id": new_id(), "type": "video_fast", "user_id": "u", "prompt": "sea",
               "config": {"width": 32, "height": 32, "frames": 5, "num_inference_steps": 1, "seed": i}}
        publish(broker, "ourvidz.wan.generate", wan, "wan")
        jobs.append(wan)
        chats.append(client.send_task("ourvidz.chat.chat", args=[{"messages": [{"role": "user", "content": "hi"}],
                                                                   "max_tokens": 4}], queue="chat"))
    bodies = [terminal(sink, job["id"], 300) for job in jobs]
    answers = [c.get(timeout=300) for c in chats]
    stop.set()
    sampler.join()
    assert [b["status"] for b in bodies] == ["completed"] * len(jobs)
    assert all(a["completion_tokens"] >= 1 for a in answers)
    assert samples and max(samples) <= 4
    from ourvidz_tasks.memory import Ledger

    counters = Ledger(broker, host, "cpu", 4).counters()
    assert counters["waits"] >= 1 and counters["switches"] >= 1  # the budget really was contended
    print(f"{len(jobs)} jobs + {len(chats)} chats under a 4 MB budget; reserved MB sampled {len(samples)} times, "
          f"max {max(samples)}; ledger counters {counters}")


@pytest.mark.slow
def test_a_killed_pools_memory_is_reclaimed_and_idle_wan_is_released(
        isolated_broker: str, start_worker: Callable[..., WorkerProcess], sink: Sink) -> None:
    import signal

    from ourvidz_tasks.memory import Ledger

    broker = redis.Redis.from_url(isolated_broker)
    host = f"reclaim-{new_id()[:6]}"
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=host, OURVIDZ_LEASE_SECONDS="2",
               OURVIDZ_IDLE_UNLOAD_SECONDS=json.dumps({"wan": 2}))
    ledger = Ledger(broker, host, "cpu", 10**6)
    sdxl = start_worker("sdxl", **env)
    wan = start_worker("wan", **env)
    assert ledger.holders("sdxl") and ledger.holders("wan"), ledger.holders()
    sdxl.stop(signal.SIGKILL)
    killed = time.time()
    while ledger.holders("sdxl") and time.time() - killed < 30:
        time.sleep(0.2)
    reclaimed_in = time.time() - killed
    assert not ledger.holders("sdxl") and reclaimed_in < 10
    # WAN loads on demand and is released after its idle time
    deadline = time.time() + 30
    while ledger.holders("wan") and time.time() < deadline:
        time.sleep(0.2)
    assert not ledger.holders("wan") and "idle for 2" in wan.text()
    print(f"killed pool's reservation reclaimed in {reclaimed_in:.1f}s (lease 2s); idle WAN released")
