"""Dispatch latency: ours against a bare Celery solo worker, same broker, same run.

Two workers side by side on one broker: our ``bin/worker sdxl`` (nothing else
running: no outbox consumer) and a bare Celery solo worker
(``bench/dispatch_worker.py``) whose task sends the same signed ``processing``
callback and then a terminal one. Jobs go to one and then the other,
alternating, one at a time, each published the way the edge publishes (a
protocol v2 envelope LPUSHed onto the queue). Our jobs fail validation at once
(``INVALID_JOB``), so the model plays no part: what is measured is the path from
the broker to the task body and to the edge.

Measured per job: publish → task start (the last ``task_prerun`` receiver, a
probe both workers load) and publish → the signed ``processing`` callback at
the sink. p50 and p99 over ``OURVIDZ_BENCH_JOBS`` jobs each (default 1000),
ratios ours / bare (targets: p50 ≤ 2x, p99 ≤ 3x). Redis, then RabbitMQ when
it answers (``OURVIDZ_BENCH_AMQP``, default ``amqp://guest:guest@127.0.0.1:5672//``;
there jobs are published with kombu; ``OURVIDZ_BENCH_BROKERS=redis`` runs one).
Writes ``bench/out/dispatch.json`` (with every job's latencies).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from figures import figure
from harness import ROOT, summary, write

from devtools.sink import Sink
from tests.support.env import BROKER, KEY, SECRET, worker_env
from tests.wire import envelope, publish

JOBS = int(os.environ.get("OURVIDZ_BENCH_JOBS", "1000"))
WARMUP = 50
AMQP = os.environ.get("OURVIDZ_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BARE_QUEUE = "bench_bare"


class Proc:
    """A worker process with its log; ready when ``marker`` appears in the log."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, marker: str) -> None:
        self.log, self.marker = log, marker
        self.handle = open(log, "ab")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self.handle, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> Proc:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.marker in self.log.read_text(errors="replace"):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args} exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.proc.args} not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.handle.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def stats(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {**summary(ms), "p50": percentile(ms, 50), "p99": percentile(ms, 99)}


class Publisher:
    """Publishes a job onto a queue as the edge would (Redis: LPUSH of the envelope; AMQP: kombu)."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self.redis = redis.Redis.from_url(broker) if broker.startswith("redis") else None
        self.producer: Any = None
        if self.redis is None:
            from kombu import Connection

            self.conn = Connection(broker)
            self.producer = self.conn.Producer()

    def __call__(self, task: str, job: dict[str, Any], queue: str) -> str:
        if self.redis is not None:
            return publish(self.redis, task, job, queue)
        env = envelope(task, [job], queue, argsrepr=f"({job['id']!r},)")
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        self.producer.publish([[job], {}, embed], routing_key=queue, exchange="", headers=env["headers"], serializer="json",
                              correlation_id=env["headers"]["id"], delivery_mode=2)
        return str(env["headers"]["id"])

    def purge(self, *queues: str) -> None:
        if self.redis is not None:
            self.redis.delete(*queues)
            return
        with self.conn.channel() as channel:
            for queue in queues:
                with contextlib.suppress(Exception):  # the queue does not exist yet
                    channel.queue_purge(queue)


def run(broker: str, label: str, tmp: Path) -> dict[str, Any]:
    """One broker: both workers, warm-up, then ``JOBS`` alternating jobs each."""
    sink = Sink(tmp / f"sink-{label}", KEY, SECRET).start()
    publisher = Publisher(broker)
    publisher.purge("sdxl", BARE_QUEUE)
    host = f"bench-dispatch-{label}-{uuid.uuid4().hex[:6]}"
    extra = {"OURVIDZ_BROKER_URL": broker, "OURVIDZ_HOSTNAME": host}
    if not broker.startswith("redis"):
        extra["OURVIDZ_REDIS_URL"] = BROKER
    env = worker_env(sink, "sdxl", **extra)
    probes = {name: tmp / f"probe-{label}-{name}.json" for name in ("ours", "bare")}
    ours = Proc([str(ROOT / "bin" / "worker"), "sdxl", "-I", "bench.dispatch_worker"],
                {**env, "OURVIDZ_BENCH_PROBE": str(probes["ours"])}, tmp / f"ours-{label}.log", f"sdxl@{host} ready.")
    bare = Proc([str(ROOT / ".venv" / "bin" / "celery"), "-A", "bench.dispatch_worker", "worker", "--pool", "solo",
                 "--concurrency", "1", "-Q", BARE_QUEUE, "--hostname", f"bare@{host}", "--without-gossip",
                 "--without-mingle", "--loglevel", "INFO", "-I", "bench.dispatch_worker"],
                {**env, "OURVIDZ_BENCH_PROBE": str(probes["bare"])}, tmp / f"bare-{label}.log", f"bare@{host} ready.")
    published: dict[str, dict[str, tuple[str, float]]] = {"ours": {}, "bare": {}}
    try:
        ours.wait_ready()
        bare.wait_ready()
        rng = random.Random(7)
        targets = {"ours": ("ourvidz.sdxl.generate", "sdxl"), "bare": ("bench.bare", BARE_QUEUE)}
        for i in range(WARMUP + JOBS):
            for name in ("ours", "bare") if i % 2 == 0 else ("bare", "ours"):
                job = {"id": uuid.uuid4().hex, "type": "sdxl_image_fast", "user_id": "bench", "prompt": "a harbour",
                       "config": {"num_inference_steps": "x"}}  # INVALID_JOB: no model time
                expected = len(sink.state.callbacks) + 2
                at = time.time()
                task, queue = targets[name]
                task_id = publisher(task, job, queue)
                if i >= WARMUP:
                    published[name][job["id"]] = (task_id, at)
                deadline = time.time() + 30
                while len(sink.state.callbacks) < expected:
                    if time.time() > deadline:
                        raise TimeoutError(f"{name} job {job['id']}: no terminal callback in 30 s")
                    time.sleep(0.0005)
                time.sleep(rng.uniform(0.005, 0.015))  # the worker acks and settles, as between real jobs
    finally:
        ours.stop()
        bare.stop()
        sink.stop()
    first: dict[str, float] = {}
    for call in sink.callbacks():
        if call["body"]["status"] == "processing":
            first.setdefault(call["body"]["job_id"], call["at"])
    result: dict[str, Any] = {}
    for name in ("ours", "bare"):
        starts = json.loads(probes[name].read_text())
        start = [starts[t] - at for t, at in published[name].values() if t in starts]
        callback = [first[j] - at for j, (_, at) in published[name].items() if j in first]
        result[name] = {"task_start_ms": stats(start), "processing_callback_ms": stats(callback),
                        "raw_ms": {"task_start": [round(v * 1000, 3) for v in start],
                                   "processing_callback": [round(v * 1000, 3) for v in callback]}}
    for what in ("task_start_ms", "processing_callback_ms"):
        for q in ("p50", "p99"):
            result[f"{what}_{q}_ratio"] = result["ours"][what][q] / result["bare"][what][q]
    return result


def amqp_answers(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=2):
            return True
    except OSError:
        return False


def main() -> None:
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="ourvidz-dispatch-"))
    brokers = {"redis": BROKER}
    if amqp_answers(AMQP):
        brokers["rabbitmq"] = AMQP
    only = os.environ.get("OURVIDZ_BENCH_BROKERS")  # e.g. "rabbitmq"
    if only:
        brokers = {k: v for k, v in brokers.items() if k in only.split(",")}
    results = {label: run(url, label, tmp) for label, url in brokers.items()}
    figures = []
    for label, r in results.items():
        for what, title in (("task_start_ms", "publish → task start"),
                            ("processing_callback_ms", "publish → signed processing callback")):
            for q, target in (("p50", 2.0), ("p99", 3.0)):
                ours, bare = r["ours"][what][q], r["bare"][what][q]
                print(f"{label:8s} {title:40s} {q}: ours {ours:6.2f} ms  bare Celery {bare:6.2f} ms  "
                      f"ratio {ours / bare:4.2f}x (target ≤ {target:g}x)")
                figures.append(figure(f"dispatch ({label}): {title}, {q}", ours, "ms", reference=bare,
                                      against="bare Celery solo worker", max_ratio=target,
                                      note=f"{JOBS} jobs each, alternating, same broker"))
    write("dispatch", {"jobs": JOBS, "results": results}, figures)


if __name__ == "__main__":
    main()
