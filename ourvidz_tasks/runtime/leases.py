"""Leases on the memory ledger: a :class:`Reservation` and the :class:`Heartbeat` that keeps it alive.

A reservation expires ``lease_seconds`` after its last refresh
(:class:`~ourvidz_tasks.runtime.ledger.Ledger`); a :class:`Heartbeat` thread
refreshes every reservation of the process. An expired lease (a killed worker)
is reclaimed by whichever ledger call comes next. A live holder that was
reclaimed anyway (stalled past its lease) is reinstated at its next refresh,
even over the budget: the memory is really held, and the accounts say so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

import redis

log = logging.getLogger(__name__)


class LeaseBook(Protocol):
    """What a reservation asks of its ledger (:class:`~ourvidz_tasks.runtime.ledger.Ledger` does it)."""

    def refresh_lease(self, member: str, token: str, mb: int) -> int: ...

    def release_lease(self, member: str, token: str) -> int: ...

    def regrant(self, pool: str, model: str, mb: int, token: str) -> bool: ...


class Reservation:
    """MB of the budget held for one model of one pool; refresh its lease, release it once."""

    def __init__(self, ledger: LeaseBook, pool: str, model: str, mb: int, token: str, waited: float) -> None:
        self.ledger, self.pool, self.model, self.mb = ledger, pool, model, mb
        self.token, self.waited = token, waited
        self.released = False
        self._lock = threading.Lock()

    @property
    def member(self) -> str:
        return f"{self.pool}/{self.model}"

    def refresh(self) -> bool:
        """Renew the lease; False once released or when another holder took the slot."""
        with self._lock:
            if self.released:
                return False
            code = self.ledger.refresh_lease(self.member, self.token, self.mb)
        if code == 2:
            log.warning("%s: lease had expired and was reclaimed; reinstated (%d MB)", self.member, self.mb)
        return bool(code)

    def resize(self, mb: int) -> bool:
        """Hold ``mb`` instead (grow only when it fits now, nobody waiting); True when done."""
        with self._lock:
            if self.released:
                return False
            if self.ledger.regrant(self.pool, self.model, mb, self.token):
                self.mb = mb
                return True
            return False

    def grown(self, mb: int) -> None:
        """The ledger granted this reservation ``mb`` (its token, in line): hold that from now."""
        with self._lock:
            self.mb = mb

    def release(self) -> int:
        """Give the MB back (idempotent); returns the MB released."""
        with self._lock:
            if self.released:
                return 0
            self.released = True
            return self.ledger.release_lease(self.member, self.token)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Reservation({self.member!r}, {self.mb} MB{', released' if self.released else ''})"


class Heartbeat:
    """Refreshes the leases of the reservations it holds, from a daemon thread.

    ``on_lost(reservation)`` is called when a reservation's slot was taken by
    another holder (its refresh returned False while not released).
    """

    def __init__(self, interval: float, on_lost: Callable[[Reservation], None] | None = None) -> None:
        if interval <= 0:
            raise ValueError(f"`interval` must be positive, got {interval}")
        self.interval, self.on_lost = interval, on_lost
        self._held: set[Reservation] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, reservation: Reservation) -> None:
        with self._lock:
            self._held.add(reservation)

    def discard(self, reservation: Reservation) -> None:
        with self._lock:
            self._held.discard(reservation)

    def beat(self) -> None:
        """One round of refreshes (the thread calls it every ``interval``)."""
        with self._lock:
            held = list(self._held)
        for res in held:
            try:
                ok = res.refresh()
            except redis.RedisError as exc:
                log.warning("lease refresh of %s failed: %s", res.member, type(exc).__name__)
                continue
            if res.released:
                self.discard(res)
            elif not ok:
                log.error("%s: reservation lost to another holder", res.member)
                self.discard(res)
                if self.on_lost is not None:
                    self.on_lost(res)

    def start(self) -> Heartbeat:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ledger-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()
