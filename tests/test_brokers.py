"""Brokers under faults: Redis restarts mid-run, RabbitMQ end to end, TLS URLs.

- Redis restarts: a private ``redis-server`` (AOF, fsync always) is the broker, result
  backend and bookkeeping Redis of an SDXL pool and its outbox; it is SIGTERMed and
  started again on the same port and dir while jobs run: once at a fixed moment, and in
  chosen windows of chosen jobs (after step k, between the upload and the callback, between
  the callback and the ack), driven by job events through a plug-in (``tests.faults:broker_windows``)
  so that every window is hit on purpose and a failure replays. Every job must complete, with
  one start callback, one terminal callback and its files uploaded once.
- Live workers keep their messages: crash recovery requeues only a dead worker's
  messages, not those of a long job or a long callback outage.
- RabbitMQ: the same job through ``amqp://`` (bookkeeping and results on the test Redis),
  published by a plain Celery producer; raw pickle / non-JSON messages become dead
  letters and the worker keeps consuming; a poison job is given up.
- TLS: what a ``rediss://`` or ``amqps://`` URL makes every client of a worker send,
  seen by a plain TCP listener (no TLS server needed): a TLS handshake, never the
  password in cleartext.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.services.guard import DEAD_LETTERS

from .support.cluster import Pools, RedisServer, WorkerProcess
from .support.env import AMQP, BROKER, amqp_reachable
from .support.jobs import TASK, new_id, terminal, terminal_counts, tiny_job
from .support.process import ROOT, wait_for
from .support.windows import once_each, restart_rig
from .wire import publish

# -- Redis restart ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.stress
def test_redis_restart_mid_run_loses_no_job(tmp_path: Path, pools: Pools, sink: Sink) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        url = server.url(0)
        tag = new_id()[:6]
        env = dict(OURVIDZ_BROKER_URL=url, OURVIDZ_REDIS_URL=url, OURVIDZ_LEASE_SECONDS="3")
        pools.start("outbox", OURVIDZ_HOSTNAME=f"restart-outbox-{tag}", **env)
        worker = pools.start("sdxl", OURVIDZ_HOSTNAME=f"restart-sdxl-{tag}", **env)
        client = server.client()
        jobs = [tiny_job(steps=6) for _ in range(10)]
        for job in jobs:
            publish(client, TASK, job, "sdxl")
        ids = [j["id"] for j in jobs]
        # restart while the pool is in the middle of the run: one job done, the next one running
        terminal(sink, ids[0], 120)
        wait_for(lambda: any(c["body"]["status"] == "processing" for c in sink.callbacks(ids[1])), 60,
                 what="the second job to start")
        queued_before = client.llen("sdxl")
        outage = server.restart(down=2.0)
        restarted_at = time.time()
        bodies = {job_id: terminal(sink, job_id, 120) for job_id in ids}
        # let a late duplicate surface, if there is one
        wait_for(lambda: client.llen("sdxl") == 0 and client.hlen("unacked") == 0, 60, what="queue drained")
        time.sleep(3)
        counts = terminal_counts(sink, ids)
        statuses = Counter(b["status"] for b in bodies.values())
        lost = sum(1 for n in counts.values() if n == 0)
        duplicated = sum(1 for n in counts.values() if n > 1)
        print(f"{len(jobs)} jobs, 1 Redis restart ({outage:.1f}s outage, {queued_before} queued at the time): "
              f"{statuses['completed']} completed, {statuses['failed']} failed, {lost} lost, {duplicated} duplicated; "
              f"all ended {time.time() - restarted_at:.1f}s after the restart; worker alive: {worker.alive()}")
        failed = {k: v.get("error") for k, v in bodies.items() if v["status"] != "completed"}
        assert lost == 0 and duplicated == 0, counts
        assert statuses["completed"] == len(jobs), failed
        assert worker.alive()
        assert "Connection to broker lost" in worker.text() or "reconnect" in worker.text().lower()
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.stress
def test_redis_restarts_at_job_events_lose_no_job_and_fail_none(tmp_path: Path, pools: Pools, sink: Sink) -> None:
    """Redis restarts in each window of a job: after step k, between the upload and the terminal
    callback, between the callback and the ack; one job is hit by three restarts in a row (each
    used to end its attempt with "unexpected ConnectionError" until its retries ran out, ``failed``)."""
    with restart_rig(tmp_path, pools, "windows") as rig:
        windows = rig.windows
        jobs = [tiny_job(steps=8) for _ in range(6)]
        ids = [j["id"] for j in jobs]
        windows.add(ids[1], "step", 3)
        for k in (2, 4, 6):
            windows.add(ids[2], "step", k)  # the same job, three restarts
        windows.add(ids[3], "uploaded")
        windows.add(ids[4], "acked")
        for job in jobs:
            publish(rig.client, TASK, job, "sdxl")
        outage = windows.drive()
        print(f"{len(windows.rules)} Redis restarts at job events ({outage:.1f}s down in all); worker alive: {rig.worker.alive()}")
        once_each(sink, ids, "restarts at job events")
        assert rig.worker.alive()


@pytest.mark.slow
@pytest.mark.stress
def test_redis_restarts_at_job_events_soak(tmp_path: Path, pools: Pools, sink: Sink) -> None:
    """A bounded soak: rounds of jobs, each with restarts at windows drawn from a seed (printed; the
    windows are job events, so ``OURVIDZ_TEST_SEED`` replays a round), for ``OURVIDZ_SOAK_SECONDS`` (30)."""
    import random

    budget = float(os.environ.get("OURVIDZ_SOAK_SECONDS") or 30)
    first_seed = int(os.environ.get("OURVIDZ_TEST_SEED") or random.randrange(10**6))
    with restart_rig(tmp_path, pools, "soak") as rig:
        windows, client, ends, rounds = rig.windows, rig.client, time.monotonic() + budget, 0
        while rounds == 0 or time.monotonic() < ends:
            seed = first_seed + rounds
            rng, first = random.Random(seed), len(windows.rules)
            jobs = [tiny_job(steps=6) for _ in range(4)]
            ids = [j["id"] for j in jobs]
            for n in sorted(rng.sample(range(len(jobs)), 2)):
                at = rng.choice(["step", "uploaded", "acked"])
                windows.add(ids[n], at, rng.randint(1, 5) if at == "step" else None)
            plan = [(ids.index(r["job"]), r["at"], r.get("step")) for r in windows.rules[first:]]
            for job in jobs:
                publish(client, TASK, job, "sdxl")
            windows.drive(first)
            once_each(sink, ids, f"soak round {rounds} (seed {seed}: windows {plan})")
            rounds += 1
        print(f"soak: {rounds} rounds, {len(windows.rules)} restarts at job events, seeds {first_seed}..{first_seed + rounds - 1}")
        assert rig.worker.alive()


@pytest.mark.slow
@pytest.mark.stress
def test_redis_down_longer_than_the_lease_requeues_no_live_job(tmp_path: Path, pools: Pools, sink: Sink) -> None:
    """Heartbeats expire while Redis is down; after the restart no scanner may take a live pool's job
    for a dead one's before the live pools had a beat period to refresh theirs (both pools scan)."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        url = server.url(0)
        tag = new_id()[:6]
        lease = 2.0
        env = dict(OURVIDZ_BROKER_URL=url, OURVIDZ_REDIS_URL=url, OURVIDZ_LEASE_SECONDS=f"{lease:g}")
        busy = pools.start("sdxl", OURVIDZ_HOSTNAME=f"down-a-{tag}", **env)
        idle = pools.start("sdxl", OURVIDZ_HOSTNAME=f"down-b-{tag}", **env)
        client = server.client()
        job = tiny_job(steps=60, size="1024x1024")  # runs through the outage
        task_id = publish(client, TASK, job, "sdxl")
        wait_for(lambda: any(c["body"]["status"] == "processing" for c in sink.callbacks(job["id"])), 120,
                 what="the job to start")
        wait_for(lambda: client.zrangebyscore("unacked_index", 0, time.time() - 2 * lease), 120,
                 what="the job's message to outlive the grace")  # a scanner would consider it now
        outage = server.restart(down=1.5 * lease)  # longer than the lease: every heartbeat expires
        body = terminal(sink, job["id"], 240)
        time.sleep(2 * lease)  # a wrongly requeued message would be received again within a scan period
        text = busy.text() + idle.text()
        received = text.count(f"generate[{task_id}] received")
        print(f"1 job, Redis down {outage:.1f}s (lease {lease:g}s): received {received}x, "
              f"{text.count('requeued')} requeues, {terminal_counts(sink, [job['id']])[job['id']]} terminal callback(s)")
        assert body["status"] == "completed"
        # (kombu itself puts a lost connection's unacked messages back when it reconnects, so the
        # message may be received a second time; that copy finds the job's terminal record)
        assert "requeued" not in text  # recovery took nobody's job for a dead worker's
        assert terminal_counts(sink, [job["id"]])[job["id"]] == 1
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.stress
def test_live_workers_keep_their_messages(isolated_broker: str, pools: Pools, sink: Sink) -> None:
    """Crash recovery must requeue only a dead worker's messages, never a live one's.

    One job that runs for many lease periods, and a callback outage that keeps the terminal
    callback undelivered as long: both workers are alive throughout, so neither message may be
    handed out again (no second ``received``, no "requeued", one terminal callback). The lease
    is several times the longest stall ``bin/test --stress`` injects (a heartbeat is refreshed
    every third of it), so a stalled worker is slow, not dead.
    """
    store = redis.Redis.from_url(isolated_broker)
    tag = new_id()[:6]
    lease = 3.0
    env = dict(OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_LEASE_SECONDS=f"{lease:g}")  # unowned: requeued after 2 leases
    outbox = pools.start("outbox", OURVIDZ_HOSTNAME=f"owner-outbox-{tag}", **env)
    worker = pools.start("sdxl", OURVIDZ_HOSTNAME=f"owner-sdxl-{tag}", **env)
    job = tiny_job(steps=60, size="1024x1024")  # ~10 s on an idle machine: many lease periods
    task_id = publish(store, TASK, job, "sdxl")
    wait_for(lambda: any(c["body"]["status"] == "processing" for c in sink.callbacks(job["id"])), 120,
             what="the job to start")
    sink.faults(callback=503)
    try:
        # the running job's message has an owner record (written on receipt, before it ran)
        owners = wait_for(lambda: list(store.scan_iter("ourvidz:owner:*")), 30, what="an owner record")
        wait_for(lambda: store.exists(f"ourvidz:job:{job['id']}:final"), 300, what="the job to end")
        time.sleep(3 * lease)  # the terminal callback stays undelivered for several lease periods
    finally:
        sink.faults()
    body = terminal(sink, job["id"], 120)
    time.sleep(lease)  # a wrongly requeued message would be received again within a scan period
    received = worker.text().count(f"generate[{task_id}] received")
    requeued = worker.text().count("requeued") + outbox.text().count("requeued")
    terminals = terminal_counts(sink, [job["id"]])[job["id"]]
    ran = body["metadata"].get("processing_time") or 0
    print(f"1 long job ({ran}s, lease {lease:g}s), {3 * lease:g}s callback outage: "
          f"received {received}x, {requeued} requeues by recovery, {terminals} terminal callback(s), "
          f"owner records seen: {len(owners)}")
    assert body["status"] == "completed"
    assert ran > 2 * lease  # it outlived the grace after which an unowned message is requeued
    assert received == 1 and requeued == 0 and terminals == 1


# -- RabbitMQ ----------------------------------------------------------------------------------------------------


amqp = pytest.mark.skipif(not amqp_reachable(), reason=f"no RabbitMQ at {AMQP}")


def _purge_rabbit(*queues: str) -> dict[str, int]:
    """Empty the named queues on RabbitMQ (absent queues are fine)."""
    from kombu import Connection

    purged = {}
    with Connection(AMQP) as conn:
        for name in queues:
            channel = conn.channel()
            try:
                purged[name] = channel.queue_purge(name) or 0
            except conn.channel_errors:  # 404: not declared yet
                purged[name] = 0
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    return purged


def _publisher() -> Any:
    """A separate Celery app configured from ``celeryconfig``, with RabbitMQ as its broker."""
    from celery import Celery

    app = Celery("amqp-publisher", set_as_current=False)
    app.config_from_object("ourvidz_tasks.celeryconfig")
    # this test process's celeryconfig was read with a Redis broker, which selects our Redis transport
    app.conf.update(broker_url=AMQP, broker_transport=None, result_backend=BROKER)
    return app


@pytest.fixture()
def amqp_pool(pools: Pools) -> WorkerProcess:
    _purge_rabbit("sdxl", "outbox")
    tag = new_id()[:6]
    env = dict(OURVIDZ_BROKER_URL=AMQP, OURVIDZ_RESULT_BACKEND=BROKER, OURVIDZ_REDIS_URL=BROKER)
    pools.start("outbox", OURVIDZ_HOSTNAME=f"amqp-outbox-{tag}", **env)
    return pools.start("sdxl", OURVIDZ_HOSTNAME=f"amqp-sdxl-{tag}", **env)


@amqp
@pytest.mark.slow
def test_rabbitmq_end_to_end(amqp_pool: WorkerProcess, sink: Sink, store: redis.Redis) -> None:
    app = _publisher()
    job = tiny_job()
    result = app.send_task(TASK, args=[job], queue="sdxl", argsrepr=f"({job['id']!r},)", kwargsrepr="{}")
    body = terminal(sink, job["id"], 180)
    assert body["status"] == "completed", body
    assert body["worker_id"] == amqp_pool.node
    assert body["assets"][0]["url"] == f"workspace-temp/user_123/{job['id']}/0.png"
    time.sleep(2)
    assert terminal_counts(sink, [job["id"]])[job["id"]] == 1
    # the result backend (the test Redis) has the body; the bookkeeping Redis its terminal record
    assert result.get(timeout=30)["status"] == "completed"
    assert store.exists(f"ourvidz:job:{job['id']}:final")
    wait_for(lambda: store.exists(f"ourvidz:job:{job['id']}:delivered"), 30, what="the delivered mark")
    assert "transport:   amqp://guest:**@" in amqp_pool.text()
    print(f"RabbitMQ: 1 job, {terminal_counts(sink, [job['id']])[job['id']]} terminal callback ({body['status']})")


@amqp
@pytest.mark.slow
def test_rabbitmq_non_json_messages_are_dead_letters(amqp_pool: WorkerProcess, sink: Sink, store: redis.Redis) -> None:
    from kombu import Connection, Exchange, Producer

    marker = f"dead-{new_id()[:10]}"
    pickle_task_id = str(uuid.uuid4())
    before = store.llen(DEAD_LETTERS)
    with Connection(AMQP) as conn:
        producer = Producer(conn.channel(), exchange=Exchange(""), routing_key="sdxl")
        # 1. a pickled task message (a protocol v2 envelope whose body is pickle): refused content type
        producer.publish(
            pickle.dumps([[{"id": new_id(), "prompt": marker}], {}, {}]), routing_key="sdxl",
            content_type="application/x-python-serialize", content_encoding="binary",
            headers={"task": TASK, "id": pickle_task_id, "argsrepr": "()", "kwargsrepr": "{}", "retries": 0,
                     "root_id": pickle_task_id, "lang": "py"},
        )
        # 2. a pickle with no task headers at all
        producer.publish(pickle.dumps({"junk": marker}), routing_key="sdxl",
                         content_type="application/x-python-serialize", content_encoding="binary")
        # 3. bytes that claim to be JSON and are not
        producer.publish(f"{{not json {marker}".encode(), routing_key="sdxl",
                         content_type="application/json", content_encoding="utf-8")
    wait_for(lambda: store.llen(DEAD_LETTERS) >= before + 3, 60, what="three dead letters")
    entries = [json.loads(e) for e in store.lrange(DEAD_LETTERS, 0, -1)]
    ours = [e for e in entries if e.get("task_id") == pickle_task_id or marker in (e.get("raw") or "")]
    reasons = sorted(e["reason"] for e in ours)
    print(f"RabbitMQ: 3 raw messages, {len(ours)} dead letters: {reasons}")
    assert len(ours) == 3, entries[:5]
    assert any("refused content type 'application/x-python-serialize'" in r for r in reasons)
    assert sum(r.startswith("undecodable message") for r in reasons) == 2
    assert all(e["queue"] == "sdxl" for e in ours)
    # the worker is alive and still consuming
    job = tiny_job()
    _publisher().send_task(TASK, args=[job], queue="sdxl", argsrepr=f"({job['id']!r},)", kwargsrepr="{}")
    assert terminal(sink, job["id"], 180)["status"] == "completed"
    assert amqp_pool.alive()


@amqp
@pytest.mark.slow
def test_rabbitmq_poison_job_is_given_up(pools: Pools, sink: Sink) -> None:
    """A job that kills its worker every time ends after ``max_deliveries`` on RabbitMQ too.

    RabbitMQ redelivers a dead consumer's message at once, so without the poison guard such a
    job would take down every worker that picks it up, forever.
    """
    from .faults import MARKER

    _purge_rabbit("sdxl", "outbox")
    env = dict(OURVIDZ_BROKER_URL=AMQP, OURVIDZ_RESULT_BACKEND=BROKER, OURVIDZ_REDIS_URL=BROKER,
               OURVIDZ_MAX_DELIVERIES="2", OURVIDZ_PROMPT_POLICY="tests.faults:kill_on_marker")
    tag = new_id()[:6]
    pools.start("outbox", OURVIDZ_HOSTNAME=f"amqp-poison-outbox-{tag}", **env)
    job = tiny_job(prompt=f"a {MARKER} prompt")
    _publisher().send_task(TASK, args=[job], queue="sdxl", argsrepr=f"({job['id']!r},)", kwargsrepr="{}")

    def failed() -> bool:
        return any(c["body"]["status"] == "failed" for c in sink.callbacks(job["id"]))

    started = 0
    try:
        while started < 4 and not failed():
            worker = pools.start("sdxl", OURVIDZ_HOSTNAME=f"amqp-poison-{started}-{tag}", **env)
            started += 1

            def crashed_or_done(w: WorkerProcess = worker) -> bool:
                return not w.alive() or failed()

            wait_for(crashed_or_done, 60, what="a crash or the give-up")
        print(f"RabbitMQ poison job: {started} workers started, "
              f"{'given up' if failed() else 'never given up'} after {started - 1 if failed() else started} crashes")
        body = terminal(sink, job["id"], 10)
        assert body["status"] == "failed" and "given up after 2 deliveries" in body["error"]["message"]
        assert started == 3
    finally:
        _purge_rabbit("sdxl")


# -- rediss:// -------------------------------------------------------------------------------------------------

#: Opens one connection of each kind a worker makes to the Redis URLs (broker channel, result
#: backend, bookkeeping client, recovery's broker client) exactly as the worker builds them.
_PROBE = r"""
import json, sys
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "connected"
    except BaseException as exc:
        out[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
from ourvidz_tasks.celery import app
from ourvidz_tasks.contract.settings import load_settings
settings = load_settings()
import redis
conn = app.connection_for_write()
out["broker_ssl_options"] = {k: str(v) for k, v in conn.ssl.items()} if isinstance(conn.ssl, dict) else conn.ssl
attempt("broker", lambda: conn.channel())
attempt("backend", lambda: app.backend.client.connection_pool.make_connection().connect())
attempt("ourvidz_redis", lambda: redis.Redis.from_url(settings.redis).connection_pool.make_connection().connect())
attempt("recovery", lambda: redis.Redis.from_url(settings.broker_url).connection_pool.make_connection().connect())
print(json.dumps(out))
"""


class FirstBytes:
    """A TCP listener that records the first bytes each client sends, then hangs up (no TLS needed)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.seen: list[bytes] = []
        self._stop = False
        import threading

        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            with client:
                client.settimeout(0.5)
                data = b""
                try:
                    while len(data) < 512 and (chunk := client.recv(512)):
                        data += chunk
                except OSError:
                    pass
                self.seen.append(data)

    def kinds(self) -> list[str]:
        """``tls`` (a TLS record: 0x16 0x03) or ``plaintext`` per connection."""
        return ["tls" if b[:2] == b"\x16\x03" else f"plaintext {b[:8]!r}" for b in self.seen]

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


PROBE_PASSWORD = "tls-probe-" + uuid.uuid4().hex[:8]


def _tls_probe(query: str) -> tuple[dict[str, Any], dict[str, FirstBytes]]:
    """Point a worker's configuration at three listeners; return what its clients did and sent."""
    servers = {name: FirstBytes() for name in ("broker", "backend", "redis")}
    try:
        url = {name: f"rediss://:{PROBE_PASSWORD}@127.0.0.1:{s.port}/0{query}" for name, s in servers.items()}
        env = {k: v for k, v in os.environ.items() if not k.startswith("OURVIDZ_")}
        env.update(OURVIDZ_BROKER_URL=url["broker"], OURVIDZ_RESULT_BACKEND=url["backend"],
                   OURVIDZ_REDIS_URL=url["redis"], PYTHONWARNINGS="ignore")
        done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        outcome = json.loads(done.stdout.strip().splitlines()[-1])
        time.sleep(0.3)
        return outcome, servers
    finally:
        for s in servers.values():
            s.close()


def _all_tls(outcome: dict[str, Any], servers: dict[str, FirstBytes]) -> None:
    wire = {name: s.kinds() for name, s in servers.items()}
    print(f"clients: {outcome}\nfirst bytes per endpoint: {wire}")
    cleartext = [name for name, s in servers.items() if any(PROBE_PASSWORD.encode() in b for b in s.seen)]
    assert not cleartext, f"the Redis password went over the wire in cleartext to: {cleartext}"
    for name in ("broker", "backend", "redis"):
        assert wire[name], f"nothing connected to the {name} endpoint: {outcome}"
        assert set(wire[name]) == {"tls"}, f"{name} endpoint saw {wire[name]}"
    # broker: the kombu channel and recovery's client; backend: Celery's; redis: ledger, dead letters...
    assert len(wire["broker"]) >= 2 and len(wire["redis"]) >= 1 and len(wire["backend"]) >= 1


def test_rediss_url_with_cert_reqs_speaks_tls_on_every_connection() -> None:
    """``rediss://...?ssl_cert_reqs=required``: every client a worker opens starts with a TLS handshake."""
    outcome, servers = _tls_probe("?ssl_cert_reqs=required")
    assert outcome["broker_ssl_options"] == {"ssl_cert_reqs": str(int(ssl.CERT_REQUIRED))}
    _all_tls(outcome, servers)


def test_bare_rediss_url_speaks_tls_on_every_connection() -> None:
    """``rediss://host`` with no query (what a provider's dashboard hands out) must also mean TLS.

    Fails today: ``broker_transport`` (our guard transport) hides the ``rediss`` scheme from
    kombu, so the broker channel connects in cleartext and sends ``HELLO 3 AUTH default <password>``;
    Celery's Redis backend refuses the URL (ValueError: no ``ssl_cert_reqs``).
    """
    outcome, servers = _tls_probe("")
    _all_tls(outcome, servers)


def test_amqps_url_speaks_tls() -> None:
    """``amqps://``: kombu's SSL transport; the password never crosses in cleartext."""
    broker, store = FirstBytes(), FirstBytes()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OURVIDZ_")}
        env.update(OURVIDZ_BROKER_URL=f"amqps://guest:{PROBE_PASSWORD}@127.0.0.1:{broker.port}//",
                   OURVIDZ_REDIS_URL=f"rediss://:{PROBE_PASSWORD}@127.0.0.1:{store.port}/0?ssl_cert_reqs=required",
                   PYTHONWARNINGS="ignore")
        done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        time.sleep(0.3)
        print(f"amqps:// first bytes: broker {broker.kinds()}, bookkeeping/results {store.kinds()}")
        assert broker.kinds() and set(broker.kinds()) == {"tls"}
        assert store.kinds() and set(store.kinds()) == {"tls"}
        assert not any(PROBE_PASSWORD.encode() in b for b in broker.seen + store.seen)
    finally:
        broker.close()
        store.close()
