"""Dispatch cost: the Redis commands one job costs a pool, counted by Redis itself (``MONITOR``).

Counted: what clients send (a Lua script is one command, whatever it runs; ``MULTI``/``EXEC``
around a transaction are not counted).

A pool on a private database, nothing else on it; jobs one at a time (each
published once the previous one is acknowledged), so each window between two
publishes holds one job's commands. The smallest window is the cost of a job
(a window that also caught an idle timer tick or a heartbeat only counts more). A new command on the path from the broker to the
``processing`` callback makes this fail: see ``bench/dispatch.py`` for what
the milliseconds cost.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from devtools.sink import Sink

from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal
from .support.process import wait_for
from .wire import publish

JOBS = 25
#: commands one job costs a pool, all of them: the broker's (the fetch: a sweep and, idle, a blocking
#: move; unacked bookkeeping, which also takes the message out of the processing list; ack: 7),
#: the owner record (2), admission (terminal record, delivery count, cancel flag: 4), Celery's events
#: (2) and result states (STARTED, SUCCESS: 6), the terminal record (8), the ledger's busy and
#: idle marks (26: each reads every queue's depth), a look for ledger requests (1) and the claim that
#: the job runs in this incarnation, taken and given back (2: a redelivered copy never starts again),
#: the fair order (6 more than a plain fetch: the intake's move, admit and next look; the pick and
#: the bell replace the sweep and the blocking move; the start, which also reads the queue wait; the
#: user's share corrected at the end) and the user's usage of the day (one pipeline of 3).
#: It was 93 before this was measured (the callback outbox hop, a full ledger look after every job).
BUDGET = 67
#: what may run between a message's arrival and the ``processing`` callback: kombu's unacked
#: bookkeeping and the processing list's LREM (one transaction), the owner record, the claim that this
#: incarnation runs the job (SET NX: a redelivered copy never starts twice) and one pipeline (terminal
#: record, delivery count, cancel flag), then the start in the fair order, which reads the queue wait
#: the callback carries: 5 round trips. Celery's STARTED state, the task events and the ledger's busy
#: mark come after the callback.
DISPATCH_PATH = ["ZADD", "HSET", "LREM", "SET", "SET", "GET", "SET", "GET", "EXISTS", "EVAL"]


class Monitor:
    """Every command Redis runs on one database, with the client that sent it."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.db = self.client.connection_pool.connection_kwargs.get("db", 0)
        self.seen: list[tuple[str, str]] = []  # (client address, command line)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def _listen(self) -> None:
        with self.client.monitor() as m:
            self._ready.set()
            for item in m.listen():
                command = str(item.get("command"))
                if int(item.get("db", -1)) == self.db and item.get("client_type") != "lua" \
                        and command not in ("MULTI", "EXEC"):
                    self.seen.append((str(item.get("client_address")) + ":" + str(item.get("client_port")),
                                      command))

    def start(self) -> Monitor:
        self._thread.start()
        self._ready.wait(10)
        return self


def windows(seen: list[tuple[str, str]], mine: str) -> Iterator[list[str]]:
    """The commands of others between two of my LPUSHes (one job each)."""
    current: list[str] | None = None
    for client, command in seen:
        if client == mine:
            if command.startswith("LPUSH"):
                if current is not None:
                    yield current
                current = []
            continue
        if current is not None:
            current.append(command)


@pytest.fixture()
def quiet_pool(start_worker: Callable[..., WorkerProcess], isolated_broker: str) -> WorkerProcess:
    return start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"rt-{new_id()[:6]}")


@pytest.mark.slow
def test_a_job_costs_a_pinned_number_of_redis_commands(quiet_pool: WorkerProcess, isolated_broker: str,
                                                       sink: Sink) -> None:
    me = redis.Redis.from_url(isolated_broker, single_connection_client=True)
    info: dict[str, Any] = me.client_info()
    mine = str(info["addr"])
    monitor = Monitor(isolated_broker).start()
    for _ in range(JOBS + 1):
        job = {"id": new_id(), "type": "sdxl_image_fast", "user_id": "u", "prompt": "p",
               "config": {"num_inference_steps": "x"}}  # INVALID_JOB: the whole lifecycle, no model
        publish(me, "ourvidz.sdxl.generate", job, "sdxl")
        assert terminal(sink, job["id"], 60)["status"] == "failed"
        wait_for(lambda: me.hlen("unacked") == 0, 30, interval=0.01, what="the ack")
    publish(me, "ourvidz.sdxl.generate", {"id": new_id()}, "nowhere")  # closes the last window
    wait_for(lambda: sum(1 for c, cmd in monitor.seen if c == mine and cmd.startswith("LPUSH")) == JOBS + 2, 10,
             what="the monitor to catch up")
    counts = [len(w) for w in windows(monitor.seen, mine)][1:]  # the first job warms up
    typical = min(counts)
    sample = next(w for w in windows(monitor.seen, mine) if len(w) == typical)
    print(f"commands per job: {typical} (windows: max {max(counts)}, most common "
          f"{collections.Counter(counts).most_common(1)[0][0]}); one job's commands:")
    for command in sample:
        print("   ", command[:120])
    assert typical <= BUDGET, f"a job costs {typical} Redis commands (budget {BUDGET}): {sample}"
    paths = collections.Counter(tuple(dispatch_path(w)) for w in list(windows(monitor.seen, mine))[1:])
    path, _ = paths.most_common(1)[0]
    assert list(path) == DISPATCH_PATH, f"before the processing callback: {path} (pinned: {DISPATCH_PATH})"


def dispatch_path(window: list[str]) -> list[str]:
    """The commands from the message's arrival to the job's start in the fair order (the
    ``processing`` callback follows it)."""
    start = next(i for i, c in enumerate(window) if c.startswith("ZADD unacked_index"))
    cancel = next(i for i, c in enumerate(window) if c.startswith("EXISTS ourvidz:cancel:")) + 1  # and the start
    # the fair intake's thread takes the next messages in meanwhile: not this job's path
    return [c.split()[0] for c in window[start:cancel + 1] if "+intake" not in c]
