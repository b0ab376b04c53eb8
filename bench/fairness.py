"""The fair order against first in, first out: a flood of 4 users, 200 mixed jobs (issue 26).

Three parts, all on the real broker scripts (``services.fairness``) in a private Redis database:

1. **The flood.** 4 users publish 50 jobs each at once, one user after the other (the worst case for
   first in, first out): small images, batches of 6, videos, and a mix. One GPU serves them; its clock
   advances by each job's true GPU-seconds (no sleeping: the order is what is measured, and it comes
   from the very scripts the pools run). The intake costs each job with a noisy estimate (true x a
   log-normal factor, sigma 0.25), as measured durations are. Then a fifth user publishes one job
   behind the flood. Reported for the fair order and for first in, first out: p95 wait per user,
   Jain's index over the GPU-seconds each user got while all four were waiting, the late job's wait.
2. **Dispatch overhead** per job: the fair path's commands (the intake's move and admit, one message at
   a time as on an idle cluster, and the pick) against the plain fetch they replace (one sweep).
3. **Where a job stands** at 1,000 and 100,000 waiting jobs: the same query time.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Any

import redis
from figures import figure
from harness import BROKER, ROOT, summary, write

from ourvidz_tasks.contract import keys
from ourvidz_tasks.services import fairness, fetching
from ourvidz_tasks.services.fairness import Intake
from tests import wire

TASK = "ourvidz.sdxl.generate"
#: true GPU-seconds of each kind of job on a real card (SDXL 1024² x1 / x6, a WAN 480x832 clip)
KINDS = {"image": 4.0, "batch": 20.0, "video": 120.0}
USERS = {"images": ["image"], "batches": ["batch"], "videos": ["video"], "mixed": ["image", "batch", "video"]}
PER_USER = 50
SEED = 26


def jobs_for(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for user, kinds in USERS.items():
        for _ in range(PER_USER):
            kind = rng.choice(kinds)
            out.append({"id": f"{user}-{len(out)}", "type": "sdxl_image_fast", "user_id": user, "prompt": "p",
                        "bench": {"true": KINDS[kind], "estimate": KINDS[kind] * math.exp(rng.gauss(0, 0.25))}})
    return out


def serve_fair(client: redis.Redis, queue: str, jobs: list[dict[str, Any]], late: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """One GPU serving in fair order; the late job arrives when the flood is in. (start, job) each."""
    intake = Intake(client, "bench/1", [queue], estimate=lambda q, j: float(j["bench"]["estimate"]),
                    weigh=lambda user: 1.0, ttl=3600, batch=500)
    for job in jobs:
        wire.publish(client, TASK, job, queue)
    while intake.run_once():
        pass
    wire.publish(client, TASK, late, queue)
    intake.run_once()
    clock, served = 0.0, []
    command = fairness.pick_command("bench/1", [queue], present=15, keep=7200)
    while (reply := client.execute_command(*command)) is not None:
        client.lrem(keys.fetching("bench/1", queue), 1, reply[1])
        _, job = fairness.describe(reply[1])
        assert job is not None
        served.append((clock, job))
        clock += job["bench"]["true"]
        fairness.finished(client, queue, job["id"], job["bench"]["true"])
    return served


def serve_fifo(jobs: list[dict[str, Any]], late: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    clock, served = 0.0, []
    for job in [*jobs, late]:
        served.append((clock, job))
        clock += job["bench"]["true"]
    return served


def measures(served: list[tuple[float, dict[str, Any]]], late_id: str) -> dict[str, Any]:
    waits: dict[str, list[float]] = {}
    for start, job in served:
        waits.setdefault(job["user_id"], []).append(start)
    # the window in which every flooding user still had a job waiting: until the first one's last start
    window = min(max(w) for user, w in waits.items() if user in USERS)
    got = dict.fromkeys(USERS, 0.0)
    for start, job in served:
        if job["user_id"] in got and start < window:
            got[job["user_id"]] += min(job["bench"]["true"], window - start)
    jain = sum(got.values()) ** 2 / (len(got) * sum(v * v for v in got.values()))
    p95 = {user: sorted(w)[max(0, math.ceil(0.95 * len(w)) - 1)] for user, w in waits.items() if user in USERS}
    late = next(start for start, job in served if job["id"] == late_id)
    return {"jain": jain, "window_s": window, "gpu_seconds": got, "p95_wait_s": p95, "late_wait_s": late}


def flood(client: redis.Redis) -> dict[str, Any]:
    rng = random.Random(SEED)
    jobs = jobs_for(rng)
    late = {"id": "late-1", "type": "sdxl_image_fast", "user_id": "late", "prompt": "p",
            "bench": {"true": KINDS["image"], "estimate": KINDS["image"]}}
    fair = measures(serve_fair(client, "benchflood", jobs, late), late["id"])
    fifo = measures(serve_fifo(jobs, late), late["id"])
    return {"fair": fair, "fifo": fifo}


def per_job_us(client: redis.Redis, fair: bool, n: int = 400) -> float:
    """Median microseconds of the fetch-side commands per job (the publish itself left out)."""
    queue = f"benchdispatch{int(fair)}"
    intake = Intake(client, "bench/2", [queue], estimate=lambda q, j: 4.0, weigh=lambda user: 1.0, ttl=3600)
    intake.run_once()  # registers its lists (what a pool does once, at start)
    pick = fairness.pick_command("bench/2", [queue], present=15, keep=7200)
    sweep = fetching.sweep_command("bench/2", fairness.sources(queue))
    times = []
    for i in range(n):
        wire.publish(client, TASK, {"id": f"d{i}", "type": "sdxl_image_fast", "user_id": f"u{i % 4}",
                                    "prompt": "p"}, queue)
        started = time.perf_counter()
        if fair:
            intake.run_once()
            reply = client.execute_command(*pick)
        else:
            reply = client.execute_command(*sweep)
        times.append(time.perf_counter() - started)
        client.lrem(keys.fetching("bench/2", queue), 1, reply[1])
    return statistics.median(times) * 1e6


def query_ms(client: redis.Redis, waiting: int, samples: int = 300) -> dict[str, float]:
    queue = f"benchquery{waiting}"
    intake = Intake(client, "bench/3", [queue], estimate=lambda q, j: 4.0, weigh=lambda user: 1.0, ttl=3600,
                    batch=2000)
    ids = [f"q{waiting}-{i}" for i in range(waiting)]
    for start in range(0, waiting, 5000):
        with client.pipeline(transaction=False) as pipe:
            for job_id in ids[start:start + 5000]:
                wire.publish(pipe, TASK, {"id": job_id, "type": "sdxl_image_fast", "user_id": f"u{hash(job_id) % 4}",
                                          "prompt": "p"}, queue)
            pipe.execute()
    while intake.run_once():
        pass
    rng = random.Random(SEED)
    times = []
    for job_id in rng.sample(ids, samples):
        started = time.perf_counter()
        where = fairness.standing(client, job_id, present=15)
        times.append((time.perf_counter() - started) * 1e3)
        assert where["state"] == "queued"
    for key in client.scan_iter(f"*{queue}*"):
        client.delete(key)
    return summary(times)


def plot(result: dict[str, Any]) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, mode in zip(axes, ("fifo", "fair"), strict=True):
        got = result["flood"][mode]["gpu_seconds"]
        ax.bar(list(got), list(got.values()), color="tab:green" if mode == "fair" else "tab:gray")
        ax.set_title(f"{'fair order' if mode == 'fair' else 'first in, first out'}: "
                     f"Jain {result['flood'][mode]['jain']:.3f}")
        ax.set_xlabel(f"user (GPU-seconds in the first {result['flood'][mode]['window_s']:.0f} s)")
    axes[0].set_ylabel("GPU-seconds served")
    fig.tight_layout()
    path = ROOT / "bench" / "results" / "fairness.png"
    fig.savefig(path, dpi=100)
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    client = redis.Redis.from_url(BROKER)
    result: dict[str, Any] = {"flood": flood(client)}
    result["dispatch_us"] = {"plain": per_job_us(client, False), "fair": per_job_us(client, True)}
    result["query_ms"] = {"1000": query_ms(client, 1_000), "100000": query_ms(client, 100_000)}
    fair, fifo = result["flood"]["fair"], result["flood"]["fifo"]
    worst = max(fair["p95_wait_s"].values()), max(fifo["p95_wait_s"].values())
    overhead_ms = (result["dispatch_us"]["fair"] - result["dispatch_us"]["plain"]) / 1000
    q1k, q100k = result["query_ms"]["1000"]["median"], result["query_ms"]["100000"]["median"]
    print(f"Jain's index: fair {fair['jain']:.3f}, FIFO {fifo['jain']:.3f}; late job waits {fair['late_wait_s']:.0f} s "
          f"(FIFO {fifo['late_wait_s']:.0f} s); p95 wait of the worst-off user {worst[0]:.0f} s (FIFO {worst[1]:.0f} s)")
    print(f"dispatch per job: plain {result['dispatch_us']['plain']:.0f} us, fair {result['dispatch_us']['fair']:.0f} us; "
          f"where a job stands: {q1k:.3f} ms at 1,000 waiting, {q100k:.3f} ms at 100,000")
    figures = [
        figure("unfairness (1 - Jain's index over GPU-seconds), 4 users", 1 - fair["jain"], "",
               reference=1 - fifo["jain"], against="first in, first out", max_value=0.05),
        figure("one job behind a 200-job flood: wait", fair["late_wait_s"], "s", reference=fifo["late_wait_s"],
               against="first in, first out", note="the GPU's clock: true job costs, no sleeping"),
        figure("p95 wait of the worst-off user", worst[0], "s", reference=worst[1], against="first in, first out"),
        figure("fair order: dispatch overhead per job", overhead_ms, "ms", max_value=1.0,
               note="the intake's move and admit plus the pick, against the plain fetch's sweep"),
        figure("where a job stands, 100,000 waiting", q100k, "ms", reference=q1k, against="1,000 waiting",
               max_ratio=1.5),
    ]
    write("fairness", result, figures)
    plot(result)


if __name__ == "__main__":
    main()
