"""Switching one device from chat to WAN and back, through the memory ledger (tiny models, CPU).

Two pools share a budget that holds one of the two models, never both. Each
pool runs in its own thread the way a worker does between jobs: it looks at
the ledger every ``tick`` seconds while idle and unloads what it is asked to.
A switch is then: the incoming pool reserves (and waits), the holder sees the
request at its next tick, unloads and releases, the reservation is granted,
the incoming pool loads. It is compared with the bare unload + load in one
thread (no ledger, no waiting): the ratio is what coordination costs.

``tick`` is run twice: the worker's idle timer (``control.SERVE_INTERVAL``)
and a short one that shows the ledger's own cost. Also: one uncontended
reserve + release round trip. Writes ``bench/out/memory_switch.json``.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
import torch
import transformers
from figures import figure
from harness import BROKER, ROOT, summary, write

from ourvidz_tasks.contract.settings import load_settings
from ourvidz_tasks.models.qwen import load_qwen
from ourvidz_tasks.models.wan import load_wan
from ourvidz_tasks.runtime.control import SERVE_INTERVAL
from ourvidz_tasks.runtime.leases import Reservation
from ourvidz_tasks.runtime.ledger import Ledger
from ourvidz_tasks.runtime.memprobe import mb_of

ROUNDS = 5
DEVICE = torch.device("cpu")


class Pool:
    """One pool's model slot as the worker keeps it: reserve, load, unload, release."""

    def __init__(self, name: str, model: str, loader: Callable[[], Any], ledger: Ledger, default_mb: int) -> None:
        self.name, self.model_name, self.loader, self.ledger, self.default_mb = name, model, loader, ledger, default_mb
        self.model: Any = None
        self.reservation: Reservation | None = None
        self.lock = threading.Lock()
        self.unload_s: list[float] = []

    def get(self) -> dict[str, float]:
        started = time.perf_counter()
        mb = self.ledger.estimate(self.model_name, self.default_mb)
        reservation = self.ledger.reserve(self.name, self.model_name, mb, timeout=60)
        granted = time.perf_counter()
        with self.lock:
            self.model = self.loader()
            self.reservation = reservation
        self.ledger.record_weights(self.model_name, mb_of(self.model.nbytes()))
        return {"wait_s": granted - started, "load_s": time.perf_counter() - granted}

    def unload(self) -> None:
        with self.lock:
            if self.model is not None:
                started = time.perf_counter()
                self.model.unload()
                self.model = None
                self.unload_s.append(time.perf_counter() - started)
            if self.reservation is not None:
                self.reservation.release()
                self.reservation = None

    def serve(self, tick: float, stop: threading.Event) -> None:
        """The idle timer: carry out unload requests between jobs."""
        while not stop.wait(tick):
            if not self.ledger.has_requests(self.name):
                continue
            for req in self.ledger.pending_requests(self.name):
                if req.action == "unload":
                    self.unload()
                self.ledger.done(req)


def switch(ledger: Ledger, incoming: Pool) -> dict[str, float]:
    """``incoming`` needs its model now (a job arrived): time until it is loaded."""
    ledger.set_busy(incoming.name, True)
    started = time.perf_counter()
    parts = incoming.get()
    total = time.perf_counter() - started
    ledger.set_busy(incoming.name, False)
    return {"total_s": total, **parts}


def bare(outgoing: Pool, incoming: Pool) -> float:
    started = time.perf_counter()
    outgoing.model.unload()
    outgoing.model = None
    incoming.model = incoming.loader()
    return time.perf_counter() - started


def run(tick: float, settings: Any, store: redis.Redis, sizes: dict[str, int]) -> dict[str, Any]:
    ledger = Ledger(store, f"bench-{uuid.uuid4().hex[:8]}", "cpu", sizes["qwen_instruct"] + sizes["wan"] - 1,
                    queue_depth=lambda pool: 0)
    chat = Pool("chat", "qwen_instruct", lambda: load_qwen(settings, "qwen_instruct", DEVICE), ledger,
                sizes["qwen_instruct"])
    wan = Pool("wan", "wan", lambda: load_wan(settings, DEVICE), ledger, sizes["wan"])
    stop = threading.Event()
    servers = [threading.Thread(target=p.serve, args=(tick, stop), daemon=True) for p in (chat, wan)]
    try:
        chat.get()
        ledger.set_busy("chat", False)
        for server in servers:
            server.start()
        to_wan, to_chat = [], []
        for _ in range(ROUNDS):
            to_wan.append(switch(ledger, wan))
            to_chat.append(switch(ledger, chat))
        counters = ledger.counters()
        for parts, holder in ((to_wan, chat), (to_chat, wan)):  # the holder's unload is inside the wait
            for part, unload_s in zip(parts, holder.unload_s[-ROUNDS:], strict=True):
                part["holder_unload_s"] = unload_s
                part["coordination_s"] = part["wait_s"] - unload_s
    finally:
        stop.set()
        for server in servers:
            server.join(5)
        chat.unload()
        wan.unload()
        ledger.clear()
    return {
        "tick_s": tick, "budget_mb": ledger.budget_mb,
        "chat_to_wan": {k: summary([r[k] for r in to_wan]) for k in to_wan[0]},
        "wan_to_chat": {k: summary([r[k] for r in to_chat]) for k in to_chat[0]},
        "switches": counters.get("switches", 0), "waits": counters.get("waits", 0),
    }


def bare_switches(settings: Any) -> dict[str, Any]:
    chat = Pool("chat", "qwen_instruct", lambda: load_qwen(settings, "qwen_instruct", DEVICE), None, 0)  # type: ignore[arg-type]
    wan = Pool("wan", "wan", lambda: load_wan(settings, DEVICE), None, 0)  # type: ignore[arg-type]
    chat.model = chat.loader()
    to_wan, to_chat = [], []
    for _ in range(ROUNDS):
        to_wan.append(bare(chat, wan))
        to_chat.append(bare(wan, chat))
    chat.model.unload()
    return {"chat_to_wan": summary(to_wan), "wan_to_chat": summary(to_chat)}


def round_trip(store: redis.Redis, n: int = 200) -> dict[str, float]:
    ledger = Ledger(store, f"bench-{uuid.uuid4().hex[:8]}", "cpu", 100, queue_depth=lambda pool: 0)
    times = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            ledger.reserve("chat", "qwen_instruct", 10, timeout=1).release()
            times.append(time.perf_counter() - started)
    finally:
        ledger.clear()
    return {"median_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000, "n": n}


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    settings = load_settings(model_source="tiny", tiny_cache=ROOT / ".cache" / "tiny", device="cpu")
    store = redis.Redis.from_url(BROKER)
    sizes = {}
    for name, loader in (("qwen_instruct", lambda: load_qwen(settings, "qwen_instruct", DEVICE)),
                         ("wan", lambda: load_wan(settings, DEVICE))):
        model = loader()  # also builds the tiny model once and warms the file cache
        sizes[name] = max(1, mb_of(model.nbytes()))
        model.unload()
    baseline = bare_switches(settings)
    ledgered = {f"tick_{tick:g}s": run(tick, settings, store, sizes) for tick in (SERVE_INTERVAL, 0.02)}
    ratios = {
        name: {d: r[d]["total_s"]["median"] / baseline[d]["median"] for d in ("chat_to_wan", "wan_to_chat")}
        for name, r in ledgered.items()
    }
    data = {"device": "cpu", "weights_mb": sizes, "rounds": ROUNDS, "bare_unload_load_s": baseline,
            "through_ledger": ledgered, "ratio_ledger_to_bare": ratios, "reserve_release_round_trip": round_trip(store)}
    print(f"weights: {sizes} MB; bare unload+load median: chat->wan {baseline['chat_to_wan']['median']:.3f}s, "
          f"wan->chat {baseline['wan_to_chat']['median']:.3f}s")
    for name, r in ledgered.items():
        for d in ("chat_to_wan", "wan_to_chat"):
            m = {k: v["median"] for k, v in r[d].items()}
            print(f"{name:>12} {d}: {m['total_s']:.3f}s = {ratios[name][d]:.2f}x bare (holder unload "
                  f"{m['holder_unload_s']:.3f}s + coordination {m['coordination_s']:.3f}s + load {m['load_s']:.3f}s)")
    print(f"reserve+release round trip: {data['reserve_release_round_trip']['median_ms']:.2f} ms median")
    fast = ledgered["tick_0.02s"]
    write("memory_switch", data, [
        *[figure(f"model switch {d.replace('_to_', ' → ')} through the ledger (20 ms tick)",
                 fast[d]["total_s"]["median"], "s", reference=baseline[d]["median"], against="bare unload + load")
          for d in ("chat_to_wan", "wan_to_chat")],
        figure("ledger reserve + release, uncontended", data["reserve_release_round_trip"]["median_ms"], "ms"),
    ])


if __name__ == "__main__":
    main()
