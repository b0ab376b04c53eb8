"""The fair order's scripts on a real Redis: intake, pick, finish and where a job stands (issue 26).

The consumer and the intake here are the library's own (:mod:`ourvidz_tasks.services.fairness`)
driven step by step on the test run's broker database, with messages published exactly as the edge
function publishes them (``tests/wire.py``). The pools' use of it runs in ``test_fair_pools.py``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from ourvidz_tasks.contract import keys
from ourvidz_tasks.contract.errors import ConfigError
from ourvidz_tasks.services import fairness, fetching
from ourvidz_tasks.services.fairness import Intake

from . import wire
from .support.env import BROKER

TASK = "ourvidz.sdxl.generate"


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(BROKER)
    queue = f"fairtest{uuid.uuid4().hex[:8]}"
    client.ourvidz_queue = queue  # type: ignore[attr-defined]
    yield client
    for key in client.scan_iter(f"*{queue}*"):
        client.delete(key)
    client.close()


def job(user: str, seconds: float = 1.0) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "type": "sdxl_image_fast", "prompt": "p", "user_id": user,
            "config": {"num_inference_steps": seconds}}


def intake(client: redis.Redis, queue: str, owner: str = "pool@test/1", weigh: fairness.Weigh | None = None) -> Intake:
    # the job's cost is its steps here: the test states what each job costs
    return Intake(client, owner, [queue], estimate=lambda q, j: float(j["config"]["num_inference_steps"]),
                  weigh=weigh or (lambda user: 1.0), ttl=3600)


def take_all(taker: Intake) -> int:
    """What an intake's thread does: take in until the queue is empty (a batch at a time)."""
    total = 0
    while (moved := taker.run_once()) > 0:
        total += moved
    return total


def publish(client: redis.Redis, queue: str, jobs: list[dict[str, Any]]) -> None:
    for j in jobs:
        wire.publish(client, TASK, j, queue)


def pick(client: redis.Redis, queue: str, consumer: str = "pool@test/1") -> dict[str, Any] | None:
    """One fetch as the pools' transport sends it; the job it picked (taken out of the processing list)."""
    reply = client.execute_command(*fairness.pick_command(consumer, [queue], present=15, keep=7200))
    if not reply:
        return None
    client.lrem(keys.fetching(consumer, queue), 1, reply[1])
    _, picked = fairness.describe(reply[1])
    return picked


def drain(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    out = []
    while (picked := pick(client, queue)) is not None:
        out.append(picked)
    return out


def test_one_job_behind_a_flood_starts_after_one_job_of_the_flood(broker: redis.Redis) -> None:
    queue = broker.ourvidz_queue  # type: ignore[attr-defined]
    flood = [job("alice") for _ in range(50)]
    late = job("bob")
    publish(broker, queue, [*flood, late])
    assert take_all(intake(broker, queue)) == 51
    order = [j["id"] for j in drain(broker, queue)]
    assert order.index(late["id"]) == 1, order[:4]
    assert [i for i in order if i != late["id"]] == [j["id"] for j in flood]  # each user's own order kept


def test_four_flooding_users_share_gpu_seconds_by_weight(broker: redis.Redis) -> None:
    queue = broker.ourvidz_queue  # type: ignore[attr-defined]
    costs = {"u1": 1.0, "u2": 4.0, "u3": 10.0, "u4": 2.0}  # a video costs what several images do
    publish(broker, queue, [job(u, c) for _ in range(40) for u, c in costs.items()])
    take_all(intake(broker, queue, weigh=lambda user: 2.0 if user == "u4" else 1.0))
    served: dict[str, float] = dict.fromkeys(costs, 0.0)
    budget = 200.0  # GPU-seconds served while every user still has jobs waiting
    while budget > 0:
        picked = pick(broker, queue)
        assert picked is not None
        served[picked["user_id"]] += costs[picked["user_id"]]
        budget -= costs[picked["user_id"]]
    share = {u: served[u] / (2.0 if u == "u4" else 1.0) for u in served}  # per unit of weight
    fair = sum(share.values()) / len(share)
    assert all(abs(s - fair) <= 0.1 * fair + max(costs.values()) for s in share.values()), served


def test_where_a_job_stands_stays_exact_as_jobs_come_and_go(broker: redis.Redis) -> None:
    queue = broker.ourvidz_queue  # type: ignore[attr-defined]
    jobs = [job("alice", 2.0) for _ in range(3)] + [job("bob", 2.0)]
    publish(broker, queue, jobs)
    intake(broker, queue).run_once()
    ids = [j["id"] for j in jobs]

    def stand(job_id: str) -> dict[str, Any]:
        return fairness.standing(broker, job_id, present=15)

    # fair order: alice0 bob alice1 alice2
    assert [stand(i)["position"] for i in ids] == [0, 2, 3, 1]
    assert stand(ids[3])["eta_s"] == pytest.approx(2.0, abs=0.1)  # one 2 s job ahead, no pool running yet
    first = pick(broker, queue)
    assert first is not None and first["id"] == ids[0]
    handed = stand(ids[0])
    assert handed == {"state": "queued", "family": queue, "waited_s": handed["waited_s"],
                      "position": 0, "ahead": 0, "eta_s": 0}  # handed to a pool, not started
    assert fairness.started(broker, queue, ids[0]) == pytest.approx(stand(ids[0])["waited_s"], abs=0.5)
    assert stand(ids[0])["state"] == "running"
    assert [stand(i)["position"] for i in ids[1:]] == [1, 2, 0]
    # the running job counts: bob is next, after what is left of alice's running job
    assert 1.5 < stand(ids[3])["eta_s"] <= 2.0
    broker.set(keys.job_final(ids[0]), json.dumps({"status": "completed"}))
    fairness.finished(broker, queue, ids[0], 2.0)
    assert stand(ids[0]) == {"state": "ended"}
    assert stand("no-such-job") == {"state": "unknown"}
    broker.delete(keys.job_final(ids[0]))


def test_a_job_published_before_its_pool_takes_it_in_is_queued_behind_the_fair_order(isolated_broker: str) -> None:
    client = redis.Redis.from_url(isolated_broker)
    ordered = [job("alice", 2.0) for _ in range(2)]
    publish(client, "sdxl", ordered)
    intake(client, "sdxl").run_once()
    listed = [job("bob", 2.0) for _ in range(3)]
    publish(client, "sdxl", listed)  # no pool running: these stay on the family list
    for n, j in enumerate(listed):
        where = fairness.standing(client, j["id"], present=15)
        assert where == {"state": "queued", "family": "sdxl", "position": 2 + n, "ahead": 2 + n,
                         "eta_s": pytest.approx((2 + n) * 2.0, abs=0.01), "waited_s": 0}, where
    assert fairness.standing(client, "not-" + listed[0]["id"], present=15) == {"state": "unknown"}
    # being taken in: moved into an intake's list, not admitted yet (what an intake's GRAB leaves between
    # its two scripts); behind the fair order still
    taker = intake(client, "sdxl", owner="pool@test/2")
    fetching.restore_own(client, fairness.intake_lists(taker.owner), taker.sources, owner=taker.owner)
    client.lmove("sdxl", taker.lists[0], "RIGHT", "LEFT")
    assert fairness.standing(client, listed[0]["id"], present=15) == {
        "state": "queued", "family": "sdxl", "position": 2, "ahead": 2, "eta_s": pytest.approx(4.0, abs=0.01),
        "waited_s": 0}
    taker.run_once()  # taken in: the fair order's answer, bob's first job next
    assert fairness.standing(client, listed[0]["id"], present=15)["position"] == 1
    assert [fairness.standing(client, j["id"], present=15)["position"] for j in listed[1:]] == [3, 4]


def test_a_requeued_job_keeps_its_place(broker: redis.Redis) -> None:
    queue = broker.ourvidz_queue  # type: ignore[attr-defined]
    jobs = [job("alice") for _ in range(3)] + [job("bob") for _ in range(3)]
    publish(broker, queue, jobs)
    taker = intake(broker, queue)
    taker.run_once()
    reply = broker.execute_command(*fairness.pick_command("pool@test/1", [queue], present=15, keep=7200))
    first = fairness.describe(reply[1])[1]
    assert first is not None and first["id"] == jobs[0]["id"]
    # the pool died with it: recovery puts the message back on the queue; taken in again, it is first again
    fetched = keys.fetching("pool@test/1", queue)
    broker.lmove(fetched, queue, "LEFT", "RIGHT")
    publish(broker, queue, [job("carol")])
    taker.run_once()
    assert fairness.standing(broker, jobs[0]["id"], present=15)["position"] == 0
    assert [j["id"] for j in drain(broker, queue)][:1] == [jobs[0]["id"]]


def test_what_the_intake_held_goes_back_when_its_pool_is_gone(broker: redis.Redis) -> None:
    queue = broker.ourvidz_queue  # type: ignore[attr-defined]
    jobs = [job("alice") for _ in range(2)]
    publish(broker, queue, jobs)
    owner = "pool@test/dead"
    lists = keys.fetching(fairness.intake_lists(owner), queue)
    # the move happened, the admit never did (the process died in between)
    broker.lmove(queue, lists, "RIGHT", "LEFT")
    fairness.fetching.restore_own(broker, fairness.intake_lists(owner), fairness.sources(queue), owner=owner)
    assert broker.llen(queue) == 2 and broker.llen(lists) == 0
    broker.lmove(queue, lists, "RIGHT", "LEFT")
    restored = fairness.fetching.restore_dead(broker, lambda o: o == owner)
    assert restored == 1 and broker.llen(queue) == 2


def test_foreign_items_and_jobs_without_user_are_served_too(broker: redis.Redis) -> None:
    queue = broker.ourvidz_queue  # type: ignore[attr-defined]
    broker.lpush(queue, b"not json at all")
    publish(broker, queue, [{"id": "x1", "type": "sdxl_image_fast", "config": {"num_inference_steps": 1}}])
    intake(broker, queue).run_once()
    reply1 = broker.execute_command(*fairness.pick_command("c/1", [queue], present=15, keep=7200))
    reply2 = broker.execute_command(*fairness.pick_command("c/1", [queue], present=15, keep=7200))
    assert {bytes(reply1[1]), bytes(reply2[1])} >= {b"not json at all"}
    assert fairness.waiting_by_user(broker, queue) == ({}, 0)


def test_waiting_by_user_counts_each_users_jobs(broker: redis.Redis) -> None:
    queue = broker.ourvidz_queue  # type: ignore[attr-defined]
    publish(broker, queue, [job("alice"), job("alice"), job("bob")])
    intake(broker, queue).run_once()
    publish(broker, queue, [job("carol")])
    assert fairness.waiting_by_user(broker, queue) == ({"alice": 2, "bob": 1}, 1)


def test_a_message_the_relay_takes_in_twice_is_admitted_once(broker: redis.Redis) -> None:
    """RabbitMQ gives back a message whose ack was lost after it was taken in (and maybe already
    picked): the relay's tags name messages for good, so the second copy is dropped."""
    queue = broker.ourvidz_queue  # type: ignore[attr-defined]
    taker = intake(broker, queue)
    item = json.dumps(wire.envelope(TASK, [job("alice")], queue)).encode()

    def take_in() -> int:
        with broker.pipeline(transaction=True) as pipe:  # as the relay's take does
            pipe.lpush(taker.lists[0], item)
            pipe.eval(*taker.admit_command(queue, [(queue, item)], once=True))
            return int(pipe.execute()[-1])

    assert take_in() == 1
    assert take_in() == 0  # waiting already
    assert pick(broker, queue) is not None
    assert take_in() == 0  # picked already: still the same message
    assert pick(broker, queue) is None and broker.llen(taker.lists[0]) == 0


def test_a_retried_job_keeps_its_place_and_a_chain_moves_the_job_to_its_next_queue(broker: redis.Redis) -> None:
    queue = broker.ourvidz_queue  # type: ignore[attr-defined]
    first, other = job("alice"), job("bob")
    publish(broker, queue, [first, other])
    taker = intake(broker, queue)
    taker.run_once()
    assert pick(broker, queue)["id"] == first["id"]  # type: ignore[index]
    fairness.started(broker, queue, first["id"])
    publish(broker, queue, [job("bob"), job("carol")])
    # Celery's retry: the same job in a new message (a new delivery tag), published after the others
    wire.publish(broker, TASK, first, queue)
    taker.run_once()
    where = fairness.standing(broker, first["id"], present=15)
    assert where["state"] == "queued" and where["position"] == 0, where
    # an enhance -> generate chain: the job's next step is taken in on the generate queue
    nxt = f"{queue}next"
    try:
        wire.publish(broker, TASK, first, nxt)
        intake(broker, nxt).run_once()
        assert fairness.standing(broker, first["id"], present=15)["family"] == nxt
    finally:
        for key in broker.scan_iter(f"*{nxt}*"):
            broker.delete(key)


def test_tiers_and_a_plug_in_weigh_users(broker: redis.Redis) -> None:
    broker.hset(keys.FAIR_TIERS, mapping={"pro-user": "pro", "odd-user": "gold"})
    try:
        weigh = fairness.load_weights("pro=4, free=1", broker)
        assert (weigh("pro-user"), weigh("odd-user"), weigh("nobody"), weigh("")) == (4.0, 1.0, 1.0, 1.0)
    finally:
        broker.hdel(keys.FAIR_TIERS, "pro-user", "odd-user")
    assert fairness.load_weights("", broker)("anyone") == 1.0
    assert fairness.load_weights("tests.test_fairness:double", broker)("x") == 2.0
    with pytest.raises(ConfigError, match="OURVIDZ_FAIR_WEIGHTS"):
        fairness.load_weights("no.such.module:weigh", broker)


def double(user: str) -> float:
    """A weight plug-in (``module:callable``): every user weighs 2."""
    return 2.0


def test_a_relay_restarted_under_its_name_puts_back_what_it_had_picked(broker: redis.Redis) -> None:
    """RabbitMQ: a pool died between its pick and the publish; its successor re-admits the message, in place."""
    from ourvidz_tasks.services.fair_relay import Relay

    queue = broker.ourvidz_queue  # type: ignore[attr-defined]
    first, second = job("alice"), job("bob")
    publish(broker, queue, [first, second])
    taker = intake(broker, queue, owner="relay@test")
    taker.run_once()
    broker.execute_command(*fairness.pick_command("relay@test", [queue], present=15, keep=7200))  # then it died
    relay = Relay("amqp://unused", broker, "relay@test", intake=taker, source=None, ready=None,  # type: ignore[arg-type]
                  present=15, keep=7200)
    assert relay.readmit() == 1 and broker.llen(keys.fetching("relay@test", queue)) == 0
    assert fairness.standing(broker, first["id"], present=15)["position"] == 0
