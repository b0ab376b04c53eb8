"""The memory ledger against a real Redis: budget, FIFO, leases, evictions, sizes, TTLs.

No models: reservations are small fake MB numbers. Each test has its own
host name, so its keys are its own.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from importlib import resources
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from ourvidz_tasks.contract.errors import WorkerUnavailable
from ourvidz_tasks.runtime import lua
from ourvidz_tasks.runtime.estimates import shape_ratio
from ourvidz_tasks.runtime.leases import Heartbeat, Reservation
from ourvidz_tasks.runtime.ledger import Ledger, pressure_of
from ourvidz_tasks.runtime.memprobe import measure_peak

from .support.env import BROKER
from .support.process import wait_for

MakeLedger = Callable[..., Ledger]


@pytest.fixture
def make(store: redis.Redis) -> Iterator[MakeLedger]:
    host = f"test-{uuid.uuid4().hex[:8]}"
    made: list[Ledger] = []

    def make(budget: int = 100, **options: Any) -> Ledger:
        options.setdefault("queue_depth", lambda pool: 0)
        options.setdefault("poll", 0.02)
        ledger = Ledger(store, host, "cuda:0", budget, **options)
        made.append(ledger)
        return ledger

    yield make
    for ledger in made:
        ledger.clear()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    return wait_for(predicate, timeout, interval=0.01)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_reserve_release_and_status(make: MakeLedger) -> None:
    ledger = make(100)
    res = ledger.reserve("sdxl", "sdxl", 40, timeout=1)
    st = ledger.status()
    assert (st["reserved_mb"], st["free_mb"], st["budget_mb"]) == (40, 60, 100)
    assert st["pools"]["sdxl"]["loaded"] and st["pools"]["sdxl"]["models"] == {"sdxl": 40}
    assert not st["pools"]["wan"]["loaded"]
    assert res.release() == 40
    assert res.release() == 0  # idempotent
    assert ledger.status()["reserved_mb"] == 0
    assert ledger.counters()["grants"] == 1 and ledger.counters()["releases"] == 1


@pytest.mark.stress
def test_timeout_is_worker_unavailable(make: MakeLedger) -> None:
    ledger = make(100)
    ledger.reserve("sdxl", "sdxl", 80, timeout=1)
    started, timeout = time.monotonic(), 0.3
    with pytest.raises(WorkerUnavailable) as info:
        ledger.reserve("wan", "wan", 30, timeout=timeout)
    assert timeout <= time.monotonic() - started < timeout + 2  # given up at its timeout, not later
    assert info.value.retryable and info.value.code == "WORKER_UNAVAILABLE"
    assert "30 MB for wan" in str(info.value)
    st = ledger.status()
    assert st["pending_waiters"] == 0  # the ticket was withdrawn
    assert st["counters"]["waits"] == 1 and st["counters"]["timeouts"] == 1


def test_timeout_zero_tries_once_without_queueing(make: MakeLedger) -> None:
    ledger = make(100)
    ledger.reserve("sdxl", "sdxl", 80, timeout=1)
    with pytest.raises(WorkerUnavailable):
        ledger.reserve("wan", "wan", 30, timeout=0)
    assert ledger.counters().get("waits", 0) == 0
    assert ledger.reserve("chat", "qwen_instruct", 20, timeout=0).mb == 20


def test_fifo_small_request_does_not_overtake(make: MakeLedger) -> None:
    ledger = make(100)
    holder = ledger.reserve("sdxl", "sdxl", 60, timeout=1)
    big, big_out = in_thread(lambda: ledger.reserve("wan", "wan", 50, timeout=10))
    wait_until(lambda: ledger.status()["pending_waiters"] == 1)
    polls: list[int] = []
    small, small_out = in_thread(lambda: ledger.reserve("chat", "qwen_instruct", 30, timeout=10,
                                                        on_wait=lambda w: polls.append(w.position)))
    wait_until(lambda: ledger.status()["pending_waiters"] == 2)
    wait_until(lambda: len(polls) >= 5)  # 30 MB would fit now, but it polled 5 times behind the 50 MB waiter
    assert "value" not in small_out
    assert [w["pool"] for w in ledger.status()["waiters"]] == ["wan", "chat"]
    holder.release()
    big.join(5)
    small.join(5)
    assert isinstance(big_out["value"], Reservation) and isinstance(small_out["value"], Reservation)
    assert ledger.status()["reserved_mb"] == 80


def test_fifo_step_by_step(make: MakeLedger) -> None:
    ledger = make(100)
    holder = ledger.reserve("sdxl", "sdxl", 60, timeout=1)
    status, big, _, pos = ledger._reserve_once("wan", "wan", 50, "", "token-a", enqueue=True)
    assert (status, pos) == ("wait", 0)
    status, small, free, pos = ledger._reserve_once("chat", "qwen_instruct", 30, "", "token-b", enqueue=True)
    assert (status, free, pos) == ("wait", 40, 1)  # it fits, but the queue is not empty
    holder.release()
    assert ledger._reserve_once("chat", "qwen_instruct", 30, small, "token-b", enqueue=True)[0] == "wait"
    assert ledger._reserve_once("wan", "wan", 50, big, "token-a", enqueue=True)[0] == "granted"
    assert ledger._reserve_once("chat", "qwen_instruct", 30, small, "token-b", enqueue=True)[0] == "granted"
    assert ledger.status()["pending_waiters"] == 0


def test_fifo_order_of_many_waiters(make: MakeLedger) -> None:
    ledger = make(10)
    holder = ledger.reserve("sdxl", "sdxl", 10, timeout=1)
    order: list[int] = []
    lock = threading.Lock()

    def waiter(i: int) -> None:
        res = ledger.reserve("chat", f"m{i}", 10, timeout=20)
        with lock:
            order.append(i)
        time.sleep(0.05)
        res.release()

    threads = []
    for i in range(5):
        thread, _ = in_thread(lambda i=i: waiter(i))
        threads.append(thread)
        wait_until(lambda i=i: ledger.status()["pending_waiters"] == i + 1)
    holder.release()
    for thread in threads:
        thread.join(20)
    assert order == [0, 1, 2, 3, 4]


@pytest.mark.stress
def test_expired_lease_is_reclaimed(make: MakeLedger) -> None:
    lease = 1.0
    ledger = make(100, lease_seconds=lease)
    ledger.reserve("wan", "wan", 80, timeout=1)  # a holder that dies: never refreshed
    res = ledger.reserve("sdxl", "sdxl", 50, timeout=30 * lease)  # waits in line for the lease to expire
    assert res.mb == 50
    st = ledger.status()
    assert st["pools"]["wan"]["loaded"] is False and st["counters"]["reclaimed"] == 1


@pytest.mark.stress
def test_refreshed_lease_survives_and_stalled_one_is_reinstated(make: MakeLedger) -> None:
    # the heartbeat refreshes every third of the lease: a stall of the process up to ~2/3 of
    # the lease (seconds here) leaves the reservation alive
    lease = 3.0
    ledger = make(100, lease_seconds=lease)
    live = ledger.reserve("sdxl", "sdxl", 60, timeout=1)
    beat = ledger.keepalive()
    beat.add(live)
    with pytest.raises(WorkerUnavailable):
        ledger.reserve("wan", "wan", 50, timeout=lease)  # longer than the lease: the refreshes kept it
    beat.stop()
    assert ledger.holders() == {"sdxl/sdxl": 60}
    wait_for(lambda: ledger.holders() == {}, 10 * lease, interval=lease / 3)  # reclaimed by that call
    assert live.refresh() is True  # the holder was alive after all: reinstated
    assert ledger.holders() == {"sdxl/sdxl": 60} and ledger.counters()["reinstated"] == 1


@pytest.mark.stress
def test_heartbeat_reports_a_slot_taken_by_another_holder(make: MakeLedger) -> None:
    lease = 0.2
    ledger = make(100, lease_seconds=lease)
    old = ledger.reserve("wan", "wan", 40, timeout=1)
    wait_for(lambda: ledger.holders() == {}, 50 * lease, interval=lease / 4)  # its lease lapsed: reclaimed
    new = ledger.reserve("wan", "wan", 40, timeout=1)  # a restarted worker, same pool and model
    lost: list[Reservation] = []
    beat = Heartbeat(10, on_lost=lost.append)
    beat.add(old)
    beat.add(new)
    beat.beat()
    assert lost == [old]
    new.release()
    beat.beat()
    assert beat._held == set()


@pytest.mark.stress  # waiters that give up after 0.5 s: their requests must be seen before
def test_eviction_goes_to_least_needed_idle_holder(make: MakeLedger) -> None:
    depths = {"sdxl": 0, "chat": 0, "wan": 0}
    ledger = make(100, queue_depth=depths.__getitem__)
    ledger.reserve("sdxl", "sdxl", 40, timeout=1)
    ledger.reserve("chat", "qwen_instruct", 40, timeout=1)
    for pool in ("sdxl", "chat"):
        ledger.set_busy(pool, False)
    waiter, out = in_thread(lambda: ledger.reserve("wan", "wan", 50, timeout=0.5))
    # both idle and unneeded: sdxl is the preferred resident, so chat is asked
    reqs = wait_until(lambda: ledger.requests())
    assert [(r.action, r.pool, r.model, r.reason, r.for_pool) for r in reqs] == [
        ("unload", "chat", "qwen_instruct", "evict", "wan")]
    assert ledger.pending_requests("chat") == reqs and ledger.pending_requests("sdxl") == []
    assert "unload_chat_for_wan" in ledger.report()["recommendations"]
    waiter.join(5)
    assert isinstance(out["error"], WorkerUnavailable)
    assert ledger.requests() == []  # the waiter gave up: its request is gone with it

    depths["chat"] = 3  # chat has queued work, sdxl none: sdxl is least needed now
    waiter, out = in_thread(lambda: ledger.reserve("wan", "wan", 50, timeout=0.5))
    reqs = wait_until(lambda: ledger.requests())
    assert [r.pool for r in reqs] == ["sdxl"]
    waiter.join(5)


@pytest.mark.stress  # a waiter of 0.4 s must poll at least once
def test_eviction_never_asks_a_busy_holder(make: MakeLedger) -> None:
    ledger = make(100)
    sdxl = ledger.reserve("sdxl", "sdxl", 40, timeout=1)
    ledger.reserve("chat", "qwen_instruct", 40, timeout=1)
    ledger.set_busy("sdxl", True)
    ledger.set_busy("chat", True)
    seen: list[int] = []
    with pytest.raises(WorkerUnavailable):
        ledger.reserve("wan", "wan", 50, timeout=0.4, on_wait=lambda w: seen.append(len(ledger.requests())))
    assert seen and set(seen) == {0}
    # a pool going idle is asked right away (the plan runs on every ledger call)
    waiter, out = in_thread(lambda: ledger.reserve("wan", "wan", 50, timeout=5))
    wait_until(lambda: ledger.status()["pending_waiters"] == 1)
    ledger.set_busy("sdxl", False)
    assert [r.pool for r in ledger.pending_requests("sdxl")] == ["sdxl"]
    assert ledger.pending_requests("chat") == []
    ledger.set_busy("chat", False)  # sdxl's request already covers the shortfall
    assert ledger.pending_requests("chat") == []
    sdxl.release()
    waiter.join(5)
    assert isinstance(out["value"], Reservation)
    assert ledger.counters()["switches"] == 1


@pytest.mark.stress  # patience 0.5 s against waiters of 0.5 and 1.5 s
def test_longest_idle_first_and_needed_holders_only_after_patience(make: MakeLedger) -> None:
    depths = {"sdxl": 0, "chat": 0, "wan": 0}
    ledger = make(100, queue_depth=depths.__getitem__, patience=0.5)
    ledger.reserve("wan", "wan", 30, timeout=1)
    ledger.set_busy("wan", False)
    time.sleep(0.05)
    ledger.reserve("chat", "qwen_instruct", 30, timeout=1)
    ledger.set_busy("chat", False)
    ledger.reserve("sdxl", "sdxl", 30, timeout=1)
    ledger.set_busy("sdxl", True)
    # a 20 MB model of a fourth pool: wan has been idle longest
    waiter, _ = in_thread(lambda: ledger.reserve("extra", "x", 20, timeout=0.5))
    assert [r.pool for r in wait_until(ledger.requests)] == ["wan"]
    waiter.join(5)

    depths.update(wan=2, chat=1)  # both needed: asked only after `patience`, the least needed first
    started = time.monotonic()
    waiter, _ = in_thread(lambda: ledger.reserve("extra", "x", 20, timeout=1.5))
    reqs = wait_until(ledger.requests, timeout=3)
    assert time.monotonic() - started >= 0.45
    assert [r.pool for r in reqs] == ["chat"]
    waiter.join(5)


def test_a_busy_pool_growing_for_its_job_goes_ahead_of_a_load_waiting_on_it(make: MakeLedger) -> None:
    """Found by tests/test_memory_invariant.py: SDXL in a job (busy, never asked to unload) grows its
    reservation for the job's shape while a WAN load waits for room SDXL holds. In line behind WAN, SDXL
    waited for WAN and WAN for SDXL until both timed out (``OURVIDZ_MEMORY_WAIT``): the job was retried
    minutes later. A held reservation growing goes first: SDXL runs, goes idle, makes room for WAN."""
    ledger = make(100, patience=0.2)
    sdxl = ledger.reserve("sdxl", "sdxl", 30, timeout=1)
    ledger.set_busy("sdxl", True)  # in a job
    wan, got = in_thread(lambda: ledger.reserve("wan", "wan", 80, timeout=8))
    wait_until(lambda: ledger.status()["pending_waiters"] == 1)
    started = time.monotonic()
    grown = ledger.reserve("sdxl", "sdxl", 50, timeout=4, token=sdxl.token)  # 70 MB free: it fits
    assert time.monotonic() - started < 1.0 and grown.mb == 50 and ledger.holders("sdxl") == {"sdxl/sdxl": 50}
    ledger.set_busy("sdxl", False)  # the job ended: now the idle SDXL is asked to make room for WAN
    assert [r.pool for r in wait_until(ledger.requests)] == ["sdxl"]
    sdxl.release()
    wan.join(5)
    assert isinstance(got.get("value"), Reservation), got


def test_two_jobs_growing_for_each_others_memory_do_not_wait_each_other_out(make: MakeLedger) -> None:
    """Found by tests/test_memory_invariant.py (seed 766387): SDXL and WAN both in a job (busy: never
    asked to unload), each growing for its job's shape, each needing memory the other holds. Both
    waited out ``OURVIDZ_MEMORY_WAIT`` (240 s there). The one behind steps back after the ledger's
    patience (``WORKER_UNAVAILABLE``: its job is retried), goes idle and makes room for the first."""
    from ourvidz_tasks.runtime.runtime import ModelSlot

    ledger = make(10, patience=0.3)

    def slot(name: str) -> ModelSlot:
        made = ModelSlot(name, lambda: SimpleNamespace(nbytes=lambda: 4 * 2**20, unload=lambda: 0),
                         lambda name, seconds: None, pool=name, ledger=ledger, default_mb=4, wait=8)
        made.get()
        ledger.record_work(name, "big", 3)  # a job of shape "big" needs 4 + 3 MB
        ledger.set_busy(name, True)
        return made

    first, second = slot("sdxl"), slot("wan")  # 8 of 10 MB held, both in a job
    grow, got = in_thread(lambda: first.hold("big"))
    wait_until(lambda: ledger.status()["pending_waiters"] == 1)
    started = time.monotonic()
    with pytest.raises(WorkerUnavailable, match="steps back"):
        second.hold("big")
    assert 0.3 <= time.monotonic() - started < 4.0
    ledger.set_busy("wan", False)  # its job ended (to be retried): idle, it is asked to make room
    assert [r.pool for r in wait_until(ledger.requests)] == ["wan"]
    second.unload()
    grow.join(5)
    assert got.get("value") == 7, got


def test_patience_is_the_pools_setting(store: redis.Redis) -> None:
    from ourvidz_tasks.contract.settings import load_settings

    assert Ledger.for_settings(store, load_settings(hostname="p"), "cpu").patience == 30.0
    assert Ledger.for_settings(store, load_settings(hostname="p", memory_patience=2.5), "cpu").patience == 2.5


def test_switch_through_a_pool_that_serves_requests(make: MakeLedger) -> None:
    ledger = make(100)
    chat = ledger.reserve("chat", "qwen_instruct", 70, timeout=1)
    ledger.set_busy("chat", False)
    stop = threading.Event()

    def chat_pool() -> None:  # what a worker does between jobs
        while not stop.is_set():
            for req in ledger.pending_requests("chat"):
                if req.action == "unload":
                    chat.release()
            time.sleep(0.02)

    server, _ = in_thread(chat_pool)
    wan = ledger.reserve("wan", "wan", 60, timeout=5)
    stop.set()
    server.join(5)
    assert wan.waited > 0
    st = ledger.status()
    assert st["switches_last_hour"] == 1 and st["counters"]["switches"] == 1
    assert st["counters"]["waits"] == 1 and st["requests"] == []
    assert st["pools"]["chat"]["loaded"] is False and st["pools"]["wan"]["models"] == {"wan": 60}


def test_want_asks_only_unneeded_idle_holders(make: MakeLedger) -> None:
    depths = {"sdxl": 0, "chat": 0, "wan": 0}
    ledger = make(100, queue_depth=depths.__getitem__)
    ledger.reserve("chat", "qwen_instruct", 70, timeout=1)
    ledger.set_busy("chat", True)
    assert ledger.want("wan", "wan", 50) == []  # busy
    ledger.set_busy("chat", False)  # idle and unneeded: asked at once for the standing want
    assert [r.pool for r in ledger.requests()] == ["chat"]
    depths["chat"] = 1
    assert ledger.want("wan", "wan", 50) == []  # needed now: the prediction is withdrawn
    depths["chat"] = 0
    ttl, wanted = 0.3, time.monotonic()
    reqs = ledger.want("wan", "wan", 50, ttl=ttl)
    assert [(r.pool, r.reason, r.for_pool) for r in reqs] == [("chat", "predict", "wan")]
    assert ledger.status()["wants"] == {"wan/wan": 50}
    wait_for(lambda: ledger.requests() == [] and ledger.status()["wants"] == {}, 50 * ttl, interval=ttl / 4)
    assert time.monotonic() - wanted >= ttl  # the want expired, not before its ttl


def test_control_requests(make: MakeLedger) -> None:
    ledger = make(100)
    assert ledger.request("unload", "chat", "qwen_base") is False  # not loaded
    assert ledger.request("load", "chat", "qwen_base", 30) is True
    res = ledger.reserve("chat", "qwen_instruct", 20, timeout=1)
    assert ledger.request("unload", "chat", "qwen_instruct", reason="force") is True
    reqs = ledger.pending_requests("chat")
    assert [(r.action, r.model, r.reason) for r in reqs] == [("unload", "qwen_instruct", "force"),
                                                               ("load", "qwen_base", "control")]
    res.release()  # answers the unload by itself
    assert [r.action for r in ledger.pending_requests("chat")] == ["load"]
    ledger.done(ledger.pending_requests("chat")[0])
    assert ledger.pending_requests("chat") == []
    assert ledger.counters()["forced"] == 1
    with pytest.raises(ValueError, match="`action` must be"):
        ledger.request("evict", "chat", "x")


def test_resize_grows_only_when_it_fits(make: MakeLedger) -> None:
    ledger = make(100)
    res = ledger.reserve("sdxl", "sdxl", 40, timeout=1)
    other = ledger.reserve("wan", "wan", 40, timeout=1)
    assert res.resize(60) is True and ledger.holders("sdxl") == {"sdxl/sdxl": 60}
    assert res.resize(70) is False and res.mb == 60
    assert res.resize(10) is True
    other.release()
    assert ledger.status()["reserved_mb"] == 10


def test_estimate_is_weights_plus_recent_work_plus_slack(make: MakeLedger) -> None:
    ledger = make(slack=0.1, window=3)
    assert ledger.estimate("sdxl", 500, default_work_mb=150) == 500  # nothing measured: the first estimate
    ledger.record_weights("sdxl", 300)
    # weights measured, no work yet: never below the first estimate
    assert ledger.estimate("sdxl", 500, default_work_mb=150) == 500
    assert ledger.estimate("sdxl", 100, default_work_mb=50) == 385  # (300 + 50) * 1.1
    assert ledger.record_work("sdxl", "1024x1024x1", 120) == 120
    assert ledger.estimate("sdxl", 500) == 462  # (300 + 120) * 1.1, now measured
    ledger.record_work("sdxl", "1024x1024x6", 250)
    assert ledger.estimate("sdxl", 500, "1024x1024x1") == 462  # per shape
    assert ledger.estimate("sdxl", 500, "1024x1024x6") == 605
    # an unmeasured shape: each measured one scaled by the shape model, the larger figure
    scaled = max(120 * shape_ratio("sdxl", "832x1216x3", "1024x1024x1"),  # type: ignore[operator]
                 250 * shape_ratio("sdxl", "832x1216x3", "1024x1024x6"))  # type: ignore[operator]
    assert ledger.estimate("sdxl", 500, "832x1216x3") == math.ceil((300 + math.ceil(scaled)) * 1.1)
    assert ledger.estimate("sdxl", 500, "1024x1024x12") > 605  # twice the largest measured batch: more
    assert ledger.estimate("sdxl", 500) == 605  # a load: the largest recent
    assert ledger.estimate("sdxl", 500, idle=True) == 330  # between jobs: the weights (+ slack)
    ledger.record_weights("sdxl", 280)  # weights are replaced, exactly as loaded
    assert ledger.estimate("sdxl", 500, "1024x1024x6") == 583
    assert ledger.estimate("wan", 700) == 700  # per model
    # nothing measured: the first estimate's working memory scaled to the shape
    first = ledger.estimate("wan", 700, "480x832x17", default_work_mb=200)
    assert first == 500 + math.ceil(200 * shape_ratio("wan", "480x832x17", "480x832x81"))  # type: ignore[operator]
    assert ledger.estimate("wan", 700, idle=True, default_work_mb=200) == 500


def test_recent_work_goes_down(make: MakeLedger) -> None:
    """Last-N, not an all-time maximum: one high sample (a cold start) ages out."""
    ledger = make(window=3)
    assert [ledger.record_work("wan", "480x832x81", mb) for mb in (90, 400, 100, 95, 92, 91)] == \
        [90, 400, 400, 400, 100, 95]
    sizes = ledger.sizes("wan")
    assert sizes["first"] == {"480x832x81": 90} and sizes["samples"]["480x832x81"] == [91, 92, 95]
    assert sizes["work"] == {"480x832x81": 95}
    ledger.redis.hset(ledger.sizes_key, "work:wan:64x64x9", "not json")  # garbage is ignored, not fatal
    assert ledger.sizes("wan")["work"] == {"480x832x81": 95}
    ledger.record_resident("wan", 12)  # what a load's first call kept: held with the weights
    ledger.record_weights("wan", 300)
    assert ledger.estimate("wan", 1000) == 300 + 12 + 95


def test_pressure_levels(make: MakeLedger) -> None:
    assert [pressure_of(x, 100) for x in (0, 59, 60, 79, 80, 94, 95, 120)] == [
        "low", "low", "medium", "medium", "high", "high", "critical", "critical"]
    assert pressure_of(18432, 24576) == "medium"  # the seeds' example
    ledger = make(100)
    ledger.reserve("sdxl", "sdxl", 85, timeout=1)
    report = ledger.report()
    assert report["pressure_level"] == "high" and report["available_vram"] == 15
    assert report["worker_status"]["sdxl"] == {"loaded": True, "memory": 85}
    assert report["worker_status"]["wan"] == {"loaded": False, "memory": 0}
    assert "monitor_pressure" in report["recommendations"]


def test_the_scripts_are_the_packaged_lua_files_and_name_only_ledger_keys() -> None:
    """Every operation is the prelude plus its own ``.lua`` file; every ``K.part`` they use is a key part."""
    names = {path.name for path in resources.files(lua).iterdir()}
    assert {"prelude.lua", "recent.lua", *(f"{op}.lua" for op in lua.OPERATIONS)} <= names
    parts: set[str] = set()
    for op in lua.OPERATIONS:
        script = lua.operation(op)
        assert script.startswith(lua.source("prelude")) and script.endswith(lua.source(op))
        parts |= set(re.findall(r"\bK\.(\w+)", script))
    assert parts == set(lua.STATE)
    with pytest.raises(ValueError):
        lua.operation("recent")


def test_every_key_has_a_ttl(make: MakeLedger, store: redis.Redis) -> None:
    ledger = make(100)
    a = ledger.reserve("sdxl", "sdxl", 60, timeout=1)
    ledger.set_busy("sdxl", False)
    ledger.record_peak("sdxl", "512x512", 10)
    ledger.record_weights("sdxl", 50)
    ledger.want("wan", "wan", 80)
    ledger.request("load", "chat", "qwen_instruct", 10)
    waiter, _ = in_thread(lambda: ledger.reserve("wan", "wan", 60, timeout=1))
    wait_until(lambda: ledger.status()["pending_waiters"] == 1)
    keys = list(store.scan_iter(match=f"{ledger.prefix}:*"))
    assert len(keys) >= 10
    assert {k: store.ttl(k) for k in keys if store.ttl(k) <= 0} == {}
    a.release()
    waiter.join(5)
    keys = list(store.scan_iter(match=f"{ledger.prefix}:*"))
    assert {k: store.ttl(k) for k in keys if store.ttl(k) <= 0} == {}


def test_measure_peak_on_cpu_is_real_and_resets() -> None:
    """The CPU probe's high-water mark is reset per measurement: what the block really adds, not a bound."""
    import torch

    big = torch.ones(96, 2**20 // 4)  # 96 MB before: a ru_maxrss probe would hide what follows
    del big
    with measure_peak("cpu") as peak:
        block = torch.ones(64, 2**20 // 4)  # 64 MB
        block.add_(1)
        del block
    assert 60 <= peak.mb <= 80, peak.mb
    with measure_peak("cpu") as peak:
        early = torch.ones(80, 2**20 // 4)  # a load before the model call...
        peak.restart()  # ...is forgotten
        late = torch.ones(32, 2**20 // 4)
        del late
    assert 28 <= peak.mb <= 44, peak.mb
    del early


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_measure_peak_on_cuda() -> None:
    import torch

    keep = torch.ones(2**20, device="cuda")  # 4 MB held before: not counted
    with measure_peak("cuda:0") as peak:
        tmp = torch.ones(16 * 2**20 // 4, device="cuda")
        del tmp
    assert 16 * 2**20 <= peak.bytes < 20 * 2**20
    del keep


def _contender(url: str, host: str, seed: int, rounds: int, out: Any) -> None:
    store = redis.Redis.from_url(url)
    ledger = Ledger(store, host, "cuda:0", 100, poll=0.01, queue_depth=lambda pool: 0)
    rng = random.Random(seed)
    done = 0
    for i in range(rounds):
        mb = rng.randint(10, 60)
        try:
            with ledger.reserve(f"p{seed}", f"m{i % 3}", mb, timeout=10):
                time.sleep(rng.uniform(0, 0.02))
            done += 1
        except WorkerUnavailable:
            pass
    out.put(done)


def test_concurrent_reservations_never_exceed_the_budget(make: MakeLedger, store: redis.Redis) -> None:
    ledger = make(100)
    held_key = f"{ledger.prefix}:held"
    peak, samples = 0, 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, samples
        while not stop.is_set():
            peak = max(peak, sum(int(v) for v in store.hvals(held_key)))
            samples += 1
            time.sleep(0.002)

    sampler, _ = in_thread(sample)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(BROKER, ledger.host, seed, 25, results)) for seed in range(3)]
    for proc in procs:
        proc.start()
    threads = [threading.Thread(target=_contender, args=(BROKER, ledger.host, 10 + n, 25, results))
               for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for proc in procs:
        proc.join(60)
    stop.set()
    sampler.join(5)
    finished = sum(results.get(timeout=5) for _ in range(5))
    assert finished == 5 * 25
    print(f"peak {peak} MB over {samples} samples")
    assert samples > 50 and 60 < peak <= 100
    counters = ledger.counters()
    assert counters["grants"] == 125 and counters["waits"] > 0
    assert ledger.status()["reserved_mb"] == 0
