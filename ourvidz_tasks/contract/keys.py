"""Every Redis key of the project (the ``ourvidz:`` namespace), spelled once.

Each key is a constant or a function of its variable parts. A ``*_PREFIX``
constant is the fixed part of a family of keys, for ``SCAN MATCH prefix*``
and for reading the variable part back (``key.removeprefix(PREFIX)``).
Unless a docstring names the broker (``OURVIDZ_BROKER_URL``), a key lives in
the store ``OURVIDZ_REDIS_URL``; the two are one Redis in most deployments.
"""

from __future__ import annotations

NAMESPACE = "ourvidz:"

# -- jobs and their callbacks ------------------------------------------------------------------
JOB_PREFIX = "ourvidz:job:"


def job_final(job_id: str) -> str:
    """The job's recorded terminal callback body; written first-wins by ``services.delivery``, TTL ``terminal_ttl``."""
    return f"{JOB_PREFIX}{job_id}:final"


def job_delivered(job_id: str) -> str:
    """``1`` once the terminal callback reached the edge; ``delivery.mark_delivered``, TTL ``terminal_ttl``."""
    return f"{JOB_PREFIX}{job_id}:delivered"


#: list of the most recently ended job ids, oldest first; ``services.delivery`` (capped, TTL ``terminal_ttl``)
JOBS_ENDED = "ourvidz:jobs:ended"

CANCEL_PREFIX = "ourvidz:cancel:"


def cancel(job_id: str) -> str:
    """Set by ``ourvidz cancel`` (``runtime.lifecycle.cancel``), read at each step by the worker; TTL 24 h."""
    return f"{CANCEL_PREFIX}{job_id}"


def deliveries(job_id: str, retries: int) -> str:
    """Broker: how often one attempt of a job was delivered (poison detection); ``runtime.recovery``, TTL given."""
    return f"ourvidz:deliveries:{job_id}:{retries}"


# -- the callback outbox (services.outbox_store) -----------------------------------------------
#: list of entries ``{"job_id", "body", "at"}`` waiting for the edge, oldest first; no TTL (drained)
OUTBOX = "ourvidz:outbox"
#: hash job id -> entries of that job in :data:`OUTBOX`; ``outbox_store``, no TTL (counted off)
OUTBOX_JOBS = "ourvidz:outbox:jobs"
#: the one drainer at a time (token); ``outbox_store``, TTL the lock time
OUTBOX_LOCK = "ourvidz:outbox:lock"
#: heartbeat of a ``bin/worker outbox`` consumer (its node); ``outbox_store``, short TTL
OUTBOX_CONSUMER = "ourvidz:outbox:consumer"
#: ``{"at", "ok", "error"}`` of the last delivery try; ``outbox_store``, TTL ``idempotency_ttl``
OUTBOX_LAST = "ourvidz:outbox:last"

# -- dead letters (services.guard) ---------------------------------------------------------------
#: list of messages that are not runnable tasks, with their reason; ``services.guard``, TTL 30 days
DEAD_LETTERS = "ourvidz:dead"

# -- workers -----------------------------------------------------------------------------------
LOADS_PREFIX = "ourvidz:loads:"


def loads(node: str) -> str:
    """Hash model -> times loaded by worker ``node``; ``runtime.runtime``, TTL 7 days (read by ``ourvidz memory``)."""
    return f"{LOADS_PREFIX}{node}"


ALIVE_PREFIX = "ourvidz:alive:"


def alive(identity: str) -> str:
    """Broker: heartbeat of one worker incarnation (``{node}/{incarnation}``); ``runtime.recovery``, TTL the lease."""
    return f"{ALIVE_PREFIX}{identity}"


def incarnation(node: str) -> str:
    """Broker: the newest incarnation of worker ``node``; ``runtime.recovery``, TTL the owner TTL."""
    return f"ourvidz:incarnation:{node}"


def beat(identity: str) -> str:
    """Broker: ``{"t", "host", "pid", "start"}`` of an incarnation's last beat (``t``: the broker's clock);
    ``runtime.liveness``, TTL the owner TTL (proof that an owner is gone: its process, or its silence)."""
    return f"ourvidz:beat:{identity}"


def job_running(job_id: str) -> str:
    """Broker: the incarnation running the job now (a redelivered copy waits for it); ``runtime.admission``,
    deleted when the attempt ends, TTL ``idempotency_ttl``."""
    return f"{JOB_PREFIX}{job_id}:running"


OWNER_PREFIX = "ourvidz:owner:"

#: Broker: hash processing list -> ``{"owner", "queue"}`` of every consumer's fetch lists; ``services.fetching``
FETCHERS = "ourvidz:fetchers"
FETCHING_PREFIX = "ourvidz:fetching:"
#: what a pool's fair intake adds to its incarnation's name for its own processing lists
INTAKE_SUFFIX = "+intake"


def fetching(identity: str, source: str) -> str:
    """Broker: messages incarnation ``identity`` took off list ``source`` and has not recorded in ``unacked``
    yet (one at most); ``services.fetching``, no TTL (emptied by the consumer, or by recovery once it is gone)."""
    return f"{FETCHING_PREFIX}{identity}:{source}"


def owner(delivery_tag: str) -> str:
    """Broker: the incarnation holding a message (by delivery tag); ``runtime.recovery``, TTL owner TTL, then grace."""
    return f"{OWNER_PREFIX}{delivery_tag}"


# -- memory ledger (runtime.ledger) --------------------------------------------------------------
LEDGER_PREFIX = "ourvidz:ledger:"
#: SCAN pattern of every device's ledger ``meta`` hash (read by ``services.metrics``)
LEDGER_META_PATTERN = "ourvidz:ledger:*:meta"


def ledger(host: str, device: str) -> str:
    """Prefix of one device's ledger keys (``{prefix}:{part}``, e.g. ``:meta``, ``:held``); ``runtime.ledger``."""
    return f"{LEDGER_PREFIX}{host}:{device}"


# -- autoscaling (services.autoscale) --------------------------------------------------------------


def autoscale_head(queue: str) -> str:
    """Broker: hash ``{id, since}`` of the message first in line of ``queue``; ``services.autoscale``, TTL 24 h."""
    return f"ourvidz:autoscale:head:{queue}"


# -- the legacy-list bridge (tools.bridge) ---------------------------------------------------------
#: the one running bridge (token); ``tools.bridge``, TTL the lock time
BRIDGE_LOCK = "ourvidz:bridge:lock"


def bridge_processing(source: str) -> str:
    """The bridge's in-flight copy of legacy list ``source`` (BLMOVE target); ``tools.bridge``, TTL 30 days."""
    return f"ourvidz:bridge:processing:{source}"


def bridge_record(job_id: str) -> str:
    """``publishing``/``published``: the bridge's claim on a job id; ``tools.bridge``, TTL 7 days."""
    return f"ourvidz:bridge:job:{job_id}"


# -- fair order across users (services.fairness; all on the broker) ---------------------------------
FAIR_PREFIX = "ourvidz:fair:"
#: hash user -> tier, read by the tier weights of ``OURVIDZ_FAIR_WEIGHTS``; ``ourvidz tier``, no TTL (operator's)
FAIR_TIERS = "ourvidz:fair:tiers"


def fair(queue: str, part: str) -> str:
    """Broker: one part of ``queue``'s fair order (``services.fairness``): ``waiting`` (zset member ->
    start tag), ``messages``/``meta`` (hash member -> message / ``{j, c, u}``), ``users`` (zset user ->
    last finish tag, pruned below the virtual clock), ``counts`` (hash user -> waiting jobs), ``state``
    (hash ``v``, ``seq``, ``cost``), ``running`` (zset job id -> pick time, pruned by age), ``pools``
    (zset consumer -> last fetch, pruned by age), ``bell`` (wake-up tokens, capped). Bounded by the
    waiting jobs and the live users and pools."""
    return f"{FAIR_PREFIX}{queue}:{part}"


def fair_job(job_id: str) -> str:
    """Broker: hash of a job taken into a fair order: ``queue``, ``member``, ``start``, ``cost``,
    ``user``, ``weight``, ``arrived`` (broker clock, seconds); ``services.fairness``, deleted when the
    job ends, TTL ``idempotency_ttl``."""
    return f"{FAIR_PREFIX}job:{job_id}"


# -- where a job stands, what jobs take, who used the GPU (issue 26) -----------------------------
def job_gpu(job_id: str) -> str:
    """Model seconds of a job's earlier attempts (retried ones), summed into the terminal callback's
    ``gpu_seconds``; ``runtime.bookkeeping``, deleted when the job ends, TTL ``terminal_ttl``."""
    return f"{JOB_PREFIX}{job_id}:gpu"


DURATIONS_PREFIX = "ourvidz:durations:"


def durations(family: str, shape: str) -> str:
    """List of the last seconds jobs of one shape took on a family's pools, newest first;
    ``services.durations``, capped at ``duration_window``, TTL 30 days."""
    return f"{DURATIONS_PREFIX}shape:{family}:{shape}"


def duration_rate(family: str) -> str:
    """List of the last seconds per work unit of a family's jobs (any shape), newest first;
    ``services.durations``, capped at ``duration_window``, TTL 30 days."""
    return f"{DURATIONS_PREFIX}rate:{family}"


USAGE_PREFIX = "ourvidz:usage:"


def usage(day: str) -> str:
    """Hash ``{user}:gpu`` -> GPU seconds, ``{user}:jobs`` -> jobs ended on one UTC day (``YYYY-MM-DD``);
    ``services.usage``, TTL 40 days (read by ``ourvidz usage``)."""
    return f"{USAGE_PREFIX}{day}"
