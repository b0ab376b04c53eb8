"""Prometheus metrics: a real worker serving its endpoint, scraped while jobs run.

The worker runs on a private broker database (``isolated_broker``), so the
queue depth and the job counters are its own and exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from devtools.sink import Sink
from ourvidz_tasks.contract import keys
from ourvidz_tasks.services.metrics import callback_backlog, ledger_rows, port_for

from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal
from .support.ports import free_port
from .support.process import ROOT, ManagedProcess, wait_for
from .wire import publish

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def job(**config: Any) -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a metrics lighthouse",
            "config": {"resolution": "256x256", "num_inference_steps": 4, "seed": 1, **config}}


def test_port_offsets_keep_the_processes_of_one_host_apart() -> None:
    roles = ("sdxl", "chat", "wan", "outbox")
    assert [port_for(9101, role, "cuda:0") for role in roles] == [9101, 9102, 9103, 9104]
    assert [port_for(9101, role, "cuda:1") for role in roles] == [9105, 9106, 9107, 9104]
    assert port_for(9101, "wan", None) == 9103 and port_for(9101, "sdxl", "cpu") == 9101


def test_backlog_and_ledger_read_redis_defensively(isolated_broker: str) -> None:
    store = redis.Redis.from_url(isolated_broker)
    assert callback_backlog(store) == 0 and ledger_rows(store) == []
    store.rpush(keys.JOBS_ENDED, "a", "b", "c", "a")
    store.set(keys.job_final("a"), "{}")
    store.set(keys.job_final("b"), "{}")
    store.set(keys.job_delivered("b"), "1")  # c: final record expired, not counted
    assert callback_backlog(store) == 1
    store.hset(keys.ledger("gpu-host", "cuda:0") + ":meta", mapping={"budget": 76000, "seen": 1})
    store.hset(keys.ledger("gpu-host", "cuda:0") + ":held", mapping={"sdxl/sdxl": 10240, "chat/qwen_instruct": 15360})
    store.hset(keys.ledger("other", "cpu") + ":meta", mapping={"budget": "junk"})
    rows = {(r.host, r.device): (r.reserved_mb, r.budget_mb) for r in ledger_rows(store)}
    assert rows == {("gpu-host", "cuda:0"): (25600, 76000), ("other", "cpu"): (0, 0)}


@pytest.mark.slow
def test_worker_metrics_move_as_jobs_run(isolated_broker: str, start_worker: Callable[..., WorkerProcess],
                                         sink: Sink) -> None:
    base = free_port()
    broker = redis.Redis.from_url(isolated_broker)
    # inline callbacks: a failed delivery is counted in this process (with the outbox, in the outbox's)
    worker = start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_METRICS_PORT=str(base),
                          OURVIDZ_HOSTNAME=f"metrics-{new_id()[:6]}", OURVIDZ_CALLBACKS="inline")
    assert f"metrics on http://127.0.0.1:{base}/metrics" in worker.text()

    before = scrape(base)
    assert value(before, "ourvidz_redis_up") == 1
    assert value(before, "ourvidz_model_load_seconds_count", model="sdxl") == 1  # the warmup load, counted
    assert value(before, "ourvidz_model_load_seconds_sum", model="sdxl") > 0
    assert value(before, "ourvidz_model_resident_bytes", model="sdxl") > 0
    assert value(before, "ourvidz_queue_depth", queue="sdxl") == 0
    assert not [name for name, _ in before if name == "ourvidz_jobs_total"]  # nothing ran yet
    assert value(before, "process_resident_memory_bytes") > 0

    # a burst: the solo worker takes one job at a time, the rest wait (in the fair order: the intake
    # records each one's arrival, by the broker's clock)
    burst = [job(seed=i) for i in range(4)]
    for payload in burst:
        publish(broker, "ourvidz.sdxl.generate", payload, "sdxl")
    during = scrape(base)
    assert value(during, "ourvidz_queue_depth", queue="sdxl") >= 2
    assert all(terminal(sink, payload["id"])["status"] == "completed" for payload in burst)

    def settled() -> Samples | None:
        samples = scrape(base)
        done = value(samples, "ourvidz_jobs_total", family="sdxl", type="sdxl_image_fast", outcome="completed", code="")
        return samples if done == 4 else None

    after = wait_for(settled, 30, 0.2, "4 completed jobs in the metrics")
    assert value(after, "ourvidz_queue_depth", queue="sdxl") == 0
    for phase in ("model", "delivery", "total"):
        assert value(after, "ourvidz_job_duration_seconds_count", family="sdxl", phase=phase) == 4
        assert value(after, "ourvidz_job_duration_seconds_sum", family="sdxl", phase=phase) > 0
    total = value(after, "ourvidz_job_duration_seconds_sum", family="sdxl", phase="total")
    split = sum(value(after, "ourvidz_job_duration_seconds_sum", family="sdxl", phase=p) for p in ("model", "delivery"))
    assert split == pytest.approx(total, abs=0.05)
    assert value(after, "ourvidz_model_load_seconds_count", model="sdxl") == 1  # no per-job load
    # queue wait and GPU seconds: in the callbacks, and per family (no user) in the metrics
    ended = [terminal(sink, payload["id"])["metadata"] for payload in burst]
    assert all(m["queue_wait_s"] >= 0 and m["gpu_seconds"] > 0 for m in ended)
    assert max(m["queue_wait_s"] for m in ended) > 0  # the last of the burst waited for the others
    starts = [next(c["body"]["metadata"] for c in sink.callbacks(p["id"]) if c["body"]["status"] == "processing")
              for p in burst]
    assert [m["queue_wait_s"] for m in starts] == [m["queue_wait_s"] for m in ended]
    assert value(after, "ourvidz_queue_wait_seconds_count", family="sdxl") == 4
    assert value(after, "ourvidz_queue_wait_seconds_sum", family="sdxl") == pytest.approx(
        sum(m["queue_wait_s"] for m in ended), abs=0.01)
    assert value(after, "ourvidz_gpu_seconds_total", family="sdxl") == pytest.approx(
        sum(m["gpu_seconds"] for m in ended), abs=0.01)
    assert not [labels for name, labels in after if name.startswith(("ourvidz_gpu", "ourvidz_queue_wait"))
                and any(key == "user" for key, _ in labels)]
    assert value(after, "ourvidz_callback_backlog") == 0

    # a job that fails validation: counted by outcome and code, with no model time
    bad = job(num_images=5)
    publish(broker, "ourvidz.sdxl.generate", bad, "sdxl")
    assert terminal(sink, bad["id"])["error"]["code"] == "INVALID_JOB"
    failed = wait_for(lambda: (s := scrape(base)) and value(
        s, "ourvidz_jobs_total", family="sdxl", type="sdxl_image_fast", outcome="failed", code="INVALID_JOB") == 1
        and s, 30, 0.2, "the failed job in the metrics")
    assert value(failed, "ourvidz_job_duration_seconds_count", family="sdxl", phase="model") == 4
    assert value(failed, "ourvidz_job_duration_seconds_count", family="sdxl", phase="total") == 5

    # a terminal callback that cannot be delivered: a failure, and a backlog of one until replayed
    lost = job()
    sink.faults(callback=503)
    try:
        publish(broker, "ourvidz.sdxl.generate", lost, "sdxl")
        stuck = wait_for(lambda: (s := scrape(base)) and value(s, "ourvidz_callback_failures_total",
                                                               status="completed") == 1 and s,
                         60, 0.2, "a callback failure in the metrics")
        assert value(stuck, "ourvidz_callback_backlog") == 1
    finally:
        sink.faults()
    replay = subprocess.run(
        [sys.executable, "-m", "ourvidz_tasks.tools.cli", "replay", lost["id"]], cwd=ROOT, capture_output=True,
        text=True, timeout=120,
        env={**worker.env, "OURVIDZ_BROKER_URL": isolated_broker},
    )
    assert replay.returncode == 0, replay.stderr
    assert terminal(sink, lost["id"])["status"] == "completed"
    assert [c["body"]["status"] for c in sink.callbacks(lost["id"])].count("completed") == 1
    assert value(scrape(base), "ourvidz_callback_backlog") == 0

    # the user's usage, from the pool's daily keys: 6 jobs ended (the failed one too)
    usage = subprocess.run([sys.executable, "-m", "ourvidz_tasks.tools.cli", "usage", "--since", "2d", "--json"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**worker.env, "OURVIDZ_BROKER_URL": isolated_broker})
    assert usage.returncode == 0, usage.stderr
    mine = json.loads(usage.stdout)["users"]["user_123"]
    assert mine["jobs"] == 6 and mine["gpu_seconds"] >= sum(m["gpu_seconds"] for m in ended) - 0.01


@pytest.mark.slow
def test_standalone_exporter_sees_queue_depth(isolated_broker: str, tmp_path: Path) -> None:
    port = free_port()
    broker = redis.Redis.from_url(isolated_broker)
    exporter = ManagedProcess([sys.executable, "-m", "ourvidz_tasks.tools.cli", "metrics", "--port", str(port)],
                              {**_env(), "OURVIDZ_BROKER_URL": isolated_broker}, tmp_path / "metrics.log").launch()
    try:
        samples = wait_for(lambda: _try_scrape(port), 60, 0.2, "the exporter")
        assert value(samples, "ourvidz_queue_depth", queue="wan") == 0
        assert value(samples, "ourvidz_legacy_queue_depth", list="sdxl_queue") == 0
        for i in range(3):  # nobody consumes this database: the jobs stay queued
            publish(broker, "ourvidz.wan.generate", {"id": f"queued-{i}", "type": "video_fast"}, "wan")
        publish(broker, "ourvidz.outbox.deliver", {"id": "cb"}, "outbox")
        broker.rpush("sdxl_queue", '{"id": "legacy-1"}')
        samples = scrape(port)
        assert value(samples, "ourvidz_queue_depth", queue="wan") == 3
        assert value(samples, "ourvidz_queue_depth", queue="outbox") == 1
        assert value(samples, "ourvidz_queue_depth", queue="sdxl") == 0
        assert value(samples, "ourvidz_legacy_queue_depth", list="sdxl_queue") == 1
        assert value(samples, "ourvidz_redis_up") == 1
        assert not any(name.startswith("ourvidz_jobs") for name, _ in samples)  # no pool, no job counters
    finally:
        exporter.stop()


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}


def _try_scrape(port: int) -> Samples | None:
    try:
        return scrape(port)
    except httpx.HTTPError:
        return None
