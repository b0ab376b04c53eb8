"""A capacity model: how many GPUs a load needs, and what sharing one card per family mix costs.

A discrete-event simulation of a fleet of N GPUs fed by the three Celery queues.
Service times per job type are real-GPU anchors (stated below), plus the time
outside the model that ``bench/sdxl_job.py`` and ``bench/wan_job.py`` measure
(read from ``bench/out/`` when present). Two deployment shapes:

* ``shared``: every card runs all three pools under the memory ledger; a job
  whose model is not resident pays a switch (unload the least-needed model,
  load its own) when the card cannot hold all three (``--card-gb``).
* ``dedicated``: cards are split between the families in proportion to their
  offered work (at least one each); no switches, but no pooling either.

A card runs one job per pool at a time, its pools sharing the card's compute
equally while more than one runs (processor sharing: work is conserved, and a
short SDXL job is slowed, not blocked, by a long WAN job beside it). Chats are batched by the engine: a chat costs ``1/CHAT_BATCH_GAIN`` of
its one-at-a-time time. Prints p50/p95 queue wait, utilisation and switches
per hour for each N, and the smallest N that keeps p95 wait under the target.

    python bench/capacity.py --jobs-per-hour 600 --card-gb 48
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from figures import figure

OUT = Path(__file__).resolve().parent / "out"

#: seconds on the card, from published anchors: SDXL 1024² 3.31 s / 30 steps (A100, bf16+SDPA);
#: Wan2.1 1.3B 81 frames 480p 261 s / 50 steps (RTX 4090); Qwen2.5-7B ~40 tok/s (A100, transformers)
SDXL_STEP = 3.31 / 30
WAN_FRAME_STEP = 261 / 81 / 50
TOKENS_PER_S = 40.0
CHAT_BATCH_GAIN = 3.0  # bench/chat_concurrency.py measured 2.7-3.9x at 8 concurrent (tiny models, CPU)

#: (family, share of arrivals, model seconds)
MIX: dict[str, tuple[str, float, float]] = {
    "sdxl_fast_b1": ("sdxl", 0.40, SDXL_STEP * 15),
    "sdxl_fast_b3": ("sdxl", 0.12, SDXL_STEP * 15 * 3),
    "sdxl_fast_b6": ("sdxl", 0.08, SDXL_STEP * 15 * 6),
    "sdxl_high_b1": ("sdxl", 0.10, SDXL_STEP * 25),
    "enhance": ("chat", 0.10, 64 / TOKENS_PER_S / CHAT_BATCH_GAIN),
    "chat": ("chat", 0.10, 256 / TOKENS_PER_S / CHAT_BATCH_GAIN),
    "wan_image": ("wan", 0.05, WAN_FRAME_STEP * 1 * 25 + 2.0),
    "wan_video_fast": ("wan", 0.04, WAN_FRAME_STEP * 81 * 25),
    "wan_video_high": ("wan", 0.01, WAN_FRAME_STEP * 81 * 50),
}
#: GB a family needs resident with its working memory (fp16/bf16 weights from the committed configs'
#: parameter counts; working memory at the largest product shape), and seconds to load it from local disk
RESIDENT_GB = {"sdxl": 6.9 + 6.0, "chat": 15.2 + 3.0, "wan": 4.3 + 11.4 + 0.5 + 14.0}
LOAD_S = {"sdxl": 4.0, "chat": 8.0, "wan": 9.0}
CONTEXT_GB = 0.6  # CUDA context per pool process


def outside_model_s() -> dict[str, float]:
    """Time outside the model per family, measured by the other benches (defaults when absent)."""
    out = {"sdxl": 0.15, "chat": 0.01, "wan": 1.0}
    for family, name, key in (("sdxl", "sdxl_job", "1"), ("wan", "wan_job", "81")):
        path = OUT / f"{name}.json"
        try:
            pools = json.loads(path.read_text())["pools"][key]
            out[family] = pools["wall"]["median"] - pools["model"]["median"] if "wall" in pools \
                else pools["outside_model_s"]["median"]
        except (OSError, KeyError, ValueError, TypeError):
            pass
    return out


@dataclass(order=True)
class Job:
    arrival: float
    kind: str
    family: str
    service: float


def arrivals(rate_per_hour: float, hours: float, seed: int, extra: dict[str, float]) -> list[Job]:
    rng = random.Random(seed)
    kinds = list(MIX)
    weights = [MIX[k][1] for k in kinds]
    jobs, t = [], 0.0
    while True:
        t += rng.expovariate(rate_per_hour / 3600)
        if t > hours * 3600:
            return jobs
        kind = rng.choices(kinds, weights)[0]
        family, _, model_s = MIX[kind]
        jobs.append(Job(t, kind, family, model_s + extra[family]))
        if kind == "enhance":  # the chain's generation follows on SDXL
            jobs.append(Job(t + model_s + extra["chat"], "sdxl_fast_b1", "sdxl", MIX["sdxl_fast_b1"][2] + extra["sdxl"]))


class Card:
    """One GPU: at most one running job per family (its pool), sharing the card's compute equally."""

    def __init__(self, families: tuple[str, ...], card_gb: float) -> None:
        self.families, self.card_gb = families, card_gb
        self.resident: list[str] = []  # least recently used first
        self.active: dict[str, list] = {}  # family -> [job, remaining seconds of work]
        self.busy, self.switches = 0.0, 0

    def switch_cost(self, family: str) -> float:
        if family in self.resident:
            self.resident.remove(family)
            self.resident.append(family)
            return 0.0
        while sum(RESIDENT_GB[f] + CONTEXT_GB for f in [*self.resident, family]) > self.card_gb:
            gone = next(f for f in self.resident if f not in self.active)  # can_start() made sure there is one
            self.resident.remove(gone)  # the least recently used idle model (the ledger asks the least needed)
            self.switches += 1
        self.resident.append(family)
        return LOAD_S[family]

    def can_start(self, family: str) -> bool:
        """Its pool is free and what the running jobs hold leaves room for its model (the ledger's rule)."""
        if family not in self.families or family in self.active:
            return False
        held = sum(RESIDENT_GB[f] + CONTEXT_GB for f in self.active)
        return family in self.resident or held + RESIDENT_GB[family] + CONTEXT_GB <= self.card_gb

    def next_done(self, now: float) -> float:
        if not self.active:
            return float("inf")
        return now + min(rest for _, rest in self.active.values()) * len(self.active)

    def advance(self, dt: float) -> list[str]:
        if not self.active or dt <= 0:
            return []
        share = dt / len(self.active)
        self.busy += dt
        for entry in self.active.values():
            entry[1] -= share
        return [f for f, (_, rest) in self.active.items() if rest <= 1e-9]


def simulate(jobs: list[Job], cards: list[Card]) -> dict[str, float]:
    """Each family queue is FIFO; a job starts on a card whose pool for it is free and whose memory fits it."""
    jobs = sorted(jobs)
    waiting: dict[str, list[Job]] = {"sdxl": [], "chat": [], "wan": []}
    waits: dict[str, list[float]] = {f: [] for f in waiting}
    i, now = 0, 0.0
    while i < len(jobs) or any(waiting.values()) or any(c.active for c in cards):
        next_arrival = jobs[i].arrival if i < len(jobs) else float("inf")
        next_done = min(c.next_done(now) for c in cards)
        later = min(next_arrival, next_done)
        for card in cards:
            for family in card.advance(later - now):
                del card.active[family]
        now = later
        while i < len(jobs) and jobs[i].arrival <= now:
            waiting[jobs[i].family].append(jobs[i])
            i += 1
        for family, queue in waiting.items():
            while queue:
                free = [c for c in cards if c.can_start(family)]
                if not free:
                    break
                # a card where the model is resident first (no switch), then the least busy
                card = min(free, key=lambda c, f=family: (f not in c.resident, len(c.active)))
                job = queue.pop(0)
                waits[family].append(now - job.arrival)
                card.active[family] = [job, card.switch_cost(family) + job.service]
    span = max(now, 1.0)
    every = sorted(w for ws in waits.values() for w in ws)
    sdxl = sorted(waits["sdxl"])
    return {"p50_wait_s": statistics.median(every), "p95_wait_s": every[int(0.95 * (len(every) - 1))],
            "sdxl_p95_wait_s": sdxl[int(0.95 * (len(sdxl) - 1))],
            "utilisation": sum(c.busy for c in cards) / (span * len(cards)),
            "switches_per_hour": sum(c.switches for c in cards) / (span / 3600), "jobs": len(every)}


def fleet(shape: str, n: int, card_gb: float, jobs: list[Job]) -> list[Card]:
    if shape == "shared":
        return [Card(("sdxl", "chat", "wan"), card_gb) for _ in range(n)]
    work = {f: sum(j.service for j in jobs if j.family == f) for f in ("sdxl", "chat", "wan")}
    split = {f: 1 for f in work}
    for _ in range(n - 3):  # give each further card to the family with the most work per card
        f = max(work, key=lambda f: work[f] / split[f])
        split[f] += 1
    return [Card((f,), card_gb) for f, k in split.items() for _ in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs-per-hour", type=float, default=600)
    parser.add_argument("--hours", type=float, default=8)
    parser.add_argument("--card-gb", type=float, nargs="+", default=[48, 80])
    parser.add_argument("--max-gpus", type=int, default=10)
    parser.add_argument("--p95-target", type=float, default=30.0, help="seconds of queue wait")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    extra = outside_model_s()
    jobs = arrivals(args.jobs_per_hour, args.hours, args.seed, extra)
    offered = sum(j.service for j in jobs) / (args.hours * 3600)
    print(f"{args.jobs_per_hour:g} jobs/h for {args.hours:g} h: {len(jobs)} jobs, offered load {offered:.2f} GPUs "
          f"(outside the model: {', '.join(f'{k} {v:.2f}s' for k, v in extra.items())})")
    results: dict[str, dict] = {}
    print("| card | shape | GPUs | p50 wait | p95 wait | SDXL p95 wait | utilisation | switches/h |\n"
          "|---|---|---|---|---|---|---|---|")
    for card_gb in args.card_gb:
        for shape in ("shared", "dedicated"):
            for n in range(1 if shape == "shared" else 3, args.max_gpus + 1):
                r = simulate(jobs, fleet(shape, n, card_gb, jobs))
                results[f"{card_gb:g}GB/{shape}/{n}"] = r
                print(f"| {card_gb:g} GB | {shape} | {n} | {r['p50_wait_s']:.1f}s | {r['p95_wait_s']:.1f}s | "
                      f"{r['sdxl_p95_wait_s']:.1f}s | {r['utilisation']:.0%} | {r['switches_per_hour']:.0f} |")
    needed = {}
    for card_gb in args.card_gb:
        for shape in ("shared", "dedicated"):
            ok = [int(k.rsplit("/", 1)[1]) for k, r in results.items()
                  if k.startswith(f"{card_gb:g}GB/{shape}/") and r["p95_wait_s"] <= args.p95_target]
            needed[f"{card_gb:g}GB/{shape}"] = min(ok) if ok else None
            print(f"{card_gb:g} GB cards, {shape}: {min(ok) if ok else f'> {args.max_gpus}'} GPUs keep p95 wait "
                  f"≤ {args.p95_target:g}s")
    figures = [
        figure(f"GPUs for {args.jobs_per_hour:g} jobs/h at p95 wait ≤ {args.p95_target:g}s, shared {card_gb:g} GB cards",
               needed[f"{card_gb:g}GB/shared"] or float("inf"), "GPUs", reference=needed[f"{card_gb:g}GB/dedicated"],
               against="cards dedicated per family", max_ratio=1.0)
        for card_gb in args.card_gb if needed[f"{card_gb:g}GB/dedicated"]
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "capacity.json").write_text(json.dumps({"args": vars(args), "offered_gpus": offered, "results": results,
                                                   "gpus_needed": needed, "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
