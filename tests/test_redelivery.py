"""A job runs once while its worker lives: through a lapsed heartbeat under load and through
kombu's redelivery of a live job's message (issue 24, defects 1 and 2).

Both windows are driven by job events (``tests.faults:broker_windows`` holds the worker after a
step until the test lets it go), and both count what the edge saw: start callbacks, uploads and
terminal callbacks per job, not only terminal ones, and the job's poison count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.contract import keys
from ourvidz_tasks.contract.text import as_text

from .support.cluster import Pools, WorkerProcess
from .support.jobs import new_id, terminal, terminal_counts
from .support.process import held_stopped, wait_for
from .support.windows import held_job, starts, uploads

LEASE = 2.0


def _alive_key(store: redis.Redis, worker: WorkerProcess) -> str | None:
    found = list(store.scan_iter(f"{keys.ALIVE_PREFIX}{worker.node}/*"))
    return found[0].decode() if found else None


def _refreshes(store: redis.Redis, key: str, count: int, timeout: float = 60) -> None:
    """Wait until heartbeat ``key`` was refreshed ``count`` times (its TTL went up): that worker's
    recovery loop (beat, then scan) ran that many times."""
    seen, last = 0, store.pttl(key)

    def refreshed() -> bool:
        nonlocal seen, last
        now = store.pttl(key)
        seen += now > last
        last = now
        return seen >= count

    wait_for(refreshed, timeout, interval=0.05, what=f"{count} refreshes of {key}")


def _once(sink: Sink, store: redis.Redis, job_id: str, what: str) -> None:
    body = terminal(sink, job_id, 180)
    begun, stored = starts(sink, job_id), uploads(sink, job_id)
    ended = terminal_counts(sink, [job_id])[job_id]
    deliveries = int(store.get(keys.deliveries(job_id, 0)) or 0)
    print(f"{what}: {begun} start callback(s), {stored} upload(s), {ended} terminal callback(s) "
          f"({body['status']}), poison count {deliveries}")
    assert body["status"] == "completed", body.get("error")
    assert (begun, stored, ended) == (1, 2, 1)
    assert deliveries == 1


@pytest.mark.slow
@pytest.mark.stress
def test_a_stalled_worker_keeps_its_job_and_its_poison_count(isolated_broker: str, pools: Pools, sink: Sink,
                                                             tmp_path: Path) -> None:
    """A worker SIGSTOPped mid-job longer than its lease (what a full ``gc.collect`` under load 10
    does to its heartbeat thread) is alive: another pool's scanner must not requeue its job."""
    store = redis.Redis.from_url(isolated_broker)
    held = held_job(pools, isolated_broker, tmp_path / "windows", "stall", LEASE)  # held after its step 2
    stalled, scanner, job = held.holder, held.other, held.job
    assert stalled.proc is not None
    heartbeat = wait_for(lambda: _alive_key(store, stalled), 30, what="the stalled pool's heartbeat")
    with held_stopped(stalled.proc.pid, group=True):
        held.windows.release(0)  # it goes on only once continued
        wait_for(lambda: not store.exists(heartbeat), 10 * LEASE, interval=0.05, what="the lease to lapse")
        # the other pool's scanner runs three times with the stalled owner's heartbeat gone
        _refreshes(store, wait_for(lambda: _alive_key(store, scanner), 30, what="the scanner's heartbeat"), 3)
    _once(sink, store, job["id"], f"1 job, its pool stopped past its {LEASE:g}s lease")
    assert "requeued" not in stalled.text() + scanner.text()


@pytest.mark.slow
@pytest.mark.stress
def test_a_live_jobs_message_restored_by_kombu_does_not_start_again(isolated_broker: str, pools: Pools, sink: Sink,
                                                                    tmp_path: Path) -> None:
    """kombu puts a connection's unacked messages back on their queue when it reconnects, while their
    job still runs (here: kombu's own ``restore_by_tag`` while the job stands after its step 2). The
    other pool receives the copy: it must not start the job, and the copy must not count as a death."""
    from kombu import Connection

    store = redis.Redis.from_url(isolated_broker)
    held = held_job(pools, isolated_broker, tmp_path / "windows", "restore", LEASE)  # held after its step 2
    runner, other, job = held.holder, held.other, held.job
    tags = [as_text(t) for t in store.hkeys("unacked")]
    assert len(tags) == 1, tags
    with Connection(isolated_broker) as conn:
        conn.default_channel.qos.restore_by_tag(tags[0], leftmost=True)  # what a reconnect does
    received = f"generate[{held.task_id}] received"
    wait_for(lambda: received in other.text(), 60, what="the other pool to receive the restored copy")
    # it either lets the copy go (and it comes back later) or starts the job a second time
    wait_for(lambda: "comes back in" in other.text() or starts(sink, job["id"]) > 1, 60, what="the copy handled")
    held.windows.release(0)
    _once(sink, store, job["id"], "1 job, its message restored by kombu while it ran")
    # the copy comes back once the job ended, finds its terminal record and is dropped
    wait_for(lambda: "already ended" in runner.text() + other.text(), 60, what="the copy to come back and be dropped")
    _once(sink, store, job["id"], "after the copy came back")


# -- the rules, in-process -------------------------------------------------------------------------


def test_an_owner_is_gone_only_with_proof(isolated_broker: str) -> None:
    """liveness.owner_gone: a newer incarnation, no beat record, a dead process on this host, or
    silence past the judge's threshold on another host; a live process here is never gone."""
    import json
    import subprocess
    import sys

    from ourvidz_tasks.runtime.liveness import HOST, now_on, owner_gone, write_beat

    store = redis.Redis.from_url(isolated_broker)
    tag = new_id()[:6]
    me = f"sdxl@here-{tag}/aaaa"
    write_beat(store, me, 60)  # this process, no heartbeat key (lapsed): alive all the same
    assert not owner_gone(store, me, silence=0.0)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = f"sdxl@gone-{tag}/bbbb"
    store.set(keys.beat(dead), json.dumps({"t": now_on(store), "host": HOST, "pid": child.pid, "start": None}))
    store.set(keys.alive(dead), "1", ex=60)  # a heartbeat left behind by a SIGKILLed process
    assert owner_gone(store, dead, silence=None)
    store.set(keys.incarnation(f"sdxl@here-{tag}"), "cccc")
    assert owner_gone(store, me, silence=None)  # its node restarted under the same name
    assert owner_gone(store, f"sdxl@never-{tag}/dddd", silence=None)  # never beat
    far = f"sdxl@far-{tag}/eeee"
    store.set(keys.beat(far), json.dumps({"t": now_on(store) - 10, "host": "elsewhere/pid:[1]", "pid": 1}))
    assert not owner_gone(store, far, silence=None)  # a stalled judge does not judge by silence
    assert not owner_gone(store, far, silence=20.0)
    assert owner_gone(store, far, silence=5.0)
    store.set(keys.alive(far), "1", ex=60)
    assert not owner_gone(store, far, silence=5.0)


def test_a_stalled_scanner_does_not_judge_by_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    from ourvidz_tasks.runtime import liveness

    clock = [100.0]
    monkeypatch.setattr(liveness.time, "monotonic", lambda: clock[0])
    silence = liveness.Silence(lease=3.0, period=1.0)
    clock[0] += 1.0
    assert silence.tick() == 6.0  # on time: two leases
    clock[0] += 1.5
    assert silence.tick() == 6.5  # half a period late: the margin grows by what it missed
    clock[0] += 5.0
    assert silence.tick() is None  # four periods late: this scanner was stalled, it does not judge


def test_an_outage_is_waited_out_and_then_given_up() -> None:
    from ourvidz_tasks.services.outage import BrokerAway, is_outage, through_outage

    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise redis.ConnectionError("Connection refused")
        return "ok"

    assert through_outage(flaky, 60, "test", sleep=lambda _: None) == "ok" and len(calls) == 3

    def away() -> None:
        raise redis.TimeoutError("timed out")

    with pytest.raises(BrokerAway):
        through_outage(away, 0, "test", sleep=lambda _: None)
    try:
        try:
            raise redis.ConnectionError("down")
        except redis.ConnectionError as exc:
            raise ValueError("wrapped") from exc
    except ValueError as wrapped:
        assert is_outage(wrapped)
    assert not is_outage(ValueError("a job's own error"))
