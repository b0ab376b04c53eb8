"""A small cluster for benchmarks: a private Redis database, the sink, real workers.

Reuses the test fixtures' building blocks (``tests/support/``), so a bench
runs exactly what the tests run, outside pytest.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from devtools.sink import Sink  # noqa: E402
from ourvidz_tasks.contract import keys  # noqa: E402
from ourvidz_tasks.contract.text import as_text  # noqa: E402
from tests.support.cluster import WorkerProcess  # noqa: E402
from tests.support.env import BROKER, KEY, SECRET, worker_env  # noqa: E402  (sets the env first)
from tests.wire import publish  # noqa: E402

OUT = ROOT / "bench" / "out"


class Cluster:
    """``with Cluster("sdxl", "chat") as c:`` starts those pools on tiny models."""

    def __init__(self, *families: str, threads: int = 2, **env: str) -> None:
        self.families, self.threads, self.env = families, threads, env
        self.tmp = Path(tempfile.mkdtemp(prefix="ourvidz-bench-"))
        self.store = redis.Redis.from_url(BROKER)
        self.sink = Sink(self.tmp / "sink", KEY, SECRET)
        self.workers: dict[str, WorkerProcess] = {}

    def __enter__(self) -> Cluster:
        self.sink.start()
        for family in self.families:  # the pools alone, as deployed: they deliver their own callbacks
            env = worker_env(self.sink, family, OURVIDZ_TORCH_THREADS=str(self.threads),
                             OURVIDZ_PROGRESS_INTERVAL="1", **self.env)
            self.workers[family] = WorkerProcess(family, env, self.tmp / f"{family}.log").start()
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.sink.stop()
        self.store.flushdb()

    def run(self, task: str, queue: str, job: dict[str, Any], timeout: float = 600) -> tuple[dict[str, Any], float]:
        """Publish ``job`` as the edge does; return its terminal callback and the wall time to it."""
        started = time.perf_counter()
        publish(self.store, task, job, queue)
        deadline = time.time() + timeout
        while time.time() < deadline:
            for call in self.sink.callbacks(job["id"]):
                if call["body"]["status"] in ("completed", "failed"):
                    return call["body"], time.perf_counter() - started
            time.sleep(0.005)
        raise TimeoutError(job["id"])

    def loads(self, family: str) -> dict[str, int]:
        raw = self.store.hgetall(keys.loads(self.workers[family].node))
        return {as_text(k): int(v) for k, v in raw.items()}


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``call`` (a floor measured in this process)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def write(name: str, data: dict[str, Any], figures: list[dict[str, Any]] | None = None) -> Path:
    """``bench/out/{name}.json``: the raw data, and the figures ``bench/report.py`` puts in the table."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({**data, "figures": figures or []}, indent=2))
    print(f"wrote {path.relative_to(ROOT)}")
    return path
