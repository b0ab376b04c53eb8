"""Autoscaling signals (``ourvidz_tasks.services.autoscale``), scraped from the metrics exporter over HTTP.

A real SDXL pool on a private database runs jobs (its measured processing times
become the service time), then stops; jobs published while no pool runs wait,
and the exporter reports how many, how long the first in line has waited (it
grows between scrapes), and the estimated drain time. A pool started again
counts as a live pool and drains the queue.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.contract.settings import Settings
from ourvidz_tasks.services.metrics import serve

from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal, tiny_job
from .support.ports import free_port
from .support.process import wait_for
from .wire import publish

TASK = "ourvidz.sdxl.generate"


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(url, timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(ourvidz_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


@pytest.fixture()
def exporter(isolated_broker: str) -> Iterator[str]:
    port = free_port()
    served = serve(Settings(broker_url=isolated_broker), port, "127.0.0.1")
    yield f"http://127.0.0.1:{port}/metrics"
    served.close()


@pytest.mark.slow
def test_waiting_jobs_age_service_time_and_drain_estimate(isolated_broker: str, exporter: str, sink: Sink,
                                                         start_worker: Callable[..., WorkerProcess]) -> None:
    store = redis.Redis.from_url(isolated_broker)
    tag = new_id()[:6]
    worker = start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"autoscale-{tag}")
    done = [tiny_job() for _ in range(3)]
    for job in done:
        publish(store, TASK, job, "sdxl")
    times = [terminal(sink, job["id"], 240)["metadata"]["processing_time"] for job in done]
    before = scrape(exporter)
    assert before['ourvidz_pools{family="sdxl"}'] == 1
    assert before['ourvidz_service_seconds{family="sdxl"}'] == pytest.approx(statistics.median(times))
    assert before['ourvidz_queue_oldest_wait_seconds{queue="sdxl"}'] == 0
    worker.stop()  # its heartbeat goes with it

    waiting = [tiny_job() for _ in range(4)]
    for job in waiting:
        publish(store, TASK, job, "sdxl")
    first = scrape(exporter)
    assert first['ourvidz_waiting_jobs{family="sdxl"}'] == 4 and first['ourvidz_pools{family="sdxl"}'] == 0
    assert first['ourvidz_drain_seconds{family="sdxl"}'] == pytest.approx(4 * statistics.median(times))
    pause = 3.0
    time.sleep(pause)
    second = scrape(exporter)
    assert second['ourvidz_queue_oldest_wait_seconds{queue="sdxl"}'] >= \
        first['ourvidz_queue_oldest_wait_seconds{queue="sdxl"}'] + pause
    assert second['ourvidz_waiting_jobs{family="chat"}'] == 0
    assert second['ourvidz_queue_oldest_wait_seconds{queue="chat"}'] == 0

    # a pool comes (the autoscaler's answer): it is counted, and the queue and its age go back to 0
    start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"autoscale-2-{tag}")
    for job in waiting:
        assert terminal(sink, job["id"], 240)["status"] == "completed"
    after = wait_for(lambda: (m := scrape(exporter)) and m['ourvidz_waiting_jobs{family="sdxl"}'] == 0 and m,
                     60, 1, "the queue to empty")
    assert after['ourvidz_pools{family="sdxl"}'] == 1
    assert after['ourvidz_queue_oldest_wait_seconds{queue="sdxl"}'] == 0
    assert after['ourvidz_drain_seconds{family="sdxl"}'] == 0
