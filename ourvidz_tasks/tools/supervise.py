"""``bin/worker all``: every pool of one GPU pod in one container, supervised by supervisord.

The old system ran on one RunPod pod with a home-made orchestrator; this is the same shape
with a well-kept supervisor configured from the same environment (``OURVIDZ_POD`` names the
programs, docs/operators.md):

- each program runs under its own name (``sdxl``, ``chat``, ``wan``, optionally ``outbox``,
  ``flower``, ``metrics``); a pool that dies is started again at once under that name, so its
  successor hands the dead incarnation's job back (runtime/recovery.py). A program that keeps
  crashing is restarted after a growing pause, and after ``OURVIDZ_POD_CRASH_LIMIT`` crashes
  in ``OURVIDZ_POD_CRASH_WINDOW`` seconds, or when it cannot start at all, the pod exits 1 so
  the platform restarts it clean;
- SIGTERM drains: every pool is told at once to finish its running job and take no new one,
  and is killed only after ``OURVIDZ_DRAIN_SECONDS``;
- one log stream on stdout, each line tagged with its program's name (``sdxl | ...``).

Three processes make it: this wrapper (PID 1 in a container: it forwards signals, reaps
orphans and turns a failed pod into exit 1), supervisord, and the :func:`watchdog` event
listener that restarts and counts. Each program runs under :func:`tag`, which prefixes its lines.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ..contract.names import ROLES
from ..contract.settings import Settings

GROUP = "pod"
USER = "pod"  # of the control socket
FAILED = "failed"  # the file the watchdog leaves in the pod's folder when it gives the pod up
#: the longest pause before restarting a program that keeps crashing, seconds
MAX_PAUSE = 30.0


def program_argv(name: str, settings: Settings) -> list[str]:
    """The command of one program of the pod."""
    py = sys.executable
    if name in ROLES:
        return [py, "-m", "ourvidz_tasks.tools.launcher", name]
    if name == "flower":
        return [py, "-m", "ourvidz_tasks.tools.flower"]
    if name == "metrics":
        return [py, "-m", "ourvidz_tasks.tools.cli", "metrics", "--address", settings.metrics_address]
    raise ValueError(f"not a program of the pod: {name}")


def _quote(argv: list[str]) -> str:
    return shlex.join(argv).replace("%", "%%")  # supervisord expands %(...)s in its values


def render(settings: Settings, directory: Path) -> str:
    """supervisord's configuration for ``settings.pod``, with its socket and state in ``directory``."""
    me = [sys.executable, "-m", "ourvidz_tasks.tools.supervise"]
    password = secrets.token_hex(16)  # the control socket's, new each start; the folder is private too
    sections = [
        "[supervisord]",
        "nodaemon=true",
        *(["user=root"] if os.getuid() == 0 else []),  # a container's root: nothing to drop
        "logfile=/dev/null",  # its own few lines go to stderr below; the programs' to stdout
        "logfile_maxbytes=0",
        "loglevel=warn",
        f"pidfile={directory / 'supervisord.pid'}",
        f"childlogdir={directory}",
        "",
        "[unix_http_server]",
        f"file={directory / 'supervisor.sock'}",
        "chmod=0700",
        f"username={USER}",
        f"password={password}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{directory / 'supervisor.sock'}",
        f"username={USER}",
        f"password={password}",
        "",
        # one group: SIGTERM reaches every pool at once, so the drain bound is one job, not three
        f"[group:{GROUP}]",
        f"programs={','.join(settings.pod)}",
        "",
        "[eventlistener:watchdog]",
        f"command={_quote([*me, 'watchdog', str(directory)])}",
        "events=PROCESS_STATE_EXITED,PROCESS_STATE_FATAL",
        "priority=1",  # started first, stopped last
        f'environment=SUPERVISOR_USERNAME="{USER}",SUPERVISOR_PASSWORD="{password}"',
        "autorestart=true",
        "stderr_logfile=/dev/stderr",
        "stderr_logfile_maxbytes=0",
    ]
    for name in settings.pod:
        sections += [
            "",
            f"[program:{name}]",
            f"command={_quote([*me, 'tag', name, '--', *program_argv(name, settings)])}",
            "autostart=true",
            "autorestart=false",  # the watchdog restarts: at once, then with a growing pause
            f"startsecs={settings.pod_start_seconds:g}",
            f"startretries={settings.pod_start_retries}",
            "stopsignal=TERM",  # Celery's warm shutdown: the running job finishes
            f"stopwaitsecs={settings.drain_seconds:g}",
            "killasgroup=true",
            "stdout_logfile=/dev/stdout",
            "stdout_logfile_maxbytes=0",
            "redirect_stderr=true",
        ]
    return "\n".join(sections) + "\n"


# -- the wrapper ---------------------------------------------------------------------------------
def run(settings: Settings) -> int:
    """Start supervisord on ``settings.pod``; forward signals, reap orphans; return the exit status."""
    directory = settings.pod_dir or Path(tempfile.mkdtemp(prefix="ourvidz-pod-"))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / FAILED).unlink(missing_ok=True)
    conf = directory / "supervisord.conf"
    conf.write_text(render(settings, directory))
    child = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)])

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    status = _reap_until(child.pid)
    failed = directory / FAILED
    if failed.exists():
        print(f"bin/worker all: {failed.read_text().strip()}; exiting 1", file=sys.stderr, flush=True)
        return 1
    return status


def _reap_until(pid: int) -> int:
    """Wait for ``pid``, reaping every other child meanwhile (orphans re-parented to PID 1)."""
    while True:
        try:
            done, status = os.wait()
        except ChildProcessError:
            return 1
        if done == pid:
            return os.waitstatus_to_exitcode(status)


# -- the programs' log tagger ----------------------------------------------------------------------
def tag(name: str, argv: list[str], out: TextIO = sys.stdout) -> int:
    """Run ``argv``, copying its output line by line as ``name | line``; return its exit status.

    SIGTERM and SIGINT are passed to the program (which drains) while its output is still read;
    supervisord's final SIGKILL reaches both through the process group.
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    assert proc.stdout is not None
    prefix = f"{name} | ".encode()
    sink = out.buffer if hasattr(out, "buffer") else None
    for line in iter(proc.stdout.readline, b""):
        if sink is not None:
            sink.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
            sink.flush()
        else:
            out.write((prefix + line).decode(errors="replace"))
            out.flush()
    code = proc.wait()
    return 128 - code if code < 0 else code


# -- the watchdog -------------------------------------------------------------------------------------
class CrashCounter:
    """Crashes per program in a sliding window: the pause before the next start, and when to give up."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self.crashes: dict[str, deque[float]] = {}

    def crashed(self, name: str) -> int:
        """Record a crash of ``name``; return its crashes within the window."""
        now = self.clock()
        times = self.crashes.setdefault(name, deque())
        times.append(now)
        while times and times[0] < now - self.window:
            times.popleft()
        return len(times)

    def pause(self, count: int) -> float:
        """Seconds before restarting after the ``count``-th recent crash: 0, then 1, 2, 4... up to 30."""
        return 0.0 if count <= 1 else min(MAX_PAUSE, 2.0 ** (count - 2))

    def exhausted(self, count: int) -> bool:
        return count >= self.limit


def watchdog(directory: Path, settings: Settings) -> None:
    """supervisord event listener: restart crashed programs, give the pod up when one crash-loops."""
    from supervisor import childutils

    counter = CrashCounter(settings.pod_crash_limit, settings.pod_crash_window)

    def rpc() -> Any:
        return childutils.getRPCInterface(os.environ)

    def give_up(reason: str) -> None:
        (directory / FAILED).write_text(reason + "\n")
        print(f"watchdog: {reason}; stopping the pod", file=sys.stderr, flush=True)
        rpc().supervisor.shutdown()

    def start_later(name: str, pause: float) -> None:
        def start() -> None:
            try:
                rpc().supervisor.startProcess(f"{GROUP}:{name}", False)
            except Exception as exc:  # the pod is shutting down, or it was started meanwhile
                print(f"watchdog: {name} not restarted ({exc})", file=sys.stderr, flush=True)

        timer = threading.Timer(pause, start)
        timer.daemon = True
        timer.start()

    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        event = headers.get("eventname", "")
        fields = childutils.get_headers(payload)
        name = fields.get("processname", "?")
        if fields.get("groupname") == GROUP:
            if event == "PROCESS_STATE_FATAL":
                give_up(f"{name} could not start after {settings.pod_start_retries} retries")
            elif event == "PROCESS_STATE_EXITED":
                count = counter.crashed(name)
                if counter.exhausted(count):
                    give_up(f"{name} crashed {count} times in {settings.pod_crash_window:g} s")
                else:
                    pause = counter.pause(count)
                    print(f"watchdog: {name} exited (pid {fields.get('pid')}); restarting in {pause:g} s",
                          file=sys.stderr, flush=True)
                    start_later(name, pause)
        childutils.listener.ok(sys.stdout)


def main(argv: list[str]) -> int:
    """``python -m ourvidz_tasks.tools.supervise watchdog DIR | tag NAME -- ARGV...`` (supervisord's)."""
    from ..contract.settings import load_settings

    if argv[:1] == ["watchdog"] and len(argv) == 2:
        watchdog(Path(argv[1]), load_settings())
        return 0
    if argv[:1] == ["tag"] and len(argv) > 3 and argv[2] == "--":
        return tag(argv[1], argv[3:])
    print("usage: supervise watchdog DIR | tag NAME -- ARGV...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
