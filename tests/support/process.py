"""One way to run a subprocess in a test: start it with an environment, wait until it is ready, stop it.

A :class:`ManagedProcess` runs in its own session (its children are signalled
with it), writes stdout and stderr to a log file, and stops with a signal
(SIGTERM by default), then SIGKILL when it outlives the timeout. A subclass
says what "ready" means (:meth:`ManagedProcess.ready`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], Any], timeout: float = 120, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true (returned); TimeoutError after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


#: held around every SIGSTOP: a test's (:func:`held_stopped`) and each stall of the stress plug-in's
#: staller, which leaves a process that is already stopped alone (its SIGCONT would end a test's stop)
STOPPING = threading.Lock()


def stopped(pid: int) -> bool:
    """The process is stopped (state ``T`` in ``/proc/PID/stat``)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


@contextmanager
def held_stopped(pid: int, *, group: bool = False) -> Iterator[None]:
    """``pid`` (with ``group``, its whole process group) stopped with SIGSTOP for the block, then continued."""
    kill = os.killpg if group else os.kill
    with STOPPING:
        kill(pid, signal.SIGSTOP)
        wait_for(lambda: stopped(pid), 10, interval=0.005, what=f"process {pid} to stop")
    try:
        yield
    finally:
        kill(pid, signal.SIGCONT)


class ManagedProcess:
    """A subprocess with its log file: :meth:`launch`, :meth:`wait_ready` (or both: :meth:`start`), :meth:`stop`."""

    #: what error messages call it
    name = "process"
    #: seconds :meth:`wait_ready` waits by default
    ready_timeout: float = 120
    #: seconds :meth:`stop` waits after its signal before SIGKILL
    stop_timeout: float = 30

    def __init__(self, argv: Sequence[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> None:
        self.argv, self.env, self.log, self.cwd = list(argv), env, log, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> Self:
        """Start the process without waiting for it to be ready (what a supervisor does)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as handle:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=handle,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def ready(self) -> bool:
        """True once the process serves (a subclass's check); by default: it runs."""
        return True

    def wait_ready(self, timeout: float | None = None) -> Self:
        """Wait for :meth:`ready`; RuntimeError when the process exits first, TimeoutError (after SIGKILL) when late."""
        assert self.proc is not None, "launch() first"
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.ready():  # first: a process may be ready, then end at once (a poison job)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.text()[-3000:]}")
            time.sleep(0.1)
        self.stop(signal.SIGKILL)  # never leave an orphan behind a failed test
        raise TimeoutError(f"{self.name} not ready in {timeout}s:\n{self.text()[-3000:]}")

    def start(self, timeout: float | None = None) -> Self:
        return self.launch().wait_ready(timeout)

    def text(self) -> str:
        """The log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float = 60) -> int:
        """Wait for the process to exit by itself; its status."""
        assert self.proc is not None, "launch() first"
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int | None:
        """Signal the process group, wait ``timeout`` (:attr:`stop_timeout`), then SIGKILL; its status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
