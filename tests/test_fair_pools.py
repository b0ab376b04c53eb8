"""The fair order with real pools: one user's flood does not hold another's job back (issue 26).

A real ``bin/worker sdxl`` on a private broker: a Redis database of its own, or a RabbitMQ vhost of
its own (the pool relays the queue through the fair order in the store, a private Redis database
too). The first job of a flood is held at a gate in the worker (tests/faults.py), so the rest of the
flood queues behind it and every step waits on an event. The order the pool really served is read
back from the sink: each job's start callback.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.contract import keys, names
from ourvidz_tasks.services import fairness

from .faults import GATE, GATE_ENV, gate_entered
from .support.cluster import RedisServer, WorkerProcess
from .support.env import amqp_reachable
from .support.jobs import new_id, terminal, tiny_job
from .support.process import wait_for
from .support.rabbit import RABBITMQCTL, fresh_vhost, url
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


@dataclass
class Cluster:
    """Where the test publishes (``publish``), where the fair order lives (``store``), and the pool."""

    store: redis.Redis
    publish: Callable[[dict[str, Any]], object]
    start: Callable[[], WorkerProcess]
    queue: str  # the fair order's name (names.fair_queue)


@pytest.fixture(params=["redis", "rabbitmq"])
def cluster(request: pytest.FixtureRequest, start_worker: Callable[..., WorkerProcess], isolated_broker: str,
            gate: Path) -> Iterator[Cluster]:
    host = f"fair-{new_id()[:6]}"
    store = redis.Redis.from_url(isolated_broker)
    env = {"OURVIDZ_HOSTNAME": host, "OURVIDZ_PROMPT_POLICY": "tests.faults:gate_on_marker", GATE_ENV: str(gate)}
    started: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        started.append(start_worker("sdxl", **env))
        return started[-1]

    try:
        yield from _cluster(request.param, store, env, start, isolated_broker)
    finally:  # this test's pools end with it (a pool of a deleted vhost would reconnect to the next one's)
        for worker in started:
            worker.stop(signal.SIGKILL)


def _cluster(broker: str, store: redis.Redis, env: dict[str, str], start: Callable[[], WorkerProcess],
             isolated_broker: str) -> Iterator[Cluster]:
    if broker == "redis":
        env["OURVIDZ_BROKER_URL"] = isolated_broker
        yield Cluster(store, lambda job: publish(store, TASK, job, "sdxl"), start, "sdxl")
        return
    if not amqp_reachable() or not RABBITMQCTL:
        pytest.fail("RabbitMQ and rabbitmqctl are part of the test machine (bin/test's setup)")
    from celery import Celery

    with fresh_vhost("ourvidz_fair_test") as vhost:
        env.update(OURVIDZ_BROKER_URL=url(vhost), OURVIDZ_REDIS_URL=isolated_broker,
                   OURVIDZ_RESULT_BACKEND=isolated_broker)
        app = Celery("fair-publisher", set_as_current=False)
        app.config_from_object("ourvidz_tasks.celeryconfig")
        app.conf.update(broker_url=url(vhost), broker_transport=None, result_backend=isolated_broker)

        def send(job: dict[str, Any]) -> None:
            app.send_task(TASK, args=[job], queue="sdxl", argsrepr=f"({job['id']!r},)", kwargsrepr="{}")

        yield Cluster(store, send, start, names.ready_queue("sdxl"))


def start_order(sink: Sink, ids: list[str]) -> list[str]:
    """The jobs of ``ids`` in the order their first start callback arrived."""
    seen: list[str] = []
    for call in sink.callbacks():
        body = call["body"]
        if body["job_id"] in ids and body["job_id"] not in seen and body["status"] == "processing" \
                and "progress" not in (body.get("metadata") or {}):
            seen.append(body["job_id"])
    return seen


def flood_behind_gate(cluster: Cluster, gate: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Alice's gated job running, then 6 more of hers and one of Bob's waiting, all taken in."""
    held = job_of("alice", prompt=f"{GATE} the first of a flood")
    cluster.publish(held)
    wait_for(lambda: gate_entered(gate), 120, what="the gated job to run")
    flood = [job_of("alice") for _ in range(6)]
    late = job_of("bob")
    for j in [*flood, late]:
        cluster.publish(j)
    # taken in: on RabbitMQ one of them may already wait on the ready queue (picked, not started)
    wait_for(lambda: all(cluster.store.exists(keys.fair_job(j["id"])) for j in [*flood, late]), 60,
             what="the pool's intake to take the flood in")
    return held, flood, late


def handed(cluster: Cluster, flood: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The flood's jobs already out of the fair order (picked, not started): on RabbitMQ, what the
    relay published to the ready queue; the fair order has no say over those any more."""
    waiting = keys.fair(cluster.queue, "waiting")
    return [j for j in flood
            if cluster.store.zscore(waiting, cluster.store.hget(keys.fair_job(j["id"]), "member") or "") is None]


def served_fairly(cluster: Cluster, order: list[str], held: dict[str, Any], flood: list[dict[str, Any]],
                  late: dict[str, Any], out: list[dict[str, Any]]) -> None:
    """Alice's held job first, then hers already out of the fair order (``out``: on Redis none; on
    RabbitMQ what the relay handed to the ready queue before the gate opened), then Bob's, then the rest
    of hers in her order."""
    names_of = {held["id"]: "held", late["id"]: "bob", **{j["id"]: f"a{i}" for i, j in enumerate(flood)}}
    seen = [names_of[i] for i in order]  # readable in the assertion
    gone = [names_of[j["id"]] for j in out]
    assert len(gone) <= (0 if cluster.queue == "sdxl" else 2), (gone, seen)
    rest = [names_of[j["id"]] for j in flood if names_of[j["id"]] not in gone]
    assert seen == ["held", *gone, "bob", *rest], (gone, seen)


@pytest.mark.slow
def test_one_job_behind_anothers_flood_starts_next(cluster: Cluster, sink: Sink, gate: Path) -> None:
    cluster.start()
    held, flood, late = flood_behind_gate(cluster, gate)

    def where(j: dict[str, Any]) -> dict[str, Any]:
        return fairness.standing(cluster.store, j["id"], present=15)

    assert where(held)["state"] == "running"
    # Bob's job starts at the virtual time now: before every waiting job of Alice's, which are in her order
    positions = [where(j)["position"] for j in flood]
    assert where(late)["family"] == "sdxl" and positions == sorted(positions), (where(late), positions)
    if cluster.queue == "sdxl":
        assert where(late)["position"] == 0 and positions == [1, 2, 3, 4, 5, 6], (where(late), positions)
    else:  # the relay hands one message to the ready queue as soon as it is empty: maybe Alice's first
        assert where(late)["position"] <= 1, where(late)
    assert all(where(j)["waited_s"] >= 0 and where(j)["eta_s"] >= where(late)["eta_s"] for j in flood)
    out = handed(cluster, flood)
    (gate / "open").touch()
    ids = [held["id"], *(j["id"] for j in flood), late["id"]]
    for job_id in ids:
        assert terminal(sink, job_id)["status"] == "completed"
    served_fairly(cluster, start_order(sink, ids), held, flood, late, out)
    assert where(late) == {"state": "ended"}
    assert not cluster.store.exists(keys.fair_job(late["id"]))  # bounded: a job's entries go when it ends


@pytest.mark.slow
def test_the_fair_order_holds_through_a_pool_crash(cluster: Cluster, sink: Sink, gate: Path) -> None:
    pool = cluster.start()
    held, flood, late = flood_behind_gate(cluster, gate)
    out = handed(cluster, flood)
    pool.stop(signal.SIGKILL)  # mid-job, with the flood taken into the fair order
    (gate / "open").touch()
    cluster.start()  # a supervisor's restart under the same name: the held job comes back
    ids = [held["id"], *(j["id"] for j in flood), late["id"]]
    for job_id in ids:
        assert terminal(sink, job_id)["status"] == "completed"
    once_each(sink, ids[1:], "after a pool crash")  # the killed job started twice, and ended once:
    assert [c["body"]["status"] for c in sink.callbacks(held["id"])].count("completed") == 1
    # the crashed job kept its place (first again); Bob's still came before Alice's waiting ones
    served_fairly(cluster, start_order(sink, ids), held, flood, late, out)


@pytest.mark.slow
@pytest.mark.stress
def test_the_fair_order_holds_through_a_broker_restart(start_worker: Callable[..., WorkerProcess], sink: Sink,
                                                       gate: Path, tmp_path: Path) -> None:
    """Redis restarted (AOF, as docs/brokers.md asks) while the flood waits in the fair order: the order
    is the broker's, so it comes back with it; every job ends once, in the same fair order."""
    server = RedisServer(tmp_path / "redis").start()
    started: list[WorkerProcess] = []
    try:
        store = server.client()
        env = {"OURVIDZ_BROKER_URL": server.url(0), "OURVIDZ_HOSTNAME": f"fair-restart-{new_id()[:6]}",
               "OURVIDZ_PROMPT_POLICY": "tests.faults:gate_on_marker", GATE_ENV: str(gate)}
        def start() -> WorkerProcess:
            started.append(start_worker("sdxl", **env))
            return started[-1]

        cluster = Cluster(store, lambda job: publish(store, TASK, job, "sdxl"), start, "sdxl")
        cluster.start()
        held, flood, late = flood_behind_gate(cluster, gate)
        out = handed(cluster, flood)
        server.restart(down=1.0)
        (gate / "open").touch()
        ids = [held["id"], *(j["id"] for j in flood), late["id"]]
        once_each(sink, ids, "through a broker restart")
        served_fairly(cluster, start_order(sink, ids), held, flood, late, out)
        assert started[0].alive()
    finally:
        for worker in started:
            worker.stop(signal.SIGKILL)
        server.stop()
