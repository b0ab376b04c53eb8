"""Dispatch latency of a valid job: ours against a bare Celery solo worker, same broker, same run.

Two workers side by side on one broker: our ``bin/worker sdxl`` (nothing else
running: no outbox consumer) and a bare Celery solo worker
(``bench/dispatch_worker.py``) whose task sends the same signed ``processing``
callback and then a terminal one. Jobs go to one and then the other,
alternating, one at a time, each published the way the edge publishes (a
protocol v2 envelope LPUSHed onto the queue). Our jobs are valid tiny SDXL jobs
(2 steps, 256x256, the tiny model: ``tests.support.jobs.tiny_job``), so each
runs the whole path of a real job: admission, the ``processing`` callback, the
model, the uploads, the terminal callback, the upkeep between jobs; the next
job is published 5-15 ms after the previous one's terminal callback.

Measured per job: publish → task start (the last ``task_prerun`` receiver) and
publish → the signed ``processing`` callback at the sink. p50 and p99 over
``OURVIDZ_BENCH_JOBS`` jobs each (default 300), ratios ours / bare (targets:
p50 ≤ 2x, p99 ≤ 3x). And where the time goes: a probe both workers load
(``-I bench.dispatch_worker``) stamps each stage a message meets in the
worker (fetch, ``unacked`` record, Celery's consumer, the signals' receivers,
the task body, our admission round trips, the callback's hand-off, signing and
POST); the bench prints the median of each stage-to-stage interval, ours beside
bare. Redis, then RabbitMQ when it answers (``OURVIDZ_BENCH_AMQP``, default
``amqp://guest:guest@127.0.0.1:5672//``; there jobs are published with kombu;
``OURVIDZ_BENCH_BROKERS=redis`` runs one). Writes ``bench/out/dispatch.json``
(with every job's latencies and stage time stamps).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import socket
import statistics
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
from tests.support.jobs import tiny_job
from tests.wire import envelope, publish

JOBS = int(os.environ.get("OURVIDZ_BENCH_JOBS", "300"))
WARMUP = 10
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


#: the stages of ``bench/dispatch_worker.py`` in the order a message meets them
STAGES = ("deliver", "unacked", "unacked_end", "consume", "received_first", "received_last", "prerun_first",
          "prerun_last", "body", "admit", "admit_end", "processing", "send", "sign", "post")
#: what each interval between two stages is (named by the stage it ends at)
INTERVALS = {
    "deliver": "broker fetch (BRPOP / our move into the processing list) and decode",
    "unacked": "kombu: message object",
    "unacked_end": "unacked record (Redis round trip)",
    "consume": "kombu: to Celery's consumer",
    "received_first": "Celery: request built, strategy",
    "received_last": "task_received receivers (ours: owner record)",
    "prerun_first": "Celery: to the pool, trace set-up",
    "prerun_last": "task_prerun receivers (ours: task events, job gate)",
    "body": "Celery: before_start, task call",
    "admit": "ours: to the lifecycle",
    "admit_end": "ours: admission (claim; final record, poison count, cancel flag)",
    "processing": "ours: to the processing callback",
    "send": "ours: body built and serialised, hand-off to the sender thread",
    "sign": "ours: the sender thread to the signing (bare: the task to its callback)",
    "post": "HMAC-SHA256 signature (bare: also its body built and serialised)",
    "sink": "HTTP POST to the sink's receipt",
}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "p50": percentile(values, 50), "p90": percentile(values, 90)}


def breakdown(stamps: dict[str, dict[str, float]], published: dict[str, tuple[str, float]],
              arrived: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each interval between consecutive stages (publish ... sink), ms over the jobs: mean (the means add
    up to the whole path's), p50, p90."""
    gaps: dict[str, list[float]] = {}
    for job_id, (task_id, at) in published.items():
        if task_id not in stamps or job_id not in arrived:
            continue
        points = [("publish", at)] + [(s, stamps[task_id][s]) for s in STAGES if s in stamps[task_id]]
        points.append(("sink", arrived[job_id]))
        for (_, a), (name, b) in itertools.pairwise(points):
            gaps.setdefault(name, []).append((b - a) * 1000)
    return {name: spread(values) for name, values in gaps.items()}


def after_terminal(stamps: dict[str, dict[str, float]], published: dict[str, tuple[str, float]],
                   ended: dict[str, float]) -> dict[str, Any]:
    """The worker after a job's terminal callback reached the sink: to the end of ``task_postrun`` and of
    the ack (it fetches again after that), and the next job's fetch when it was published before that."""
    order = list(published.items())
    tail: dict[str, list[float]] = {"postrun_last": [], "ack_end": []}
    fetch: dict[str, list[float]] = {"busy": [], "idle": []}
    for (job_id, (task_id, _)), (_, (next_task, next_at)) in itertools.pairwise(order):
        st, nxt = stamps.get(task_id, {}), stamps.get(next_task, {})
        for stage in tail:
            if stage in st and job_id in ended:
                tail[stage].append((st[stage] - ended[job_id]) * 1000)
        first = nxt.get("deliver", nxt.get("consume"))
        if "ack_end" in st and first is not None:
            fetch["busy" if next_at < st["ack_end"] else "idle"].append((first - next_at) * 1000)
    out: dict[str, Any] = {stage: spread(v) for stage, v in tail.items() if v}
    out["next_published_before_the_ack"] = {
        "share": len(fetch["busy"]) / max(1, len(fetch["busy"]) + len(fetch["idle"])),
        **{f"fetch_ms_{k}": spread(v) for k, v in fetch.items() if v}}
    return out


class Arrivals:
    """Each job's first ``processing`` and its terminal callback at the sink, read incrementally."""

    def __init__(self, sink: Sink) -> None:
        self.sink, self.seen = sink, 0
        self.first: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    def wait_end(self, job_id: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while job_id not in self.ended:
            calls = self.sink.state.callbacks
            for call in calls[self.seen:len(calls)]:
                body = call["body"]
                if body["status"] == "processing":
                    self.first.setdefault(body["job_id"], call["at"])
                elif body["status"] in ("completed", "failed"):
                    self.ended[body["job_id"]] = call["at"]
                    if body["status"] == "failed":
                        raise RuntimeError(f"job {body['job_id']} failed: {body.get('error')}")
                self.seen += 1
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id}: no terminal callback in {timeout:g} s")
            time.sleep(0.001)


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
                {**env, "OURVIDZ_BENCH_PROBE": str(probes["ours"]), "OURVIDZ_BENCH_OURS": "1"},
                tmp / f"ours-{label}.log", f"sdxl@{host} ready.")
    bare = Proc([str(ROOT / ".venv" / "bin" / "celery"), "-A", "bench.dispatch_worker", "worker", "--pool", "solo",
                 "--concurrency", "1", "-Q", BARE_QUEUE, "--hostname", f"bare@{host}", "--without-gossip",
                 "--without-mingle", "--loglevel", "INFO", "-I", "bench.dispatch_worker"],
                {**env, "OURVIDZ_BENCH_PROBE": str(probes["bare"])}, tmp / f"bare-{label}.log", f"bare@{host} ready.")
    published: dict[str, dict[str, tuple[str, float]]] = {"ours": {}, "bare": {}}
    arrivals = Arrivals(sink)
    started = time.time()
    try:
        ours.wait_ready()
        bare.wait_ready()
        rng = random.Random(7)
        targets = {"ours": ("ourvidz.sdxl.generate", "sdxl"), "bare": ("bench.bare", BARE_QUEUE)}
        for i in range(WARMUP + JOBS):
            for name in ("ours", "bare") if i % 2 == 0 else ("bare", "ours"):
                job = tiny_job()  # valid: the tiny model runs it, 2 steps at 256x256
                at = time.time()
                task, queue = targets[name]
                task_id = publisher(task, job, queue)
                if i >= WARMUP:
                    published[name][job["id"]] = (task_id, at)
                arrivals.wait_end(job["id"])
                time.sleep(rng.uniform(0.005, 0.015))  # the worker acks and settles, as between real jobs
    finally:
        ours.stop()
        bare.stop()
        sink.stop()
    result: dict[str, Any] = {"seconds": round(time.time() - started, 1)}
    first = arrivals.first
    for name in ("ours", "bare"):
        stamps = json.loads(probes[name].read_text())
        start = [stamps[t]["prerun_last"] - at for t, at in published[name].values() if "prerun_last" in stamps.get(t, {})]
        callback = [first[j] - at for j, (_, at) in published[name].items() if j in first]
        result[name] = {"task_start_ms": stats(start), "processing_callback_ms": stats(callback),
                        "breakdown_ms": breakdown(stamps, published[name], first),
                        "after_terminal_ms": after_terminal(stamps, published[name], arrivals.ended),
                        "raw_ms": {"task_start": [round(v * 1000, 3) for v in start],
                                   "processing_callback": [round(v * 1000, 3) for v in callback]},
                        "stages": {job_id: {"published": at, **stamps.get(task_id, {}), "sink": first.get(job_id)}
                                   for job_id, (task_id, at) in published[name].items()}}
    for what in ("task_start_ms", "processing_callback_ms"):
        for q in ("p50", "p99"):
            result[f"{what}_{q}_ratio"] = result["ours"][what][q] / result["bare"][what][q]
    return result


def print_breakdown(label: str, r: dict[str, Any]) -> None:
    """Each stage-to-stage interval, ours beside bare (mean and p50 ms), and the worker after a job."""
    ours, bare = r["ours"]["breakdown_ms"], r["bare"]["breakdown_ms"]
    print(f"\n{label}: where publish → signed processing callback goes (ms per interval; the means add up)")
    print(f"  {'interval [ends at stage]':74s} {'mean: ours':>10s} {'bare':>6s} {'extra':>6s}"
          f"   {'p50: ours':>9s} {'bare':>6s}")
    zero = {"mean": 0.0, "p50": 0.0}
    for stage in (*STAGES, "sink"):
        if stage in ours or stage in bare:
            o, b = ours.get(stage, zero), bare.get(stage, zero)
            print(f"  {INTERVALS[stage] + ' [' + stage + ']':74s} {o['mean']:10.3f} {b['mean']:6.3f} "
                  f"{o['mean'] - b['mean']:+6.3f}   {o['p50']:9.3f} {b['p50']:6.3f}")
    o, b = (sum(v["mean"] for v in x.values()) for x in (ours, bare))
    print(f"  {'whole path':74s} {o:10.3f} {b:6.3f} {o - b:+6.3f}   "
          f"{r['ours']['processing_callback_ms']['p50']:9.3f} {r['bare']['processing_callback_ms']['p50']:6.3f}")
    for name in ("ours", "bare"):
        after = r[name]["after_terminal_ms"]
        busy = after["next_published_before_the_ack"]
        line = ", ".join(f"to {stage} {after[stage]['p50']:.2f} ms (p90 {after[stage]['p90']:.2f})"
                         for stage in ("postrun_last", "ack_end") if stage in after)
        fetch = ", ".join(f"{k.removeprefix('fetch_ms_')}: fetch {v['mean']:.2f} ms mean"
                          for k, v in busy.items() if k.startswith("fetch_ms_"))
        print(f"  {name}: after the terminal callback: {line}; next job published before the ack: "
              f"{busy['share']:.0%} ({fetch})")


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
        print_breakdown(label, r)
        for what, title in (("task_start_ms", "publish → task start"),
                            ("processing_callback_ms", "publish → signed processing callback")):
            for q, target in (("p50", 2.0), ("p99", 3.0)):
                ours, bare = r["ours"][what][q], r["bare"][what][q]
                print(f"{label:8s} {title:40s} {q}: ours {ours:6.2f} ms  bare Celery {bare:6.2f} ms  "
                      f"ratio {ours / bare:4.2f}x (target ≤ {target:g}x)")
                figures.append(figure(f"dispatch ({label}): {title}, {q}", ours, "ms", reference=bare,
                                      against="bare Celery solo worker", max_ratio=target,
                                      note=f"{JOBS} valid tiny SDXL jobs and bare tasks, alternating, same broker"))
    write("dispatch", {"jobs": JOBS, "results": results}, figures)


if __name__ == "__main__":
    main()
