"""One GPU pod: ``bin/worker all`` runs the pools under supervisord (tools/supervise.py).

What a RunPod-style single container must do, seen from outside: a pool killed mid-job comes
back under its name and the job ends once; SIGTERM to the container lets the running job
finish and starts nothing new; a pool that cannot start makes the whole container exit 1.
Jobs are held at a gate in their worker (tests/faults.py), so each step waits on an event.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.contract.settings import load_settings
from ourvidz_tasks.services import fairness
from ourvidz_tasks.tools.supervise import CrashCounter, render

from .faults import GATE, GATE_ENV, gate_entered
from .support.env import worker_env
from .support.jobs import terminal, tiny_job
from .support.ports import free_port
from .support.process import ManagedProcess, wait_for
from .wire import publish


class Pod(ManagedProcess):
    """``bin/worker all``; ready when every pool of ``OURVIDZ_POD`` says ``ready.``."""

    name = "bin/worker all"
    ready_timeout = 300
    stop_timeout = 120

    def __init__(self, env: dict[str, str], log: Path) -> None:
        super().__init__([str(Path(__file__).resolve().parents[1] / "bin" / "worker"), "all"], env, log)

    def ready(self) -> bool:
        lines = self.text().splitlines()
        return all(any(line.startswith(f"{pool} | ") and " ready." in line for line in lines)
                   for pool in self.env["OURVIDZ_POD"].split(","))

    def signal(self, sig: int) -> None:
        """Signal the container's first process only, as ``docker stop`` does."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)


def gated(prompt: str = "a lighthouse") -> dict[str, object]:
    return tiny_job(steps=3, prompt=f"{prompt} {GATE}")


def descendant_pids(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


@pytest.fixture()
def pod_env(isolated_broker: str, sink: Sink, tmp_path: Path) -> Iterator[dict[str, str]]:
    gate = tmp_path / "gate"
    gate.mkdir()
    env = worker_env(sink, "sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_POD="sdxl",
                     OURVIDZ_POD_DIR=str(tmp_path / "pod"), OURVIDZ_PROMPT_POLICY="tests.faults:gate_on_marker",
                     OURVIDZ_LEASE_SECONDS="3", OURVIDZ_POD_START_SECONDS="5", **{GATE_ENV: str(gate)})
    yield env


def test_the_config_puts_every_pool_in_one_group_with_the_drain_bound() -> None:
    settings = load_settings(pod=("sdxl", "chat", "wan", "outbox"), drain_seconds=42)
    text = render(settings, Path("/tmp/pod"))
    assert "[group:pod]\nprograms=sdxl,chat,wan,outbox\n" in text  # SIGTERM reaches all at once
    for name in ("sdxl", "chat", "wan", "outbox"):
        section = text.split(f"[program:{name}]\n", 1)[1].split("\n\n", 1)[0]
        assert "stopwaitsecs=42\n" in section and "stopsignal=TERM" in section and "autorestart=false" in section
        assert f"ourvidz_tasks.tools.supervise tag {name} --" in section
    with pytest.raises(Exception, match="OURVIDZ_POD"):
        load_settings(pod="sdxl,gpu")


def test_a_crash_loop_backs_off_then_gives_up() -> None:
    now = [0.0]
    counter = CrashCounter(limit=4, window=60, clock=lambda: now[0])
    pauses = []
    for _ in range(3):
        count = counter.crashed("sdxl")
        pauses.append(counter.pause(count))
        assert not counter.exhausted(count)
        now[0] += 1
    assert pauses == [0.0, 1.0, 2.0]  # at once, then growing
    assert counter.exhausted(counter.crashed("sdxl"))
    now[0] += 120  # a crash long after the others starts the count again
    assert counter.crashed("sdxl") == 1 and counter.crashed("wan") == 1


@pytest.mark.slow
@pytest.mark.stress
def test_a_pool_killed_mid_job_comes_back_under_its_name_and_the_job_ends_once(
        pod_env: dict[str, str], sink: Sink, tmp_path: Path) -> None:
    gate = Path(pod_env[GATE_ENV])
    pod = Pod(pod_env, tmp_path / "pod.log").start()
    try:
        store = redis.Redis.from_url(pod_env["OURVIDZ_BROKER_URL"])
        job = gated()
        publish(store, "ourvidz.sdxl.generate", job, "sdxl")
        first = wait_for(lambda: gate_entered(gate), 120, what="the job to reach its worker")[0]
        assert first in descendant_pids(pod.proc.pid)  # type: ignore[union-attr]
        os.kill(first, signal.SIGKILL)
        # the watchdog starts sdxl again at once; the new incarnation hands the job back and runs it
        second = wait_for(lambda: gate_entered(gate)[1:], 240, what="the job to start again")[0]
        assert second != first and pod.alive()
        (gate / "open").touch()
        body = terminal(sink, str(job["id"]), 240)
        assert body["status"] == "completed", body
        time.sleep(1)  # a duplicate would be sent right after the first
        ends = [c["body"]["status"] for c in sink.callbacks(str(job["id"])) if c["body"]["status"] != "processing"]
        assert ends.count("completed") == 1 and "failed" not in ends
        assert "watchdog: sdxl exited" in pod.text() and "sdxl | " in pod.text()
    finally:
        pod.stop()


@pytest.mark.slow
def test_sigterm_lets_the_running_job_finish_and_starts_nothing_new(
        pod_env: dict[str, str], sink: Sink, tmp_path: Path) -> None:
    gate = Path(pod_env[GATE_ENV])
    pod = Pod(pod_env, tmp_path / "pod.log").start()
    store = redis.Redis.from_url(pod_env["OURVIDZ_BROKER_URL"])
    running, waiting = gated(), tiny_job()
    publish(store, "ourvidz.sdxl.generate", running, "sdxl")
    wait_for(lambda: gate_entered(gate), 120, what="the job to reach its worker")
    pod.signal(signal.SIGTERM)
    wait_for(lambda: "received SIGTERM" in pod.text(), 30, what="supervisord to take the SIGTERM")
    publish(store, "ourvidz.sdxl.generate", waiting, "sdxl")
    began = time.time()
    (gate / "open").touch()
    status = pod.wait(pod.stop_timeout)
    assert status == 0, pod.text()[-3000:]
    assert terminal(sink, str(running["id"]), 5)["status"] == "completed"
    assert sink.callbacks(str(waiting["id"])) == []  # nothing new started while draining
    # the waiting job is still the broker's: not taken in yet, in the fair order, or in unacked
    assert fairness.depth(store, "sdxl", "sdxl") + store.hlen("unacked") >= 1
    print(f"drained {time.time() - began:.1f}s after the gate opened")


@pytest.mark.slow
def test_a_pool_that_cannot_start_makes_the_pod_exit_non_zero(pod_env: dict[str, str], tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: the pool exits 69 after its startup wait
    env = {**pod_env, "OURVIDZ_BROKER_URL": dead, "OURVIDZ_STARTUP_WAIT": "1", "OURVIDZ_POD_START_SECONDS": "60",
           "OURVIDZ_POD_START_RETRIES": "1"}
    pod = Pod(env, tmp_path / "pod.log").launch()
    try:
        status = pod.wait(240)
    finally:
        pod.stop(signal.SIGKILL)
    assert status == 1, pod.text()[-3000:]
    assert "sdxl could not start" in pod.text()
    conf = env["OURVIDZ_POD_DIR"].encode()
    left = [p for p in Path("/proc").glob("[0-9]*") if conf in _cmdline(p)]
    assert not left  # supervisord and its programs went with the pod


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_bad_pod_setting_exits_2_naming_the_variable(pod_env: dict[str, str], tmp_path: Path) -> None:
    pod = Pod({**pod_env, "OURVIDZ_POD": "sdxl,gpu"}, tmp_path / "pod.log").launch()
    assert pod.wait(60) == 2
    assert "OURVIDZ_POD" in pod.text()

