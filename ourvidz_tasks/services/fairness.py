"""A fair share of each family's pools across users, and where a job stands (issue 26).

Publishers keep sending the contract's message to the family queue (a Redis list). The pools take
it from there into the queue's *fair order* on the broker and serve that instead of the list:

- **intake** (:class:`Intake`, a thread in every pool): messages move atomically off the queue into
  the intake's processing list (:mod:`.fetching`: registered, handed back if the pool dies), then in
  one script (:data:`~.fair_scripts.ADMIT`) into the fair order with their start tags, costed in
  estimated GPU-seconds and weighted per user;
- **fetch** (:func:`pick_command`, sent by the broker guard in place of kombu's ``BRPOP``): the
  smallest start tag moves into the consumer's processing list; an idle pool waits on the queue's
  bell (:func:`bell_command`), rung by every intake;
- **end** (:func:`finished`): the user's virtual finish corrected by the GPU-seconds the job took.

At no moment is a message only in one process's memory: it is on the list, in a processing list,
in the fair order or in kombu's ``unacked``, and each move is one script. Where a job stands
(:func:`standing`) is one script too, whatever the queue's length (CONTRACT section 7).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from ..contract import keys, names
from ..contract.jobs import usable_id
from ..contract.text import as_text
from . import fair_scripts, fetching
from .backoff import Backoff
from .plugins import import_callable

log = logging.getLogger(__name__)

#: kombu's Redis priority steps and separator: the lists one queue is published on, in fetch order
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"

#: ``estimate(family, job) -> seconds`` of GPU time a raw job will take (``services.durations``)
Estimate = Callable[[str, Mapping[str, Any]], float]
#: ``weigh(user_id) -> weight`` in the fair order (``OURVIDZ_FAIR_WEIGHTS``)
Weigh = Callable[[str], float]
#: the smallest weight a user can have (a zero weight would divide by zero)
MIN_WEIGHT = 0.01


def sources(queue: str) -> list[str]:
    """The Redis lists ``queue`` is published on, in kombu's fetch (priority) order."""
    return [queue if pri == 0 else f"{queue}{PRIORITY_SEP}{pri}" for pri in PRIORITY_STEPS]


#: every family's lists and their family: where a job published but not yet taken in is looked for
FAMILY_LISTS: tuple[tuple[str, str], ...] = tuple((s, f) for f in names.FAMILIES for s in sources(f))


def queue_of(source: str) -> str:
    return source.split(PRIORITY_SEP, 1)[0]


def parts(queue: str) -> list[str]:
    return [keys.fair(queue, part) for part in fair_scripts.PARTS]


def intake_lists(owner: str) -> str:
    """The name an intake's processing lists go by (:func:`keys.fetching`), apart from its fetch's."""
    return f"{owner}{keys.INTAKE_SUFFIX}"


# -- what a message is ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Arrival:
    """One message taken off a queue: who it is for and what it will cost."""

    source: str
    item: bytes
    tag: str
    job_id: str
    user: str
    cost: float
    weight: float


def describe(item: bytes) -> tuple[str, dict[str, Any] | None]:
    """The delivery tag and the job (first positional argument) of a Celery message; ``('-', None)``
    for anything else (the fetch dead-letters or re-publishes it as it always did)."""
    try:
        envelope = json.loads(as_text(item))
        props = envelope["properties"]
        body = envelope["body"]
        raw = base64.b64decode(body) if props.get("body_encoding") == "base64" else body
        args = json.loads(raw)[0]
        job = args[0] if isinstance(args, list) and args and isinstance(args[0], dict) else None
        return str(props.get("delivery_tag") or "-")[:64], job
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "-", None


def user_of(job: Mapping[str, Any] | None) -> str:
    """The job's user, if it has a usable one ('' otherwise: those share one place in the order)."""
    user = usable_id({"id": job.get("user_id")}) if job is not None else None
    return user or ""


# -- weights -------------------------------------------------------------------------------------
def load_weights(setting: str, broker: redis.Redis) -> Weigh:
    """``OURVIDZ_FAIR_WEIGHTS``: a ``module:callable``, or ``tier=weight`` pairs over the tiers that
    ``ourvidz tier`` records (unknown tiers and users weigh 1); empty: everyone weighs 1."""
    setting = setting.strip()
    if not setting:
        return lambda user: 1.0
    if "=" not in setting:
        return import_callable(setting, "OURVIDZ_FAIR_WEIGHTS")
    tiers: dict[str, float] = {}
    for pair in setting.split(","):
        name, _, value = pair.partition("=")
        tiers[name.strip()] = float(value)

    def by_tier(user: str) -> float:
        tier = broker.hget(keys.FAIR_TIERS, user) if user else None
        return tiers.get(as_text(tier), 1.0) if tier is not None else 1.0

    return by_tier


class _Remembered:
    """``weigh`` answered from memory for ``ttl`` seconds per user (one lookup per user, not per job)."""

    def __init__(self, weigh: Weigh, ttl: float = 30.0) -> None:
        self.weigh, self.ttl = weigh, ttl
        self._known: dict[str, tuple[float, float]] = {}

    def __call__(self, user: str) -> float:
        now = time.monotonic()
        known = self._known.get(user)
        if known is None or now - known[1] > self.ttl:
            if len(self._known) > 10_000:
                self._known.clear()
            known = (max(MIN_WEIGHT, float(self.weigh(user))), now)
            self._known[user] = known
        return known[0]


# -- intake --------------------------------------------------------------------------------------
class Intake:
    """Takes the messages published on ``queues`` into their fair order as they arrive (a daemon thread).

    ``owner`` is the pool's crash-recovery incarnation: its intake lists go back to their queue
    when it is gone. Every pool of a family runs one; the lists' atomic moves share the work.
    """

    def __init__(self, broker: redis.Redis, owner: str, queues: Sequence[str], *, estimate: Estimate,
                 weigh: Weigh, ttl: int, batch: int = 64, block: float = 1.0) -> None:
        self.broker, self.owner, self.queues = broker, owner, list(queues)
        self.estimate, self.weigh = estimate, _Remembered(weigh)
        self.ttl, self.batch, self.block = ttl, batch, block
        self.sources = [s for q in self.queues for s in sources(q)]
        self.lists = [keys.fetching(intake_lists(owner), s) for s in self.sources]
        self._stranded = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fair-intake", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.block + 5)

    def _loop(self) -> None:
        pauses = Backoff(0.05, 2.0)
        while not self._stop.is_set():
            try:
                self.run_once(self.block)
                pauses = Backoff(0.05, 2.0)
            except redis.RedisError as exc:  # a broker outage: nothing is lost, take in again after it
                self._stranded = True
                log.warning("fair intake: broker %s; again shortly", type(exc).__name__)
                self._stop.wait(pauses.next())

    def run_once(self, block: float = 0.0) -> int:
        """Take in what waits on the queues (waiting up to ``block`` seconds for one); returns how many."""
        if self._stranded:  # start, or after a broker error: what a lost reply moved goes back first
            fetching.restore_own(self.broker, intake_lists(self.owner), self.sources, owner=self.owner)
            self._stranded = False
        pools = keys.fair(self.queues[0], "pools")
        moved = self.broker.eval(  # type: ignore[no-untyped-call]
            fair_scripts.GRAB, 2 * len(self.sources) + 1, *self.sources, *self.lists, pools, self.batch, self.owner)
        pairs = [(as_text(moved[i]), moved[i + 1]) for i in range(0, len(moved), 2)]
        if not pairs and block > 0:
            item = self.broker.execute_command("BLMOVE", self.sources[0], self.lists[0], "RIGHT", "LEFT", block)
            if item is not None:
                pairs = [(self.sources[0], item)]
        for queue in self.queues:
            mine = [(source, item) for source, item in pairs if queue_of(source) == queue]
            if mine:
                self.broker.eval(*self.admit_command(queue, mine))  # type: ignore[no-untyped-call]
        return len(pairs)

    def _arrival(self, source: str, item: bytes) -> Arrival:
        tag, job = describe(item)
        user = user_of(job)
        cost = 0.0
        if job is not None:
            try:
                cost = max(0.0, float(self.estimate(names.family_of_queue(queue_of(source)), job)))
            except Exception as exc:  # an estimate is never a reason to hold a message back
                log.warning("fair intake: no estimate (%s); costed 0", type(exc).__name__)
        return Arrival(source, item, tag, usable_id(job) or "", user, cost, self.weigh(user))

    def admit_command(self, queue: str, pairs: Sequence[tuple[str, bytes]], *, once: bool = False,
                      out_of: str | None = None) -> list[Any]:
        """The script that moves ``(source, message)`` pairs from this intake's lists (or the list
        ``out_of``) into ``queue``'s fair order, each costed and weighed (arguments for ``eval``);
        ``once``: a message's tag names it for good (:data:`~.fair_scripts.ADMIT`)."""
        args: list[Any] = [queue, self.ttl, "1" if once else "0"]
        for source, item in pairs:
            a = self._arrival(source, item)
            processing = out_of or self.lists[self.sources.index(a.source)]
            args += [processing, a.item, a.tag, a.job_id, a.user, repr(a.cost), repr(a.weight)]
        return [fair_scripts.ADMIT, len(fair_scripts.PARTS), *parts(queue), *args]


# -- fetch ---------------------------------------------------------------------------------------
def pick_command(consumer: str, queues: Sequence[str], *, present: float, keep: float) -> list[Any]:
    """The fetch (sent as kombu sends ``BRPOP``): the next message in fair order of the first of
    ``queues`` that has one, moved into ``consumer``'s processing list of that queue."""
    names: list[str] = []
    for queue in queues:
        names += [*parts(queue), keys.fetching(consumer, queue)]
    return ["EVAL", fair_scripts.PICK, len(names), *names, consumer, present, keep, *queues]


def bell_command(queues: Sequence[str], timeout: float) -> list[Any]:
    """What an idle consumer waits on: the queues' bells, rung by every intake (then it picks again)."""
    return ["BLPOP", *(keys.fair(q, "bell") for q in queues), timeout]


# -- start and end -------------------------------------------------------------------------------
def started(broker: redis.Redis, queue: str, job_id: str) -> float | None:
    """An attempt of the job starts: it runs from now (where it stands, the ETA of those behind);
    returns the seconds since it arrived, None when no arrival is recorded. One round trip."""
    now, arrived = broker.eval(fair_scripts.STARTED, 2, keys.fair(queue, "running"),  # type: ignore[no-untyped-call]
                               keys.fair_job(job_id), job_id)
    return None if arrived is None else max(0.0, float(now) - float(arrived))  # ValueError: not a time

def finished(broker: redis.Redis, queue: str, job_id: str, gpu_seconds: float) -> None:
    """The job ended: its user's finish tag corrected by what it really cost, its entries dropped."""
    broker.eval(fair_scripts.FINISH, 3, keys.fair(queue, "users"), keys.fair(queue, "running"),  # type: ignore[no-untyped-call]
                keys.fair_job(job_id), job_id, repr(max(0.0, gpu_seconds)))


# -- where a job stands --------------------------------------------------------------------------
def standing(broker: redis.Redis, job_id: str, *, present: float, store: redis.Redis | None = None) -> dict[str, Any]:
    """Where ``job_id`` stands (CONTRACT section 7): ``state`` and, while queued, ``family``,
    ``position``, ``ahead``, ``eta_s``, ``waited_s``. One script on the broker; with a separate
    store (``OURVIDZ_REDIS_URL``) its terminal record is read there first."""
    if store is not None and store is not broker and store.exists(keys.job_final(job_id)):
        return {"state": "ended"}
    lists, families = zip(*FAMILY_LISTS, strict=True)
    raw = broker.eval(fair_scripts.STANDING, 2 + len(lists), keys.fair_job(job_id),  # type: ignore[no-untyped-call]
                      keys.job_final(job_id), *lists, job_id, present, *families)
    out: dict[str, Any] = json.loads(as_text(raw))
    return out


def depth(client: redis.Redis, queue: str, fair_name: str | None) -> int:
    """Jobs waiting on ``queue``: on its lists (not taken in yet) and in the fair order ``fair_name``
    (``names.fair_queue``; None: no fair order). One round trip."""
    waiting = keys.fair(fair_name, "waiting") if fair_name else keys.fair(queue, "none")
    return int(client.eval(fair_scripts.DEPTH, 5, *sources(queue), waiting))  # type: ignore[no-untyped-call]


def waiting_by_user(broker: redis.Redis, queue: str) -> tuple[dict[str, int], int]:
    """``queue``'s waiting jobs per user in its fair order, and the messages not taken in yet."""
    with broker.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.fair(queue, "counts"))
        for source in sources(queue):
            pipe.llen(source)
        counts, *lengths = pipe.execute()
    return {as_text(u): int(n) for u, n in counts.items() if int(n) > 0}, sum(lengths)
