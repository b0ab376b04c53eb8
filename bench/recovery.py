"""Recovery: a busy pool SIGKILLed and restarted under the same name, and a Redis restart.

1. An SDXL pool is killed mid-job (SIGKILL, the way the OOM killer or a CUDA
   fault ends it) and restarted at once under the same name, as systemd,
   docker-compose and Kubernetes do. Measured: kill → the job running again
   (its next ``processing`` callback) and kill → its terminal callback.
2. The broker (a private redis-server with AOF) is restarted between jobs.
   Measured: Redis answering again → the next job's terminal callback.
Beside Celery's default: an unacked Redis message comes back only after
``visibility_timeout`` (1 hour by default).
"""

from __future__ import annotations

import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from figures import figure
from harness import Cluster, WorkerProcess, worker_env, write

from tests.support.cluster import RedisServer
from tests.support.process import wait_for
from tests.wire import publish

VISIBILITY_TIMEOUT = 3600.0  # kombu's Redis default


def job(steps: int) -> dict:
    return {"id": uuid.uuid4().hex, "type": "sdxl_image_fast", "user_id": "bench", "prompt": "a harbour",
            "config": {"resolution": "768x768", "num_inference_steps": steps, "seed": 1}}


def statuses(cluster: Cluster, job_id: str) -> list[tuple[str, float]]:
    return [(c["body"]["status"], c["at"]) for c in cluster.sink.callbacks(job_id)]


def killed_pool(rounds: int = 2) -> dict:
    back, done = [], []
    with Cluster() as cluster:
        env = worker_env(cluster.sink, "sdxl", OURVIDZ_TORCH_THREADS="2", OURVIDZ_PROGRESS_INTERVAL="0")
        worker = cluster.workers["sdxl"] = WorkerProcess("sdxl", env, cluster.tmp / "sdxl.log").start()
        for _ in range(rounds):
            payload = job(steps=150)  # the schedule limit: about 15 s of tiny-model work
            publish(cluster.store, "ourvidz.sdxl.generate", payload, "sdxl")
            wait_for(lambda p=payload: len(statuses(cluster, p["id"])) >= 3, 120, 0.01, "the job to be running")
            seen = len(statuses(cluster, payload["id"]))
            worker.stop(signal.SIGKILL)
            killed = time.time()
            worker = cluster.workers["sdxl"] = WorkerProcess("sdxl", env, cluster.tmp / "sdxl.log").start()  # same name
            wait_for(lambda p=payload, n=seen: len(statuses(cluster, p["id"])) > n, 300, 0.01, "the job again")
            back.append(statuses(cluster, payload["id"])[seen][1] - killed)
            wait_for(lambda p=payload: statuses(cluster, p["id"])[-1][0] in ("completed", "failed"), 600, 0.05,
                     "the terminal callback")
            done.append(statuses(cluster, payload["id"])[-1][1] - killed)
    return {"kill_to_running_s": back, "kill_to_terminal_s": done}


def redis_restart(rounds: int = 2) -> dict:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="ourvidz-bench-redis-"))).start()
    nexts = []
    try:
        with Cluster() as cluster:
            env = worker_env(cluster.sink, "sdxl", OURVIDZ_TORCH_THREADS="2", OURVIDZ_BROKER_URL=server.url(),
                             OURVIDZ_HOSTNAME=f"bench-redis-{uuid.uuid4().hex[:6]}")
            cluster.workers["sdxl"] = WorkerProcess("sdxl", env, cluster.tmp / "sdxl-redis.log").start()
            client = server.client()
            for _ in range(rounds):
                server.stop()
                server.start()
                up = time.time()
                payload = job(steps=2)
                publish(client, "ourvidz.sdxl.generate", payload, "sdxl")
                wait_for(lambda p=payload: any(s in ("completed", "failed") for s, _ in statuses(cluster, p["id"])),
                         300, 0.01, "the job after the restart")
                nexts.append(max(at for _, at in statuses(cluster, payload["id"])) - up)
    finally:
        server.stop()
    return {"redis_up_to_next_terminal_s": nexts}


def main() -> None:
    data = {**killed_pool(), **redis_restart()}
    back = statistics.median(data["kill_to_running_s"])
    after = statistics.median(data["redis_up_to_next_terminal_s"])
    print(f"SIGKILL of a busy pool, restarted under the same name: job running again after {back:.1f}s "
          f"(terminal after {statistics.median(data['kill_to_terminal_s']):.1f}s); "
          f"Celery's default: {VISIBILITY_TIMEOUT:.0f}s")
    print(f"Redis restart: next job completed {after:.1f}s after Redis answered")
    write("recovery", data, [
        figure("SIGKILL of a busy pool → its job running again (same name)", back, "s",
               reference=VISIBILITY_TIMEOUT, against="Celery on Redis: visibility_timeout"),
        figure("Redis restart → next job completed", after, "s"),
    ])


if __name__ == "__main__":
    main()
