"""Redis Sentinel: ``sentinel://`` for the broker, the result backend and our own Redis clients.

A local primary, a replica and a sentinel (``redis-server --sentinel``), each a
private ``redis-server`` on a free loopback port. An SDXL pool and an outbox
consumer run with every URL ``sentinel://``; jobs stream in, the primary is
SIGKILLed mid-stream, the sentinel promotes the replica, and the workers and
the outbox reconnect to it. Every job that completes has exactly one terminal
callback; what asynchronous replication lost in the failover window is counted
and printed (the README and docs/brokers.md quote it).
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
from ourvidz_tasks.contract.errors import ConfigError
from ourvidz_tasks.contract.settings import Settings
from ourvidz_tasks.services.redis_client import connect, parse_sentinel

from .support.cluster import Pools, RedisServer, WorkerProcess
from .support.jobs import new_id, terminal_counts, tiny_job
from .support.ports import free_port
from .support.process import ManagedProcess, wait_for
from .wire import publish

MASTER = "ourvidz-test"
#: the sentinel declares the primary down after this long without an answer
DOWN_AFTER_MS = 1000
TASK = "ourvidz.sdxl.generate"


def test_sentinel_urls_parse_and_bad_ones_are_named() -> None:
    parsed = parse_sentinel("sentinel://:pw@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://10.0.0.3:26380")
    assert parsed.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert parsed.db == 2 and parsed.password == "pw"
    for bad in ("sentinel://", "redis://h:1;sentinel://h:2", "sentinel://h:26379/zero"):
        with pytest.raises(ConfigError, match="sentinel"):
            parse_sentinel(bad)
    # the URL is accepted as the broker, and a Redis broker's derived URLs follow it
    settings = Settings(broker_url="sentinel://127.0.0.1:26379/0")
    assert settings.broker_is_redis and settings.redis == settings.backend == settings.broker_url


class SentinelServer(ManagedProcess):
    """``redis-server --sentinel`` watching ``primary`` under the group name :data:`MASTER`."""

    name = "redis sentinel"

    def __init__(self, directory: Path, primary: RedisServer) -> None:
        self.dir, self.port = directory, free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "sentinel.conf"  # the sentinel rewrites it: a file of its own
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 1\n"
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} 10000\nsentinel parallel-syncs {MASTER} 1\n")
        super().__init__(["redis-server", str(conf), "--sentinel"], dict(os.environ), self.dir / "sentinel.out")
        self.client = redis.Redis(port=self.port, socket_connect_timeout=1, decode_responses=True)

    def url(self, db: int = 0) -> str:
        return f"sentinel://127.0.0.1:{self.port}/{db}"

    def primary(self) -> tuple[str, int] | None:
        try:
            found = self.client.sentinel_get_master_addr_by_name(MASTER)
        except redis.RedisError:
            return None
        return (found[0], int(found[1])) if found else None

    def replicas(self) -> list[dict[str, object]]:
        try:
            return list(self.client.sentinel_slaves(MASTER))
        except redis.RedisError:
            return []


class Group:
    def __init__(self, primary: RedisServer, replica: RedisServer, sentinel: SentinelServer) -> None:
        self.primary, self.replica, self.sentinel = primary, replica, sentinel


@pytest.fixture()
def group(tmp_path: Path) -> Iterator[Group]:
    primary = RedisServer(tmp_path / "primary").start()
    replica = RedisServer(tmp_path / "replica")
    replica.start()
    replica.client().replicaof("127.0.0.1", primary.port)
    wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up", 30,
             what="the replica to sync")
    sentinel = SentinelServer(tmp_path / "sentinel", primary).launch()
    wait_for(lambda: sentinel.primary() == ("127.0.0.1", primary.port), 30, what="the sentinel to see the primary")
    wait_for(lambda: any(int(str(r.get("port"))) == replica.port for r in sentinel.replicas()), 60,
             what="the sentinel to find the replica")
    try:
        yield Group(primary, replica, sentinel)
    finally:
        sentinel.stop()
        for server in (replica, primary):
            server.stop(signal.SIGKILL)


@pytest.mark.slow
def test_primary_killed_mid_stream_sentinel_promotes_and_no_job_ends_twice(group: Group, pools: Pools,
                                                                             sink: Sink) -> None:
    url = group.sentinel.url()
    settings = Settings(broker_url=url, sentinel_master=MASTER)
    env = dict(OURVIDZ_BROKER_URL=url, OURVIDZ_REDIS_URL=url, OURVIDZ_RESULT_BACKEND=url,
               OURVIDZ_SENTINEL_MASTER=MASTER, OURVIDZ_LEASE_SECONDS="3")
    tag = new_id()[:6]
    outbox = pools.start("outbox", OURVIDZ_HOSTNAME=f"sentinel-outbox-{tag}", **env)
    worker: WorkerProcess = pools.start("sdxl", OURVIDZ_HOSTNAME=f"sentinel-sdxl-{tag}", **env)
    store = connect(url, settings)
    assert store.connection_pool.connection_kwargs.get("port") is None  # resolved through the sentinel
    assert store.info("server")["tcp_port"] == group.primary.port

    jobs: list[str] = []

    def send(n: int) -> None:
        for _ in range(n):
            job = tiny_job(steps=2)
            publish(store, TASK, job, "sdxl")
            jobs.append(job["id"])

    # the stream: a first batch; once some have ended and others wait or run, the primary dies
    send(8)
    wait_for(lambda: sum(terminal_counts(sink, jobs).values()) >= 2, 180, what="the first jobs to end")
    ended_before = {j for j, n in terminal_counts(sink, jobs).items() if n}
    in_flight = len(jobs) - len(ended_before)
    killed_at = time.monotonic()
    group.primary.stop(signal.SIGKILL)
    send(4)  # published while the sentinel elects: the client retries until the new primary answers
    promoted = wait_for(lambda: group.sentinel.primary() == ("127.0.0.1", group.replica.port) and time.monotonic(),
                        60, what="the sentinel to promote the replica")
    failover_s = float(promoted) - killed_at
    assert group.replica.client().info("replication")["role"] == "master"
    send(4)  # after the failover

    # every job that can still end does so; give the lost ones the crash-recovery lease, then count
    def settled() -> bool:
        counts = terminal_counts(sink, jobs)
        return all(counts[j] for j in jobs[8:]) and sum(1 for j in jobs[:8] if counts[j]) >= len(ended_before)

    wait_for(settled, 300, what="the jobs published during and after the failover to end")
    time.sleep(3 * 3 + 5)  # three leases: a lost message would have come back by now
    counts = terminal_counts(sink, jobs)
    lost = [j for j in jobs if counts[j] == 0]
    twice = {j: n for j, n in counts.items() if n > 1}
    statuses = [c["body"]["status"] for j in jobs for c in sink.callbacks(j) if c["body"]["status"] != "processing"]
    print(f"sentinel failover: primary SIGKILLed with {in_flight} of 8 jobs in flight, replica promoted after "
          f"{failover_s:.1f}s; {len(jobs)} jobs, {len(jobs) - len(lost)} ended ({statuses.count('completed')} "
          f"completed), {len(lost)} lost, {len(twice)} with two terminal callbacks")
    assert not twice, twice
    assert all(counts[j] == 1 for j in jobs[8:])  # published during or after the election: none lost
    assert len(lost) <= in_flight  # only what asynchronous replication had not copied yet
    assert all(c["signature_ok"] for j in jobs for c in sink.callbacks(j))
    for process in (worker, outbox):  # both lost the broker, found the new primary, and run on
        assert process.alive() and "Connection to broker lost" in process.text()
        assert "SentinelTransport://" in process.text()
