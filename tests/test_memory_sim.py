"""One card, three real pools: the memory ledger end to end with real numbers on CPU.

The tiny models carry real weights (``tests.memsim``) so that what each pool
reserves stands in the real models' ratios, SDXL 10 : Qwen 15 : WAN 30 units
of a 48-unit budget (one unit = 10 MB), as on a 48 GB card: the three do not
fit together. The CPU probe measures what the model calls really use. A mixed
stream (mostly SDXL, some WAN with WAN idle-unloaded between its jobs, chats,
enhance chains) runs through real worker processes; the test samples the
ledger throughout. Set ``OURVIDZ_MEMSIM_OUT`` to a file to keep the figures.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import signature

from devtools.sink import Sink
from ourvidz_tasks.runtime.estimates import first_estimate
from ourvidz_tasks.runtime.ledger import Ledger

from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal
from .support.process import wait_for
from .wire import envelope, publish

UNIT = 10  # MB
BUDGET = 48 * UNIT
#: the weights (MB) each tiny model is padded to, so that weights + measured work + slack land near
#: 10, 15 and 30 units with the shapes below (SDXL 256x256x1, WAN 64x64x9, short chats)
WEIGHTS = {"sdxl": 65, "qwen_instruct": 100, "qwen_base": 100, "wan": 240}
TARGET = {"sdxl": 10 * UNIT, "qwen_instruct": 15 * UNIT, "wan": 30 * UNIT}
SLACK = 0.05
ROUNDS = 4
IDLE_WAN = 1.0  # seconds


def sdxl_job(**metadata: Any) -> dict[str, Any]:
    job = {"id": new_id(), "type": "sdxl_image_fast", "user_id": "u1", "prompt": "a red kite",
           "config": {"resolution": "256x256", "num_inference_steps": 2, "seed": 3}}
    if metadata:
        job["metadata"] = metadata
    return job


def wan_job() -> dict[str, Any]:
    return {"id": new_id(), "type": "video_fast", "user_id": "u1", "prompt": "the sea",
            "config": {"width": 64, "height": 64, "frames": 9, "num_inference_steps": 2, "seed": 5}}


@pytest.mark.slow
def test_one_card_three_pools_mixed_stream(isolated_broker: str, start_worker: Callable[..., WorkerProcess],
                                           sink: Sink) -> None:
    broker = redis.Redis.from_url(isolated_broker)
    host = f"card-{new_id()[:6]}"
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=host, OURVIDZ_VRAM_BUDGET_MB=str(BUDGET),
               OURVIDZ_MEMORY_WAIT="240", OURVIDZ_MEMORY_SLACK=str(SLACK),
               OURVIDZ_IDLE_UNLOAD_SECONDS=json.dumps({"wan": IDLE_WAN}),
               OURVIDZ_RUNTIME_PLUGINS="tests.memsim:ballast", OURVIDZ_TEST_WEIGHTS_MB=json.dumps(WEIGHTS))
    ledger = Ledger(broker, host, "cpu", BUDGET, slack=SLACK)
    sdxl = start_worker("sdxl", **env)
    start_worker("chat", **env)
    wan = start_worker("wan", **env)

    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        watcher = Ledger(redis.Redis.from_url(isolated_broker), host, "cpu", BUDGET)
        while not stop.is_set():
            samples.append(int(watcher.status()["reserved_mb"]))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from celery import Celery

    client = Celery(broker=isolated_broker, backend=isolated_broker)
    client.config_from_object("ourvidz_tasks.celeryconfig")
    client.conf.update(broker_url=isolated_broker, result_backend=isolated_broker)

    def estimate(model: str) -> int:
        return ledger.estimate(model, **first_estimate(model, tiny=True))

    estimates: dict[str, list[int]] = {"sdxl": [], "qwen_instruct": [], "wan": []}
    jobs: list[dict[str, Any]] = []
    chats = []
    started = time.monotonic()
    for round_ in range(ROUNDS):
        # WAN is cold at every one of its jobs: wait for its idle unload first
        wait_for(lambda: not ledger.holders("wan"), timeout=120, what="WAN idle-unloaded")
        batch = [sdxl_job() for _ in range(4)]
        for job in batch[:2]:
            publish(broker, "ourvidz.sdxl.generate", job, "sdxl")
        video = wan_job()
        publish(broker, "ourvidz.wan.generate", video, "wan")
        for job in batch[2:]:
            publish(broker, "ourvidz.sdxl.generate", job, "sdxl")
        chats.append(client.send_task("ourvidz.chat.chat", queue="chat", args=[
            {"messages": [{"role": "user", "content": f"hello {round_}"}], "max_tokens": 4}]))
        enhanced = sdxl_job(enhance={"max_tokens": 6})
        chain = [signature("ourvidz.sdxl.generate", queue="sdxl")]
        broker.lpush("chat", json.dumps(envelope("ourvidz.chat.enhance", [enhanced], "chat", chain=chain)))
        round_jobs = [*batch, video, enhanced]
        jobs += round_jobs
        for job in round_jobs:
            assert terminal(sink, job["id"], 300)["status"] == "completed", job["id"]
        assert chats[-1].get(timeout=300)["completion_tokens"] >= 1
        for model in estimates:
            if ledger.sizes(model)["weights"] is not None:
                estimates[model].append(estimate(model))
    elapsed = time.monotonic() - started
    stop.set()
    sampler.join()

    # every job ends exactly once
    for job in jobs:
        ends = [c for c in sink.callbacks(job["id"]) if c["body"]["status"] in ("completed", "failed")]
        assert len(ends) == 1, (job["id"], ends)
    # the reserved total never exceeded the budget, and the budget was really contended
    assert samples and max(samples) <= BUDGET, max(samples)
    counters = ledger.counters()
    assert counters.get("switches", 0) >= 1 and counters.get("waits", 0) >= 1, counters
    # WAN was cold at each job; its measured working memory never counted its load
    assert wan.text().count("wan loaded in") >= ROUNDS
    wan_sizes = ledger.sizes("wan")
    assert wan_sizes["weights"] >= WEIGHTS["wan"]
    for shape, kept in wan_sizes["samples"].items():
        assert all(0 < mb < WEIGHTS["wan"] * 0.6 for mb in kept), (shape, kept)
    # real numbers: every family's reservation stands in its ratio, far above a 1 MB placeholder
    figures: dict[str, Any] = {}
    for model, values in estimates.items():
        sizes = ledger.sizes(model)
        first = values[0]
        drift = max(max(values) / first, first / min(values))
        assert drift <= 1.3, (model, values)
        assert 0.7 * TARGET[model] <= first <= 1.3 * TARGET[model], (model, first, TARGET[model])
        figures[model] = {"weights_mb": sizes["weights"], "work_mb": sizes["work"], "first_work_mb": sizes["first"],
                          "estimates_mb": values, "drift": round(drift, 3)}
    assert sdxl.alive()
    figures["run"] = {
        "budget_mb": BUDGET, "peak_reserved_mb": max(samples), "samples": len(samples), "jobs": len(jobs),
        "chats": len(chats), "seconds": round(elapsed, 1), "counters": counters,
        "switches_per_hour": round(counters.get("switches", 0) * 3600 / elapsed, 1),
        "wan_cold_loads": wan.text().count("wan loaded in"),
    }
    print(json.dumps(figures, indent=1))
    out = os.environ.get("OURVIDZ_MEMSIM_OUT")
    if out:
        with open(out, "w") as fh:
            json.dump(figures, fh, indent=1)
