"""The broker fetch without a window: a message is always on the broker, never in one process only.

kombu's Redis transport pops a message with ``BRPOP`` and records it in the
``unacked`` hash with a second command; a connection cut (or a crash) in
between leaves the message in that process's memory alone. Our guard
(:mod:`.guard`) fetches instead by moving the message atomically (a script, or
``BLMOVE``) into a *processing list* of the consuming incarnation,
:func:`keys.fetching` ``(identity, source)``, and removes it from there in the
transaction that records it in ``unacked``. What is left in a processing list
goes back to its source list:

- by the consumer itself, when it reconnects (:func:`restore_own`);
- by crash recovery once that incarnation is gone (:func:`restore_dead`, which
  ``runtime.recovery`` calls with its judgement of the owner).

Every processing list is registered in :data:`keys.FETCHERS` with its owner
and source, so recovery finds them without scanning the keyspace.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import redis

from ..contract import keys
from ..contract.text import as_text

log = logging.getLogger(__name__)

#: seconds the registry of processing lists (keys.FETCHERS) outlives the last heartbeat or start that touched it
REGISTRY_TTL = 24 * 3600

#: KEYS: n source lists, then their n processing lists. The first non-empty source (kombu's BRPOP
#: order) gives its consuming end to its processing list; returns ``{source, item}`` or nil.
SWEEP = """
local n = #KEYS / 2
for i = 1, n do
  local item = redis.call('LMOVE', KEYS[i], KEYS[n + i], 'RIGHT', 'LEFT')
  if item then return {KEYS[i], item} end
end
return false
"""

#: KEYS[1] a processing list, KEYS[2] its source: everything goes back to the source's consuming end.
RESTORE = """
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
return n
"""


def sweep_command(identity: str, sources: Sequence[str]) -> list[Any]:
    """The non-blocking fetch over every source list (sent by the guard as kombu sends BRPOP)."""
    return ["EVAL", SWEEP, 2 * len(sources), *sources, *(keys.fetching(identity, s) for s in sources)]


def block_command(identity: str, source: str, timeout: float) -> list[Any]:
    """The blocking fetch from one source list (after a sweep found every source empty)."""
    return ["BLMOVE", source, keys.fetching(identity, source), "RIGHT", "LEFT", timeout]


def restore_own(client: redis.Redis, identity: str, sources: Sequence[str], owner: str | None = None) -> int:
    """Register this incarnation's processing lists and put back what they hold (at start, on reconnect).

    ``identity`` names the lists (:func:`keys.fetching`), ``owner`` (default: the same) is the
    incarnation whose death hands them back: a pool's fair intake keeps lists of its own.
    """
    with client.pipeline() as pipe:
        for source in sources:
            processing = keys.fetching(identity, source)
            pipe.hset(keys.FETCHERS, processing, json.dumps({"owner": owner or identity, "queue": source}))
            pipe.eval(RESTORE, 2, processing, source)
        pipe.expire(keys.FETCHERS, REGISTRY_TTL)  # refreshed by every worker's heartbeat too
        results = pipe.execute()
    restored = sum(int(n) for n in results[1:-1:2])
    if restored:
        log.warning("%d message(s) fetched before the broker connection broke are back on their queue", restored)
    return restored


def restore_dead(client: redis.Redis, gone: Callable[[str], bool]) -> int:
    """Put back what the processing lists of every incarnation ``gone`` judges gone hold; forget those lists."""
    restored = 0
    for raw_list, raw_meta in client.hgetall(keys.FETCHERS).items():
        processing = as_text(raw_list)
        try:
            meta = json.loads(raw_meta)
            owner, source = str(meta["owner"]), str(meta["queue"])
        except (ValueError, KeyError, TypeError):
            client.hdel(keys.FETCHERS, processing)
            continue
        if not gone(owner):
            continue
        moved = int(client.eval(RESTORE, 2, processing, source))  # type: ignore[no-untyped-call]
        client.hdel(keys.FETCHERS, processing)
        if moved:
            log.warning("recovery: %d message(s) fetched by %s, never recorded, back on %s", moved, owner,
                        source.split("\x06\x16")[0])
        restored += moved
    return restored


def unfetch(client: redis.Redis, processing: str, item: bytes) -> None:
    """Drop one item from a processing list (it was dead-lettered, not delivered)."""
    client.lrem(processing, 1, item)  # type: ignore[arg-type]  # redis-py takes bytes too
