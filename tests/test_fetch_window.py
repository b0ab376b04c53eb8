"""kombu's fetch → ``unacked`` window on a Redis broker (docs/brokers.md, *Redis*).

kombu's Redis transport pops a message with ``BRPOP`` and records it in the
``unacked`` hash with a second command: in between, only the popping process
holds it. Our guard's fetch moves it atomically into a processing list of the
consuming incarnation instead (``ourvidz:fetching:...``) and takes it out of
there in the same transaction that records it in ``unacked``. The fault seam
(:func:`tests.faults.cut_fetch`) fires exactly in that window, on one task's
message: the connection is cut (the record's write fails), or the worker dies.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from devtools.sink import Sink
from ourvidz_tasks.contract import keys
from ourvidz_tasks.contract.text import as_text

from .support.cluster import Pools, RedisServer
from .support.jobs import TASK, new_id, terminal, terminal_counts, tiny_job
from .support.process import wait_for
from .wire import publish

LEASE = "2"


def _env(server: RedisServer, flag: Path, fault: str) -> dict[str, str]:
    url = server.url(0)
    return dict(OURVIDZ_BROKER_URL=url, OURVIDZ_REDIS_URL=url, OURVIDZ_LEASE_SECONDS=LEASE,
                OURVIDZ_RUNTIME_PLUGINS="tests.faults:cut_fetch", OURVIDZ_TEST_FETCH_FAULT=fault,
                OURVIDZ_TEST_FAULT_FLAG=str(flag))


def _in_flight(server: RedisServer) -> dict[str, int]:
    client = server.client()
    lists = [k for k in client.scan_iter(match="ourvidz:fetching:*")]
    return {"queued": int(client.llen("sdxl")), "unacked": int(client.hlen("unacked")),
            "fetching": sum(int(client.llen(k)) for k in lists)}


@pytest.mark.slow
@pytest.mark.stress
def test_connection_cut_between_fetch_and_unacked_record_loses_no_job(tmp_path: Path, pools: Pools,
                                                                      sink: Sink) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        cut = str(uuid.uuid4())
        flag = tmp_path / "fired"
        worker = pools.start("sdxl", OURVIDZ_HOSTNAME=f"cut-{new_id()[:6]}", **_env(server, flag, f"cut:{cut}"))
        client = server.client()
        jobs = [tiny_job(steps=2) for _ in range(3)]
        for n, job in enumerate(jobs):
            publish(client, TASK, job, "sdxl", **({"task_id": cut} if n == 1 else {}))
        ids = [j["id"] for j in jobs]
        bodies = {job_id: terminal(sink, job_id, 180) for job_id in ids}
        wait_for(lambda: _in_flight(server) == {"queued": 0, "unacked": 0, "fetching": 0}, 30,
                 what="nothing left queued, unacked or fetching")
        assert flag.read_text() == "cut"  # the fault fired in the window
        assert {k: v["status"] for k, v in bodies.items()} == dict.fromkeys(ids, "completed"), bodies
        assert terminal_counts(sink, ids) == dict.fromkeys(ids, 1)
        assert worker.alive() and "Connection to broker lost" in worker.text()
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.stress
def test_worker_killed_between_fetch_and_unacked_record_loses_no_job(tmp_path: Path, pools: Pools,
                                                                     sink: Sink) -> None:
    """The popping process dies holding the message: no memory of it survives, the broker must."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        doomed = str(uuid.uuid4())
        flag = tmp_path / "fired"
        env = _env(server, flag, f"die:{doomed}")
        victim = pools.start("sdxl", OURVIDZ_HOSTNAME=f"die-{new_id()[:6]}", **env)
        client = server.client()
        job = tiny_job(steps=2)
        publish(client, TASK, job, "sdxl", task_id=doomed)
        wait_for(lambda: not victim.alive(), 120, what="the worker to die in the fetch window")
        assert flag.read_text() == "die"
        held = _in_flight(server)
        # the message is on the broker, in the dead incarnation's processing list (before: nowhere)
        assert held == {"queued": 0, "unacked": 0, "fetching": 1}, held
        # another pool (another node) judges the dead incarnation by its heartbeat and hands the message back
        survivor = pools.start("sdxl", OURVIDZ_HOSTNAME=f"survivor-{new_id()[:6]}", **env)
        body = terminal(sink, job["id"], 180)
        wait_for(lambda: _in_flight(server) == {"queued": 0, "unacked": 0, "fetching": 0}, 30,
                 what="nothing left queued, unacked or fetching")
        assert body["status"] == "completed", body
        assert terminal_counts(sink, [job["id"]]) == {job["id"]: 1}
        assert "never recorded, back on sdxl" in survivor.text() and survivor.alive()
        # the dead incarnation's lists are forgotten; the survivor's own are registered
        registered = [as_text(k) for k in client.hkeys(keys.FETCHERS)]
        assert registered and all(k.startswith(keys.FETCHING_PREFIX + survivor.node) for k in registered), registered
    finally:
        server.stop()
