"""Pickup latency against the old design: a loop that pops a raw JSON job and sleeps when the list is empty.

The Flask workers this project replaces polled a Redis list and slept their
interval when it was empty (2 s SDXL, 5 s WAN; ../shared/seeds). 50 jobs arrive
at random moments (gaps uniform in 0.1-2 s); each goes at the same moment to
the old SDXL loop, the old WAN loop and our SDXL pool. Measured: publish →
the job starting (the old loop's pop; our pool's signed ``processing``
callback at the sink, which also includes a callback's HTTP round trip).
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid

from figures import figure
from harness import Cluster, summary, write

from tests.wire import publish

JOBS, INTERVALS = 50, {"sdxl": 2.0, "wan": 5.0}


def old_loop(cluster: Cluster, name: str, interval: float, started: dict[str, float], stop: threading.Event) -> None:
    """The old worker's main loop, minus the work: pop, or sleep ``interval`` when empty."""
    client = cluster.store
    while not stop.is_set():
        raw = client.rpop(f"bench:old:{name}")
        if raw is None:
            stop.wait(interval)
            continue
        started[json.loads(raw)["id"]] = time.time()


def main() -> None:
    rng = random.Random(20)
    with Cluster("sdxl") as cluster:
        starts: dict[str, dict[str, float]] = {name: {} for name in INTERVALS}
        stop = threading.Event()
        loops = [threading.Thread(target=old_loop, args=(cluster, n, i, starts[n], stop), daemon=True)
                 for n, i in INTERVALS.items()]
        for t in loops:
            t.start()
        published: dict[str, float] = {}
        for _ in range(JOBS):
            time.sleep(rng.uniform(0.1, 2.0))
            job = {"id": uuid.uuid4().hex, "type": "sdxl_image_fast", "user_id": "bench", "prompt": "a harbour",
                   "config": {"resolution": "256x256", "num_inference_steps": 2, "seed": 1}}
            published[job["id"]] = time.time()
            for name in INTERVALS:
                cluster.store.lpush(f"bench:old:{name}", json.dumps(job))
            publish(cluster.store, "ourvidz.sdxl.generate", job, "sdxl")
        time.sleep(6)
        stop.set()
        ours = []
        for job_id, at in published.items():
            firsts = [c["at"] for c in cluster.sink.callbacks(job_id) if c["body"]["status"] == "processing"]
            ours.append(min(firsts) - at)
        old = {n: [starts[n][j] - at for j, at in published.items() if j in starts[n]] for n in INTERVALS}
    rows = {"ours_ms": summary([x * 1000 for x in ours]),
            **{f"old_{n}_ms": summary([x * 1000 for x in v]) for n, v in old.items()}}
    for name, row in rows.items():
        print(f"{name}: median {row['median']:.1f}  max {row['max']:.1f}  (n={row['n']})")
    write("old_design", rows, [
        figure(f"publish → job start, vs the old {n} loop ({INTERVALS[n]:g} s sleep), median",
               rows["ours_ms"]["median"], "ms", reference=rows[f"old_{n}_ms"]["median"], against=f"old {n} loop",
               max_ratio=1.0)
        for n in INTERVALS
    ])


if __name__ == "__main__":
    main()
