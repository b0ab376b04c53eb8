"""Memory remote control: the command functions on a fake worker state, then a real solo worker.

The first group calls the registered command functions directly with a fake
``state`` (``state.consumer.app.ourvidz_runtime``) whose model slots reserve
through a real ledger (fake MB, no models). The second starts a real Celery
worker (solo pool, in a thread, on the test Redis) with such a runtime and
goes through the broker: ``inspect memory_status``, ``control model_unload``
carried out by the idle timer, busy marks around a job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from celery.bin.control import _get_commands_of_type
from celery.contrib.testing.worker import start_worker
from celery.worker.control import Panel

from devtools.sink import Sink
from ourvidz_tasks.runtime import between_jobs, control, signals
from ourvidz_tasks.runtime.leases import Reservation
from ourvidz_tasks.runtime.ledger import Ledger
from ourvidz_tasks.runtime.runtime import JobGate

from .support.cluster import Pools
from .support.env import BROKER, worker_env
from .support.process import ROOT, wait_for


class FakeSlot:
    """A model slot as runtime.ModelSlot is: reserve before load, release on unload."""

    def __init__(self, rt: FakeRuntime, name: str, default_mb: int) -> None:
        self.rt, self.name, self.default_mb = rt, name, default_mb
        self.model: Any = None
        self.reservation: Reservation | None = None
        self.loads = 0

    def get(self, wait: float | None = None) -> Any:
        if self.model is None:
            mb = self.rt.ledger.estimate(self.name, self.default_mb)
            self.reservation = self.rt.ledger.reserve(self.rt.family, self.name, mb,
                                                      timeout=2.0 if wait is None else wait)
            self.model = object()
            self.loads += 1
        return self.model

    def unload(self) -> int:
        if self.model is None:
            return 0
        self.model = None
        assert self.reservation is not None
        return self.reservation.release()


class FakeRuntime:
    """The parts of runtime.Runtime the ledger hooks read (other worker hooks see ``None``)."""

    recovery = None

    def __init__(self, ledger: Ledger, family: str, models: dict[str, int]) -> None:
        self.ledger, self.family, self.worker_id = ledger, family, f"{family}@test"
        self.gate, self.last_job_ended = JobGate(), time.monotonic()
        self.models = {name: FakeSlot(self, name, mb) for name, mb in models.items()}

    def close(self) -> None:
        for slot in self.models.values():
            slot.unload()


def state_of(rt: Any) -> Any:
    return SimpleNamespace(consumer=SimpleNamespace(app=SimpleNamespace(ourvidz_runtime=rt)))


@pytest.fixture
def ledger(store: redis.Redis) -> Iterator[Ledger]:
    ledger = Ledger(store, f"ctl-{uuid.uuid4().hex[:8]}", "cuda:0", 100, poll=0.02, queue_depth=lambda pool: 0)
    yield ledger
    ledger.clear()


@pytest.fixture
def pools(ledger: Ledger) -> dict[str, FakeRuntime]:
    return {
        "sdxl": FakeRuntime(ledger, "sdxl", {"sdxl": 30}),
        "chat": FakeRuntime(ledger, "chat", {"qwen_instruct": 40, "qwen_base": 40}),
        "wan": FakeRuntime(ledger, "wan", {"wan": 50}),
    }


def test_commands_are_registered_for_the_cli() -> None:
    assert {"memory_status", "pressure_check"} <= set(_get_commands_of_type("inspect"))
    assert {"model_load", "model_unload", "force_unload", "predictive_load"} <= set(_get_commands_of_type("control"))
    assert Panel.meta["force_unload"].args == [("target", str), ("model", str)]
    assert Panel.data["memory_status"] is control.memory_status  # the implementation, not the stand-in


def test_the_app_alone_declares_the_commands_for_the_cli() -> None:
    """A process that loads only the app (the operator's ``celery -A ourvidz_tasks``) knows the names."""
    script = ("import sys, ourvidz_tasks.celery\n"
              "from celery.bin.control import _get_commands_of_type as of\n"
              "from celery.worker.control import Panel\n"
              "assert 'ourvidz_tasks.runtime.control' not in sys.modules and 'torch' not in sys.modules\n"
              "print(sorted(of('inspect')), sorted(of('control')), Panel.meta['predictive_load'].args)\n"
              "print(Panel.data['memory_status'](type('S', (), {'hostname': 'outbox@x'})()))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in ("memory_status", "pressure_check", "model_load", "model_unload", "force_unload", "predictive_load"):
        assert f"'{name}'" in out
    assert "[('target', <class 'str'>), ('model', <class 'str'>), ('mb', <class 'int'>)]" in out
    assert "outbox@x runs no pool: memory_status is a pool's command" in out


def test_memory_status(pools: dict[str, FakeRuntime]) -> None:
    pools["sdxl"].models["sdxl"].get()
    pools["chat"].models["qwen_instruct"].get()
    st = control.memory_status(state_of(pools["chat"]))
    assert st["reserved_mb"] == 70 and st["free_mb"] == 30 and st["pressure"] == "medium"
    assert st["vram_usage"] == {"total": 100, "used": 70, "free": 30, "pressure": "medium"}
    assert st["workers"] == {"sdxl_worker": "loaded", "chat_worker": "loaded", "wan_worker": "unloaded"}
    assert st["worker"] == {"node": "chat@test", "pool": "chat", "models": {"qwen_instruct": True, "qwen_base": False}}
    report = control.pressure_check(state_of(pools["wan"]))
    assert report["pressure_level"] == "medium" and report["worker_status"]["chat"] == {"loaded": True, "memory": 40}


def test_without_a_runtime_or_ledger(ledger: Ledger) -> None:
    assert "error" in control.memory_status(state_of(None))
    bare = SimpleNamespace(family="sdxl", worker_id="sdxl@x", models={}, ledger=None)
    assert control.model_unload(state_of(bare)) == {"error": "sdxl@x keeps no memory ledger"}


def test_model_unload_is_a_request_carried_out_between_jobs(pools: dict[str, FakeRuntime], ledger: Ledger) -> None:
    chat = pools["chat"]
    chat.models["qwen_instruct"].get()
    chat.models["qwen_base"].get()
    reply = control.model_unload(state_of(chat), "qwen_base")
    assert reply["ok"].startswith("unload of qwen_base on chat requested")
    assert [(r["action"], r["model"], r["reason"]) for r in reply["requests"]] == [("unload", "qwen_base", "control")]
    assert chat.models["qwen_base"].model is not None  # nothing happened yet
    served = between_jobs.serve_requests(chat)
    assert [r["model"] for r in served] == ["qwen_base"]
    assert chat.models["qwen_base"].model is None and ledger.holders("chat") == {"chat/qwen_instruct": 40}
    assert ledger.requests() == []
    assert control.model_unload(state_of(chat), "nope")["error"].startswith("`model` must be one of")
    reply = control.model_unload(state_of(chat))  # all it holds
    assert [r["model"] for r in reply["requests"]] == ["qwen_instruct"]
    between_jobs.serve_requests(chat)
    assert ledger.holders("chat") == {}
    assert control.model_unload(state_of(chat))["ok"] == "nothing to unload: chat holds nothing"


def test_model_load_waits_until_it_fits(pools: dict[str, FakeRuntime], ledger: Ledger) -> None:
    wan, chat = pools["wan"], pools["chat"]
    chat.models["qwen_instruct"].get()
    chat.models["qwen_base"].get()  # 80 of 100
    reply = control.model_load(state_of(wan))
    assert "load of wan (50 MB) requested" in reply["ok"]
    assert between_jobs.serve_requests(wan) == []  # does not fit: stays pending
    assert [r.action for r in ledger.pending_requests("wan")] == ["load"]
    chat.models["qwen_base"].unload()
    assert [r["action"] for r in between_jobs.serve_requests(wan)] == ["load"]
    assert wan.models["wan"].model is not None and ledger.pending_requests("wan") == []
    assert control.model_load(state_of(wan))["ok"] == "wan is already loaded"


def test_force_unload_of_another_pool(pools: dict[str, FakeRuntime], ledger: Ledger) -> None:
    pools["wan"].models["wan"].get()
    ledger.set_busy("wan", True)  # in a job: the request waits for its end
    reply = control.force_unload(state_of(pools["sdxl"]), "wan_worker")
    assert [(r["pool"], r["model"], r["reason"]) for r in reply["requests"]] == [("wan", "wan", "force")]
    assert between_jobs.serve_requests(pools["sdxl"]) == []  # not sdxl's to do
    between_jobs.serve_requests(pools["wan"])
    assert ledger.holders() == {} and ledger.counters()["forced"] == 1


def test_predictive_load_makes_room_then_loads(pools: dict[str, FakeRuntime], ledger: Ledger) -> None:
    sdxl, chat, wan = pools["sdxl"], pools["chat"], pools["wan"]
    sdxl.models["sdxl"].get()
    chat.models["qwen_instruct"].get()  # 70 of 100: wan's 50 does not fit
    for pool in ("sdxl", "chat"):
        ledger.set_busy(pool, False)
    reply = control.predictive_load(state_of(sdxl), "wan", mb=50)  # another pool: its size given
    assert "room for wan of wan (50 MB) requested" in reply["ok"]
    got = {(r["action"], r["pool"], r["reason"]) for r in reply["requests"]}
    assert got == {("unload", "chat", "predict"), ("load", "wan", "predict")}  # sdxl stays resident
    assert between_jobs.serve_requests(wan) == []  # no room yet
    between_jobs.serve_requests(chat)
    assert [r["action"] for r in between_jobs.serve_requests(wan)] == ["load"]
    assert ledger.holders() == {"sdxl/sdxl": 30, "wan/wan": 50}
    assert ledger.counters()["switches"] == 1
    assert "error" in control.predictive_load(state_of(sdxl), "other")


# -- a real worker -------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    return wait_for(predicate, timeout, interval=0.05)


@pytest.mark.slow
@pytest.mark.stress  # a job of a few idle-timer periods, the request standing through them
def test_through_a_real_solo_worker(pools: dict[str, FakeRuntime], ledger: Ledger) -> None:
    queue = f"ctl-{uuid.uuid4().hex[:8]}"
    app = Celery("ctl-test", broker=BROKER, backend=BROKER, set_as_current=False)
    app.conf.update(task_default_queue=queue, worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)
    app.loader.import_module("celery.contrib.testing.tasks")
    busy_seen: list[bool] = []

    @app.task(name="ctl.job")
    def job(seconds: float) -> bool:
        busy_seen.append(ledger.status()["pools"]["chat"]["busy"])
        time.sleep(seconds)
        return True

    chat = pools["chat"]
    chat.models["qwen_instruct"].get()
    chat.models["qwen_base"].get()
    app.ourvidz_runtime = chat  # type: ignore[attr-defined]
    node = f"chat@{queue}"
    with start_worker(app, pool="solo", hostname=node, perform_ping_check=True, shutdown_timeout=15):
        # signals' worker_init added the idle timer to this app's workers (task_prerun/postrun: busy_seen below)
        assert signals.install_idle_timer is control.install and control.ServeRequests in app.steps["consumer"]
        replies = app.control.inspect(timeout=3, destination=[node])._request("memory_status")
        assert replies[node]["pools"]["chat"]["models"] == {"qwen_instruct": 40, "qwen_base": 40}
        assert replies[node]["worker"]["pool"] == "chat"

        replies = app.control.broadcast("model_unload", arguments={"model": "qwen_base"}, destination=[node],
                                        reply=True, timeout=3)
        assert "carried out between jobs" in replies[0][node]["ok"]
        wait_until(lambda: chat.models["qwen_base"].model is None, 5)  # the idle timer served it
        assert ledger.holders("chat") == {"chat/qwen_instruct": 40}

        ticks = 4  # the idle timer's periods the request stands while the job runs
        result = job.delay(control.SERVE_INTERVAL * (ticks + 4))
        wait_until(lambda: busy_seen, 10)
        ledger.request("unload", "chat", "qwen_instruct", reason="force")
        time.sleep(control.SERVE_INTERVAL * ticks)  # the timer would have served it by now between jobs
        assert not result.ready()  # (still the job: else this proves nothing)
        assert chat.models["qwen_instruct"].model is not None  # never during a job
        assert result.get(timeout=10) is True
        wait_until(lambda: chat.models["qwen_instruct"].model is None, 5)  # right after it
        assert busy_seen == [True]
        assert ledger.status()["pools"]["chat"]["busy"] is False


def test_predictive_load_makes_room_for_queued_work(store) -> None:
    """A cold pool with queued jobs asks the idle holder nobody needs to unload, before any job starts."""
    from ourvidz_tasks.contract.settings import Settings
    from ourvidz_tasks.runtime.between_jobs import predict

    depths = {"wan": 2, "sdxl": 0, "chat": 0}
    ledger = Ledger(store, f"predict-{uuid.uuid4().hex[:6]}", "cpu", 10, queue_depth=lambda pool: depths[pool])
    held = ledger.reserve("chat", "qwen_instruct", 8, timeout=0)
    ledger.set_busy("chat", False)
    wan_slot = SimpleNamespace(model=None, default_mb=6)
    rt = SimpleNamespace(family="wan", ledger=ledger, settings=Settings(), models={"wan": wan_slot})
    assert predict(rt) == ["wan"]
    asked = ledger.pending_requests("chat")
    assert [(r.action, r.model, r.reason) for r in asked] == [("unload", "qwen_instruct", "predict")]
    depths["wan"] = 0
    assert predict(rt) == []  # nothing queued: nothing predicted
    held.release()


# -- the operator's CLI against a real bin/worker ------------------------------------


def celery_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``celery -A ourvidz_tasks ARGS`` as an operator runs it: a fresh process, the app alone."""
    return subprocess.run([str(ROOT / ".venv" / "bin" / "celery"), "-A", "ourvidz_tasks", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_celery_cli_against_a_real_worker(isolated_broker: str, sink: Sink, tmp_path: Path) -> None:
    """README: ``celery -A ourvidz_tasks inspect memory_status``; ``control model_unload`` unloads SDXL."""
    started = Pools(sink, tmp_path / "logs")
    # its own broker and node name: the session's sdxl pool (same default name) must not answer for it
    own = {"OURVIDZ_BROKER_URL": isolated_broker, "OURVIDZ_HOSTNAME": f"cli-{uuid.uuid4().hex[:6]}"}
    try:
        worker = started.start("sdxl", **own)
        env = worker_env(sink, "cli", **own)

        def status() -> dict[str, Any]:
            done = celery_cli(env, "inspect", "memory_status", "-d", worker.node, "-t", "30", "-j")
            assert done.returncode == 0, done.stdout + done.stderr
            return json.loads(done.stdout.strip().splitlines()[-1])[worker.node]

        st = status()
        assert st["worker"] == {"node": worker.node, "pool": "sdxl", "models": {"sdxl": True}}
        assert st["pools"]["sdxl"]["loaded"] is True and st["reserved_mb"] > 0

        done = celery_cli(env, "control", "model_unload", "sdxl", "-d", worker.node, "-t", "30")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "unload of sdxl on sdxl requested" in done.stdout
        # each look is a fresh CLI process (seconds on a busy machine); the pool serves it within a quarter second
        wait_for(lambda: status()["worker"]["models"] == {"sdxl": False}, 60, interval=0.5, what="sdxl unloaded")
        assert status()["pools"]["sdxl"]["loaded"] is False
    finally:
        started.stop()


def test_the_last_job_leaves_the_pool_idle_while_the_idle_timer_serves(store) -> None:
    """A job that ends while the idle timer's upkeep runs (the chat pool's task threads, or any pool's
    timer firing at that moment) still marks its pool idle: a pool left marked busy is never asked to
    unload, and a pool growing for its job waits on it until its memory wait runs out."""
    from ourvidz_tasks.runtime.between_jobs import job_entered, job_left
    from ourvidz_tasks.runtime.runtime import JobGate

    ledger = Ledger(store, f"gate-{uuid.uuid4().hex[:6]}", "cpu", 10)
    rt = SimpleNamespace(family="chat", ledger=ledger, gate=JobGate(), last_job_ended=0.0)
    job_entered(rt, marks_own_start=False)
    assert ledger.status()["pools"]["chat"]["busy"] is True
    assert rt.gate.claim() is False  # a job runs: no upkeep
    rt.gate.depth, rt.gate.serving = 1, True  # the timer's upkeep began just as the job was ending
    job_left(rt)
    assert ledger.status()["pools"]["chat"]["busy"] is False
    rt.gate.release()
    ledger.clear()
