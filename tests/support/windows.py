"""Redis restarts and redeliveries driven by job events (``tests.faults:broker_windows``), and what
the sink saw of each job: start callbacks, terminal callbacks, uploads."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from devtools.sink import PREVIEW

from ..wire import publish
from .cluster import Pools, RedisServer, WorkerProcess
from .jobs import TASK, new_id, terminal, terminal_counts, tiny_job
from .process import wait_for

if TYPE_CHECKING:
    from devtools.sink import Sink

#: the plug-in that holds a worker in the windows of :class:`Windows`
PLUGIN = "tests.faults:broker_windows"


class Windows:
    """Redis restarts driven by job events (``tests.faults:broker_windows``): each rule stops the worker
    in one window of one job; the test stops Redis, lets the worker go on into the outage, and starts
    Redis again ``down`` seconds later. Every window is hit on purpose, so a failure replays."""

    def __init__(self, folder: Path, server: RedisServer | None = None, down: float = 1.5) -> None:
        self.folder, self.server, self.down = folder, server, down
        folder.mkdir(parents=True, exist_ok=True)
        self.rules: list[dict[str, Any]] = []
        self.write()

    def write(self) -> None:
        (self.folder / "rules.json").write_text(json.dumps(self.rules))

    def add(self, job_id: str, at: str, step: int | None = None) -> None:
        self.rules.append({"job": job_id, "at": at, **({"step": step} if step is not None else {})})
        self.write()

    def wait_hit(self, index: int, timeout: float = 240) -> None:
        """Wait until a worker stands in window ``index`` (it waits there until :meth:`release`)."""
        wait_for(lambda: (self.folder / f"hit-{index}").exists(), timeout, what=f"window {self.rules[index]}")

    def release(self, index: int) -> None:
        (self.folder / f"go-{index}").touch()

    def drive(self, first: int = 0, timeout: float = 240) -> float:
        """Restart Redis once in each window of rules ``first:`` as the worker reaches it; the outages' total."""
        pending, total = set(range(first, len(self.rules))), 0.0
        while pending:
            hit = wait_for(lambda: sorted(i for i in pending if (self.folder / f"hit-{i}").exists()), timeout,
                           what=f"the worker in window(s) {sorted(pending)}: {[self.rules[i] for i in pending]}")
            assert self.server is not None, "restarts need the Redis server"
            for index in hit:
                began = time.time()
                self.server.stop()
                (self.folder / f"go-{index}").touch()  # the worker goes on into the outage
                time.sleep(self.down)
                self.server.start()
                total += time.time() - began
                pending.discard(index)
        return total


def windowed_env(broker: str, windows: Windows, lease: float) -> dict[str, str]:
    """A pool's env on ``broker`` (``lease`` s heartbeats), held in ``windows`` by the plug-in."""
    return dict(OURVIDZ_BROKER_URL=broker, OURVIDZ_LEASE_SECONDS=f"{lease:g}", OURVIDZ_RUNTIME_PLUGINS=PLUGIN,
                OURVIDZ_TEST_WINDOWS=str(windows.folder))


@dataclass
class RestartRig:
    """A private Redis (broker, result backend and bookkeeping of one SDXL pool) that the test restarts
    in :attr:`windows`; the pool runs with the windows plug-in."""

    server: RedisServer
    windows: Windows
    worker: WorkerProcess
    client: redis.Redis


@contextlib.contextmanager
def restart_rig(folder: Path, pools: Pools, name: str, lease: float = 2.0) -> Iterator[RestartRig]:
    """:class:`RestartRig` under ``folder``, its pool named ``{name}-sdxl-<tag>``; the Redis stopped at exit."""
    server = RedisServer(folder / "redis").start()
    try:
        url = server.url(0)
        windows = Windows(folder / "windows", server)
        env = windowed_env(url, windows, lease)
        worker = pools.start("sdxl", OURVIDZ_HOSTNAME=f"{name}-sdxl-{new_id()[:6]}", OURVIDZ_REDIS_URL=url, **env)
        yield RestartRig(server, windows, worker, server.client())
    finally:
        server.stop()


@dataclass
class HeldJob:
    """A job that :attr:`holder` runs and stands in, after a step, until ``windows.release(0)``;
    :attr:`other` is a second pool on the same broker, started once the job was held."""

    windows: Windows
    holder: WorkerProcess
    other: WorkerProcess
    job: dict[str, Any]
    task_id: str


def held_job(pools: Pools, broker: str, folder: Path, name: str, lease: float, step: int = 2) -> HeldJob:
    """Publish a 6-step job to a pool held after its step ``step``, then start a second pool (``{name}-a/-b-<tag>``)."""
    store, windows, tag = redis.Redis.from_url(broker), Windows(folder), new_id()[:6]
    holder = pools.start("sdxl", OURVIDZ_HOSTNAME=f"{name}-a-{tag}", **windowed_env(broker, windows, lease))
    job = tiny_job(steps=6)
    windows.add(job["id"], "step", step)
    task_id = publish(store, TASK, job, "sdxl")
    windows.wait_hit(0)  # the holder stands after the step until released
    other = pools.start("sdxl", OURVIDZ_HOSTNAME=f"{name}-b-{tag}", **windowed_env(broker, windows, lease))
    return HeldJob(windows, holder, other, job, task_id)


def uploads(sink: Sink, job_id: str) -> int:
    """The job's files stored (its live previews, overwritten as it runs, are not its files)."""
    return sum(1 for r in sink.requests_for(job_id) if r["method"] == "POST"
               and r["path"].startswith("/storage/v1/object/") and not r["path"].endswith(PREVIEW))


def starts(sink: Sink, job_id: str) -> int:
    """``processing`` callbacks that announce a start (progress ones carry ``progress``)."""
    return sum(1 for c in sink.callbacks(job_id)
               if c["body"]["status"] == "processing" and "progress" not in (c["body"].get("metadata") or {}))


def once_each(sink: Sink, ids: list[str], what: str, files: int = 2) -> None:
    """Every job completed with one start, one terminal callback and its files uploaded once; failed
    jobs' errors in the assertion message."""
    bodies = {job_id: terminal(sink, job_id, 180) for job_id in ids}
    time.sleep(2)  # a late duplicate would surface within a scan period
    counts = terminal_counts(sink, ids)
    begun = {job_id: starts(sink, job_id) for job_id in ids}
    stored = {job_id: uploads(sink, job_id) for job_id in ids}
    failed = {job_id: b.get("error") for job_id, b in bodies.items() if b["status"] != "completed"}
    print(f"{what}: {len(ids) - len(failed)} of {len(ids)} completed; terminal callbacks {sorted(Counter(counts.values()).items())}, "
          f"starts {sorted(Counter(begun.values()).items())}, uploads {sorted(Counter(stored.values()).items())}")
    assert not failed, f"failed jobs and their errors: {failed}"
    assert all(n == 1 for n in counts.values()), f"terminal callbacks per job: {counts}"
    assert all(n == 1 for n in begun.values()), f"start callbacks per job: {begun}"
    assert all(n == files for n in stored.values()), f"uploads per job: {stored}"
