"""Past one GPU: several devices on one host, several hosts on one broker (docs/scaling.md).

Devices are simulated (``cpu:0``, ``cpu:1``: CONTRACT section 5), hosts are worker sets with their own
``OURVIDZ_HOSTNAME``; every pool is a real ``bin/worker`` process on the test's private Redis database.
"""

from __future__ import annotations

import base64
import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.contract.devices import canonical_device, local_cuda_index
from ourvidz_tasks.contract.errors import ConfigError, WorkerUnavailable
from ourvidz_tasks.contract.settings import Settings, load_settings
from ourvidz_tasks.runtime.leases import Reservation
from ourvidz_tasks.runtime.ledger import Ledger
from ourvidz_tasks.runtime.recovery import UNACKED, node_of

from .support.cluster import WorkerProcess
from .support.env import worker_env
from .support.jobs import new_id, terminal
from .support.process import wait_for
from .wire import publish

#: the lease of these tests (OURVIDZ_LEASE_SECONDS): every wait below is derived from it
LEASE = 3.0
BUDGET_MB = 4096


# -- names and ledgers, without workers ------------------------------------------------------
@pytest.mark.parametrize(("given", "device", "node"), [
    ("cpu", "cpu", "sdxl@h"), ("cpu:0", "cpu", "sdxl@h"), ("CPU:00", "cpu", "sdxl@h"),
    ("cpu:1", "cpu:1", "sdxl.cpu1@h"), ("cpu:01", "cpu:1", "sdxl.cpu1@h"),
    ("cuda", "cuda:0", "sdxl@h"), ("cuda:0", "cuda:0", "sdxl@h"), ("cuda:1", "cuda:1", "sdxl.gpu1@h"),
    (" cuda:12 ", "cuda:12", "sdxl.gpu12@h"),
])
def test_one_spelling_per_device_names_the_node(given: str, device: str, node: str) -> None:
    from ourvidz_tasks.runtime.runtime import node_name

    settings = Settings(device=given, hostname="h")
    assert settings.device == device == canonical_device(given)
    assert node_name("sdxl", settings) == node


@pytest.mark.parametrize("given", ["gpu1", "cuda:-1", "cpu1", "tpu:0", "cuda:1:2"])
def test_a_wrong_device_is_refused_naming_the_variable(given: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OURVIDZ_DEVICE", given)
    with pytest.raises(ConfigError, match="OURVIDZ_DEVICE"):
        load_settings()


def test_a_pool_on_cuda_n_makes_it_the_current_device_and_cpu_touches_no_cuda() -> None:
    """Issue 25.7: helpers that take no device (mem_get_info, transformers' cache sizing) measure the current one."""
    import torch

    from ourvidz_tasks.models import use_device

    chosen: list[torch.device] = []
    use_device(torch.device("cuda", 1), chosen.append)
    assert chosen == [torch.device("cuda", 1)]
    use_device(torch.device("cpu"), chosen.append)
    use_device(torch.device("cpu"))  # the default reaches no CUDA call on CPU
    assert chosen == [torch.device("cuda", 1)] and not torch.cuda.is_initialized()
    build = (Path(__file__).parents[1] / "ourvidz_tasks/runtime/build.py").read_text()
    assert build.index("use_device(device)") < build.index("connect(")  # at start, before anything allocates


def test_cuda_index_in_a_container_that_sees_one_card() -> None:
    assert local_cuda_index(1, {}) == 1  # bare metal: the host's numbering
    assert local_cuda_index(1, {"NVIDIA_VISIBLE_DEVICES": "all"}) == 1
    assert local_cuda_index(1, {"NVIDIA_VISIBLE_DEVICES": "GPU-8f2c"}) == 1  # UUIDs: not ours to map
    assert local_cuda_index(1, {"NVIDIA_VISIBLE_DEVICES": "1"}) == 0  # compose: card 1 is the container's 0
    assert local_cuda_index(3, {"NVIDIA_VISIBLE_DEVICES": "2,3"}) == 1
    assert local_cuda_index(0, {"NVIDIA_VISIBLE_DEVICES": "3"}) == 0  # the container's own numbering
    with pytest.raises(ValueError, match="card 2 is not among NVIDIA_VISIBLE_DEVICES=1"):
        local_cuda_index(2, {"NVIDIA_VISIBLE_DEVICES": "1"})


@pytest.mark.stress
def test_each_device_has_its_own_ledger_and_a_squeeze_stays_on_its_device(store: redis.Redis) -> None:
    """Two spellings of one device meet in one ledger; a full ``cpu:1`` never holds up ``cpu:0``."""
    from ourvidz_tasks.models import resolve_device

    host = f"ledger-{new_id()[:6]}"

    def ledger(device: str) -> Ledger:
        settings = Settings(device=device, hostname=host, vram_budget_mb=100)
        return Ledger.for_settings(store, settings, resolve_device(settings.device))

    first, second, zero = ledger("cpu:1"), ledger("CPU:01"), ledger("cpu:0")
    assert first.prefix == second.prefix == f"ourvidz:ledger:{host}:cpu:1"
    assert zero.prefix == ledger("cpu").prefix == f"ourvidz:ledger:{host}:cpu"
    try:
        with first.reserve("wan", "wan", 100, timeout=0):  # cpu:1 is full
            with pytest.raises(WorkerUnavailable, match="cpu:1"):
                second.reserve("sdxl", "sdxl", 10, timeout=0)  # the same device, however spelled
            started = time.monotonic()
            with zero.reserve("sdxl", "sdxl", 100, timeout=LEASE):  # the other device: at once, all of it
                assert time.monotonic() - started < LEASE
                assert zero.status()["pending_waiters"] == 0
    finally:
        first.clear()
        zero.clear()


# -- real pools --------------------------------------------------------------------------------
def small_job(steps: int) -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a lighthouse at dusk",
            "config": {"resolution": "512x512", "num_inference_steps": steps, "seed": 7}}


def bodies(sink: Sink, job_id: str) -> list[dict[str, Any]]:
    return [call["body"] for call in sink.callbacks(job_id)]


def terminals(sink: Sink, job_id: str) -> list[dict[str, Any]]:
    return [body for body in bodies(sink, job_id) if body["status"] in ("completed", "failed")]


def starts(sink: Sink, job_id: str) -> list[str]:
    """The worker of each run of the job (a ``processing`` callback without progress starts a run)."""
    return [str(b["worker_id"]) for b in bodies(sink, job_id)
            if b["status"] == "processing" and "progress" not in (b.get("metadata") or {})]


def held_by_host(store: redis.Redis, host: str) -> dict[str, str]:
    """delivery tag -> job id of every message a pool of ``host`` holds (running or prefetched)."""
    held = {}
    for tag, raw in store.hgetall(UNACKED).items():
        owner = store.get(b"ourvidz:owner:" + tag)
        if owner is None or not node_of(owner.decode()).endswith(f"@{host}"):
            continue
        args = json.loads(base64.b64decode(json.loads(raw)[0]["body"]))[0]
        held[tag.decode()] = str(args[0]["id"])
    return held


@pytest.fixture()
def pools(isolated_broker: str, sink: Sink, tmp_path: Path) -> Iterator[Callable[..., list[WorkerProcess]]]:
    """Start several ``bin/worker`` processes at once (as the hosts' supervisors would); all killed at the end."""
    started: list[WorkerProcess] = []

    def start(*specs: tuple[str, dict[str, str]], args: tuple[str, ...] = ()) -> list[WorkerProcess]:
        workers = []
        for family, extra in specs:
            env = worker_env(sink, family, OURVIDZ_BROKER_URL=isolated_broker, **extra)
            worker = WorkerProcess(family, env, tmp_path / f"{new_id()[:8]}.log", args)
            started.append(worker)
            workers.append(worker.launch())
        for worker in workers:
            worker.wait_ready(300)
        return workers

    yield start
    for worker in started:
        worker.stop(signal.SIGKILL)


def pool_env(host: str, device: str, **extra: str) -> dict[str, str]:
    return {"OURVIDZ_HOSTNAME": host, "OURVIDZ_DEVICE": device, "OURVIDZ_LEASE_SECONDS": f"{LEASE:g}",
            "OURVIDZ_VRAM_BUDGET_MB": str(BUDGET_MB), **extra}


@pytest.mark.slow
@pytest.mark.stress
def test_two_devices_on_one_host_share_the_work_and_keep_their_memory_apart(
        isolated_broker: str, pools: Callable[..., list[WorkerProcess]], sink: Sink) -> None:
    """``cpu:0`` and ``cpu:1`` on one host name: one queue, two ledgers; while ``cpu:1`` has no memory
    for its job, ``cpu:0`` finishes every other job without waiting; then ``cpu:1`` finishes its own."""
    store = redis.Redis.from_url(isolated_broker)
    host = f"two-{new_id()[:6]}"
    # cpu:1 waits for memory as long as this test may need (a short wait would retry the job elsewhere)
    zero, one = pools(("sdxl", pool_env(host, "cpu")), ("sdxl", pool_env(host, "cpu:1", OURVIDZ_MEMORY_WAIT="600")))
    assert (zero.node, one.node) == (f"sdxl@{host}", f"sdxl.cpu1@{host}")
    ledgers = {d: Ledger(store, host, d, BUDGET_MB, lease_seconds=LEASE) for d in ("cpu", "cpu:1")}
    assert all(ledger.holders("sdxl") for ledger in ledgers.values()), "each pool reserved in its device's ledger"

    jobs = [small_job(steps=8) for _ in range(6)]
    for job in jobs:
        publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    done = [terminal(sink, job["id"], 300) for job in jobs]
    assert [b["status"] for b in done] == ["completed"] * len(jobs)
    assert {b["worker_id"] for b in done} == {zero.node, one.node}, "both devices took work from the one queue"

    # the squeeze: cpu:1's SDXL is unloaded and all of cpu:1's memory is held by someone else
    squeezed = ledgers["cpu:1"]
    heartbeat = squeezed.keepalive()
    with ThreadPoolExecutor(1) as waiter:
        hog: Future[Reservation] = waiter.submit(squeezed.reserve, "wan", "wan", BUDGET_MB, timeout=120)
        wait_for(lambda: squeezed.status()["pending_waiters"], 30, what="the hog in line")
        squeezed.request("unload", "sdxl", "sdxl", reason="test squeeze")
        held = hog.result(timeout=150)
    heartbeat.add(held)
    try:
        assert not squeezed.holders("sdxl") and ledgers["cpu"].holders("sdxl")
        jobs = [small_job(steps=8) for _ in range(5)]
        for job in jobs:
            publish(store, "ourvidz.sdxl.generate", job, "sdxl")
        stuck = wait_for(lambda: next((j["id"] for j in jobs if one.node in starts(sink, j["id"])), None), 120,
                         what="cpu:1 to take a job")
        wait_for(lambda: squeezed.status()["pending_waiters"], 60, what="cpu:1 waiting for its memory")
        others = [j for j in jobs if j["id"] != stuck]
        finished = [terminal(sink, j["id"], 300) for j in others]
        assert {b["worker_id"] for b in finished} == {zero.node} and [b["status"] for b in finished] == \
            ["completed"] * len(others)
        assert not terminals(sink, stuck), "cpu:1's job waits for cpu:1's memory"
        assert squeezed.status()["waiters"][0]["pool"] == "sdxl"
        assert ledgers["cpu"].status()["pending_waiters"] == 0
        assert "granted after" not in zero.text(), "cpu:0 never waited for memory"
    finally:
        heartbeat.discard(held)
        held.release()
        heartbeat.stop()
    body = terminal(sink, stuck, 300)
    assert body["status"] == "completed" and body["worker_id"] == one.node
    assert "granted after" in one.text()
    for job_id in [stuck, *(j["id"] for j in others)]:
        assert len(terminals(sink, job_id)) == 1


@pytest.mark.slow
@pytest.mark.stress
def test_a_lost_host_is_covered_by_another_and_comes_back_without_a_reset(
        isolated_broker: str, pools: Callable[..., list[WorkerProcess]], sink: Sink) -> None:
    """Host A (two devices) and host B on one broker. Every process of A is SIGKILLed mid-job and not
    restarted: what A held (running and prefetched) goes back within the lease and B finishes it, one
    terminal callback each. Then A starts again under the same names, with nothing reset, and takes its share.

    A's pools hold one more message each than they run, as the chat pool's threads do (a solo pool's
    loop is busy while its job runs, so it prefetches nothing): ``bin/worker sdxl --pool threads
    --concurrency 1 --prefetch-multiplier 2``, so the kill also catches messages received but not started.
    """
    store = redis.Redis.from_url(isolated_broker)
    tag = new_id()[:6]
    host_a, host_b = f"host-a-{tag}", f"host-b-{tag}"
    specs_a = (("sdxl", pool_env(host_a, "cpu")), ("sdxl", pool_env(host_a, "cpu:1")))
    prefetch = ("--pool", "threads", "--concurrency", "1", "--prefetch-multiplier", "2")
    fleet_a = pools(*specs_a, args=prefetch)
    [b] = pools(("sdxl", pool_env(host_b, "cpu")))

    warm = [small_job(steps=4) for _ in range(6)]
    for job in warm:
        publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    hosts = {terminal(sink, j["id"], 300)["worker_id"].split("@")[1] for j in warm}
    assert hosts == {host_a, host_b}, "both hosts take work from the same queue"

    jobs = [small_job(steps=40) for _ in range(6)]
    for job in jobs:
        publish(store, "ourvidz.sdxl.generate", job, "sdxl")

    def both_a_running_and_one_prefetched() -> dict[str, str] | None:
        held = held_by_host(store, host_a)
        nodes = {w.node for w in fleet_a}
        running = {n for j in held.values() if not terminals(sink, j) for n in starts(sink, j)[-1:]} & nodes
        waiting = [j for j in held.values() if not starts(sink, j)]
        return held if running == nodes and waiting else None

    held = wait_for(both_a_running_and_one_prefetched, 180, what="both pools of host A in a job, one more message held")
    for worker in fleet_a:  # the whole host at once
        worker.stop(signal.SIGKILL)
    killed_at = time.time()
    # what A held when it died: read before the kill too, since a scanner on this machine sees A's pids
    # gone and may hand a message back at once; a job A ended in between is not lost
    lost = {tag: job for tag, job in {**held, **held_by_host(store, host_a)}.items() if not terminals(sink, job)}
    prefetched = [j for j in lost.values() if not starts(sink, j)]
    assert len(lost) >= 3 and prefetched and not any(terminals(sink, j) for j in lost.values())

    # back: on the queue, or taken by B (a restored message keeps its delivery tag, under B's owner record)
    requeued_after = wait_for(lambda: not (set(lost) & set(held_by_host(store, host_a)))
                              and time.time() - killed_at, 6 * LEASE + 30, interval=0.05,
                              what="host A's messages back on the queue")
    done = {j["id"]: terminal(sink, j["id"], 300) for j in jobs}
    finished_after = time.time() - killed_at
    for job_id in lost.values():
        assert done[job_id]["status"] == "completed" and done[job_id]["worker_id"] == b.node
        assert starts(sink, job_id)[-1] == b.node
    assert Counter(len(terminals(sink, j["id"])) for j in jobs) == Counter({1: len(jobs)})
    print(f"host A lost with {len(lost)} jobs held ({len(prefetched)} prefetched): back on the queue "
          f"{requeued_after:.1f}s after the kill "
          f"(lease {LEASE:g}s), all finished by host B {finished_after:.1f}s after it")
    # the bound recovery.py gives: A's heartbeat keys lapse within one lease of the kill (refreshed every
    # third of it) and a survivor scans every third of a lease; one more lease of room for a busy machine
    assert requeued_after <= LEASE * 4 / 3 + LEASE

    # host A comes back: the same names, new processes, no reset of anything
    again = pools(*specs_a, args=prefetch)
    assert [w.node for w in again] == [w.node for w in fleet_a]
    later = [small_job(steps=8) for _ in range(8)]
    for job in later:
        publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    later_done = [terminal(sink, j["id"], 300) for j in later]
    assert [body["status"] for body in later_done] == ["completed"] * len(later)
    assert {body["worker_id"].split("@")[1] for body in later_done} == {host_a, host_b}
    assert all(len(terminals(sink, j["id"])) == 1 for j in [*jobs, *later])
    assert not any("earlier incarnation" in w.text() for w in again), "B had already handed A's jobs back"
    assert b.alive() and all(w.alive() for w in again)
