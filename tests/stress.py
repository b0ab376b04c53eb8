"""``bin/test --stress``: the timing-sensitive tests on a machine that is busy and stalls.

Loaded as a pytest plug-in (``-p tests.stress``) with ``-m stress``. For the whole session:

- one CPU hog process per core (a busy loop at normal priority), so workers, Redis and the
  test process compete for every core;
- a staller thread that, at random intervals, stops one random worker process (``bin/worker``,
  found as a child of this test process) with SIGSTOP and continues it with SIGCONT after a
  random pause of at most ``OURVIDZ_STRESS_MAX_STALL`` seconds (default 0.35: the stall that
  used to break the lease tests). A worker a test stopped on purpose
  (:func:`tests.support.process.held_stopped`) is left alone: continuing it would end the test's
  stop. Stalls are far below a third of the smallest lease the
  marked tests use (a worker's heartbeat is refreshed every third of its lease), so a stalled
  worker is slow, never dead: the tests must hold anyway.

``OURVIDZ_TEST_SEED`` seeds the staller (printed at the end), so a failing run can be replayed.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support.process import STOPPING, stopped

MAX_STALL = float(os.environ.get("OURVIDZ_STRESS_MAX_STALL", "0.35"))
#: seconds between two stalls (uniform)
GAP = (0.2, 2.0)
WORKER_MARK = b"ourvidz_tasks.tools.launcher"


def worker_pids(parent: int) -> list[int]:
    """Live ``bin/worker`` processes started by ``parent`` (their command line names the launcher)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent and WORKER_MARK in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return pids


class Staller:
    """Stops a random worker for a random moment, again and again, from a daemon thread."""

    def __init__(self, seed: int, max_stall: float = MAX_STALL) -> None:
        self.rng = random.Random(seed)
        self.seed, self.max_stall = seed, max_stall
        self.stalls = 0
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="staller", daemon=True)

    def start(self) -> Staller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        parent = os.getpid()
        while not self._stop.wait(self.rng.uniform(*GAP)):
            pids = worker_pids(parent)
            if not pids:
                continue
            pid, pause = self.rng.choice(pids), self.rng.uniform(0.05, self.max_stall)
            with STOPPING:  # a test's own stop waits for this stall, and this stall skips a stopped process
                if stopped(pid):
                    continue
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    continue
                try:
                    self._stop.wait(pause)
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)  # always: a test's own SIGTERM needs it running
            self.stalls += 1
            self.longest = max(self.longest, pause)


def start_hogs(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


@pytest.fixture(scope="session", autouse=True)
def stressed_machine() -> Iterator[Staller]:
    seed = int(os.environ.get("OURVIDZ_TEST_SEED") or random.randrange(10**6))
    hogs = start_hogs(os.cpu_count() or 2)
    staller = Staller(seed).start()
    try:
        yield staller
    finally:
        staller.stop()
        for hog in hogs:
            hog.kill()
            hog.wait()
        print(f"\nstress: {len(hogs)} CPU hogs, {staller.stalls} worker stalls up to {staller.longest:.2f}s "
              f"(seed {seed})")
