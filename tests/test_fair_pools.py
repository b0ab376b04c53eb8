"""The fair order with real pools: one user's flood does not hold another's job back (issue 26).

A real ``bin/worker sdxl`` on a private broker database; the first job of a flood is held at a gate in
the worker (tests/faults.py), so the rest of the flood queues behind it and every step waits on an
event. The order the pool really served is read back from the sink: each job's start callback.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.contract import keys
from ourvidz_tasks.services import fairness

from .faults import GATE, GATE_ENV, gate_entered
from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal, tiny_job
from .support.process import wait_for
from .support.windows import once_each
from .wire import publish

TASK = "ourvidz.sdxl.generate"


def job_of(user: str, prompt: str = "a tiny harbour at dusk") -> dict[str, Any]:
    return {**tiny_job(steps=1, prompt=prompt), "user_id": user}


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    path = tmp_path / "gate"
    path.mkdir()
    return path


@pytest.fixture
def gated_pool(start_worker: Callable[..., WorkerProcess], isolated_broker: str, gate: Path) -> Iterator[Callable[[], WorkerProcess]]:
    host = f"fair-{new_id()[:6]}"

    def start() -> WorkerProcess:  # the same name each time: a restart after a crash
        return start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=host,
                            OURVIDZ_PROMPT_POLICY="tests.faults:gate_on_marker", **{GATE_ENV: str(gate)})

    yield start


def start_order(sink: Sink, ids: list[str]) -> list[str]:
    """The jobs of ``ids`` in the order their first start callback arrived."""
    seen: list[str] = []
    for call in sink.callbacks():
        body = call["body"]
        if body["job_id"] in ids and body["job_id"] not in seen and body["status"] == "processing" \
                and "progress" not in (body.get("metadata") or {}):
            seen.append(body["job_id"])
    return seen


def flood_behind_gate(broker: redis.Redis, gate: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Alice's gated job running, then 6 more of hers and one of Bob's waiting, all taken in."""
    held = job_of("alice", prompt=f"{GATE} the first of a flood")
    publish(broker, TASK, held, "sdxl")
    wait_for(lambda: gate_entered(gate), 120, what="the gated job to run")
    flood = [job_of("alice") for _ in range(6)]
    late = job_of("bob")
    for j in [*flood, late]:
        publish(broker, TASK, j, "sdxl")
    wait_for(lambda: all(broker.exists(keys.fair_job(j["id"])) for j in [*flood, late]), 60,
             what="the pool's intake to take the flood in")
    return held, flood, late


@pytest.mark.slow
def test_one_job_behind_anothers_flood_starts_next(gated_pool: Callable[[], WorkerProcess], isolated_broker: str,
                                                   sink: Sink, gate: Path) -> None:
    gated_pool()
    broker = redis.Redis.from_url(isolated_broker)
    held, flood, late = flood_behind_gate(broker, gate)

    def where(j: dict[str, Any]) -> dict[str, Any]:
        return fairness.standing(broker, j["id"], present=15)

    assert where(held)["state"] == "running"
    # Bob's job starts at the virtual time now: before every waiting job of Alice's, which are in her order
    assert where(late)["position"] == 0, where(late)
    assert [where(j)["position"] for j in flood] == [1, 2, 3, 4, 5, 6]
    assert all(where(j)["waited_s"] >= 0 and where(j)["eta_s"] >= where(late)["eta_s"] for j in flood)
    (gate / "open").touch()
    ids = [held["id"], *(j["id"] for j in flood), late["id"]]
    for job_id in ids:
        assert terminal(sink, job_id)["status"] == "completed"
    assert start_order(sink, ids) == [held["id"], late["id"], *(j["id"] for j in flood)]
    assert where(late) == {"state": "ended"}
    assert not broker.exists(keys.fair_job(late["id"]))  # bounded: a job's entries go when it ends


@pytest.mark.slow
def test_the_fair_order_holds_through_a_pool_crash(gated_pool: Callable[[], WorkerProcess], isolated_broker: str,
                                                   sink: Sink, gate: Path) -> None:
    pool = gated_pool()
    broker = redis.Redis.from_url(isolated_broker)
    held, flood, late = flood_behind_gate(broker, gate)
    pool.stop(signal.SIGKILL)  # mid-job, with the flood taken into the fair order
    (gate / "open").touch()
    gated_pool()  # the supervisor's restart under the same name hands the held job back at once
    ids = [held["id"], *(j["id"] for j in flood), late["id"]]
    for job_id in ids:
        assert terminal(sink, job_id)["status"] == "completed"
    once_each(sink, ids[1:], "after a pool crash")  # the killed job started twice, and ended once:
    assert [c["body"]["status"] for c in sink.callbacks(held["id"])].count("completed") == 1
    order = start_order(sink, ids)
    # the crashed job kept its place (first again); Bob's still came before Alice's waiting ones
    assert order == [held["id"], late["id"], *(j["id"] for j in flood)], order
