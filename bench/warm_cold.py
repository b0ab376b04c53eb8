"""Warm and cold: time from ``bin/worker`` to ready, the first job against steady state, loads per job.

Each pool is started fresh (its tiny model already built on disk, as a real
host has its weights on disk), then runs one job and five more like it.
Targets: first job ≤ 1.2x steady state; 0 model loads per job.
"""

from __future__ import annotations

import statistics
import time
import uuid

from figures import figure
from harness import Cluster, WorkerProcess, worker_env, write

JOBS = {
    "sdxl": ("ourvidz.sdxl.generate", lambda: {
        "id": uuid.uuid4().hex, "type": "sdxl_image_fast", "user_id": "bench", "prompt": "a lighthouse",
        "config": {"resolution": "1024x1024", "num_inference_steps": 15, "seed": 1}}),
    "wan": ("ourvidz.wan.generate", lambda: {
        "id": uuid.uuid4().hex, "type": "video_fast", "user_id": "bench", "prompt": "waves",
        "config": {"width": 128, "height": 128, "frames": 33, "fps": 16, "num_inference_steps": 4, "seed": 3}}),
}


def main() -> None:
    figures, data = [], {}
    with Cluster() as cluster:
        for family, (task, make) in JOBS.items():
            env = worker_env(cluster.sink, family, OURVIDZ_TORCH_THREADS="2", OURVIDZ_PROGRESS_INTERVAL="1")
            worker = WorkerProcess(family, env, cluster.tmp / f"{family}-cold.log")
            started = time.perf_counter()
            worker.start()
            ready = time.perf_counter() - started
            cluster.workers[family] = worker
            first = cluster.run(task, family, make())[1]
            steady = [cluster.run(task, family, make())[1] for _ in range(5)]
            loads = sum(cluster.loads(family).values())
            data[family] = {"ready_s": ready, "first_job_s": first, "steady_s": steady, "loads": loads}
            print(f"{family}: bin/worker → ready {ready:.1f}s; first job {first:.2f}s, steady "
                  f"{statistics.median(steady):.2f}s; model loads in 6 jobs: {loads} (1 = the start)")
            figures += [
                figure(f"{family}: bin/worker to ready (tiny model)", ready, "s"),
                figure(f"{family}: first job after start", first, "s", reference=statistics.median(steady),
                       against="steady state", max_ratio=1.2),
                figure(f"{family}: model loads per job", (loads - 1) / 6, "loads", max_value=0),
            ]
    write("warm_cold", data, figures)


if __name__ == "__main__":
    main()
