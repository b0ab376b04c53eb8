"""Proof that a message's owner is gone, before its message is taken from it (issue 24).

A lapsed heartbeat alone is no proof: under saturation (a full ``gc.collect`` in an OOM remedy, load
10 on 2 cores) a live worker's heartbeat thread may miss its lease, and requeueing its job would run
it twice and count a death that never happened. So an owner incarnation is gone only when

- its node runs a newer incarnation (a supervisor restarted it under the same name), or
- it never beat, or its beat record expired, or
- it ran on this host (same host name and pid namespace) and its process is gone (pid and start
  time), whatever its heartbeat says: a stopped or starved process is alive, or
- it ran on another host and did not beat for a lease plus a margin, judged on the broker's clock
  by a scanner that was not itself stalled (:class:`Silence`).
"""

from __future__ import annotations

import json
import os
import socket
import time

import redis

from ..contract import keys
from ..contract.text import as_text


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


#: this host as owners see it: containers on one machine share no pids, so the pid namespace counts
HOST = f"{socket.gethostname()}/{_pid_namespace()}"


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start: str | None) -> bool:
    """True while process ``pid`` runs and is the one that beat (not a later process with its pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    return start is None or now is None or now == start


def now_on(broker: redis.Redis) -> float:
    """The broker's clock (seconds): what every host's beats are judged by."""
    seconds, micros = broker.time()
    return float(seconds) + float(micros) / 1e6


def write_beat(broker: redis.Redis, identity: str, ttl: int) -> None:
    """Record this process's beat: its host, pid and start, at the broker's time."""
    pid = os.getpid()
    record = {"t": now_on(broker), "host": HOST, "pid": pid, "start": process_start(pid)}
    broker.set(keys.beat(identity), json.dumps(record), ex=max(1, ttl))


def owner_gone(broker: redis.Redis, owner: str, silence: float | None) -> bool:
    """Whether incarnation ``owner`` (``node/incarnation``) is proven gone (see the module docstring).

    ``silence``: how long another host's owner must not have beaten to be gone; None when the
    judge itself was stalled and must not judge by silence (the owner is then not gone).
    """
    node, _, incarnation = owner.rpartition("/")
    current = broker.get(keys.incarnation(node)) if node else None
    if current is not None and as_text(current) != incarnation:
        return True
    raw = broker.get(keys.beat(owner))
    record = json.loads(raw) if raw is not None else None
    if record is not None and record.get("host") == HOST:  # this host: the process itself answers
        return not process_alive(int(record["pid"]), record.get("start"))
    if broker.exists(keys.alive(owner)):
        return False
    if record is None:
        return True
    return silence is not None and now_on(broker) - float(record["t"]) > silence


class Silence:
    """How long an owner on another host must be silent before a scanner may call it gone.

    A lease plus a margin: one more lease, plus the longest stall this scanner itself had lately
    (what it missed of the world while it did not run). A scan that starts late by more than a
    scan period does not judge by silence at all: the scanner was stalled, not the owner.
    """

    def __init__(self, lease: float, period: float) -> None:
        self.lease, self.period = lease, period
        self._last = time.monotonic()
        self._stalls: list[float] = []

    def tick(self) -> float | None:
        """Called at each scan: the silence that proves an owner gone now, or None (do not judge)."""
        now = time.monotonic()
        late = max(0.0, now - self._last - self.period)
        self._last = now
        self._stalls = [*self._stalls, late][-16:]
        if late > self.period:
            return None
        return 2 * self.lease + max(self._stalls)
