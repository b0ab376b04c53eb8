"""The fair order on RabbitMQ: each pool relays its family queue through it (issue 26).

Publishers keep sending to the family queue (``sdxl``). On a Redis broker the pools fetch from the
fair order directly (:mod:`.fairness`); a RabbitMQ consumer cannot choose what it is sent, so here
each pool runs two threads around the same fair order, kept in the store (``OURVIDZ_REDIS_URL``):

- **take**: consumes the family queue and moves each message into the fair order (one MULTI: the
  message into this node's intake list and :data:`~.fair_scripts.ADMIT` out of it), then acks it. A
  connection lost before the ack gives the message back to RabbitMQ; taken in twice, it is admitted
  once (ADMIT knows the message by its task id and retry count).
- **give**: while the family's *ready queue* (:func:`~ourvidz_tasks.contract.names.ready_queue`,
  what the pools' Celery consumes) is empty, picks the next message in fair order into this node's
  processing list, publishes it there with a publisher confirm, and drops it from the list. What a
  crash leaves in the list (one message at most) goes back into the fair order, in its place, when a
  pool of the same name starts again.

So the ready queue holds about one message beyond what the pools run: the order is decided as late
as it can be, and a message is always in RabbitMQ or in the store, never in one process only.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from typing import Any

import redis
from kombu import Connection, Queue

from ..contract import keys
from ..contract.text import as_text
from . import fairness
from .backoff import Backoff
from .fairness import Intake

log = logging.getLogger(__name__)

#: seconds between two looks at a ready queue that holds a message already
READY_POLL = 0.05


def envelope_of(message: Any) -> bytes:
    """An AMQP message as the Redis transport stores one (what the fair order holds), tagged by its
    task id and retry count (a redelivery is the same message; a retry is a new one)."""
    headers = dict(message.headers or {})
    props = message.properties or {}
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": message.content_encoding, "content-type": message.content_type,
        "headers": headers,
        "properties": {
            "correlation_id": props.get("correlation_id"), "reply_to": props.get("reply_to"),
            "priority": props.get("priority") or 0, "body_encoding": "base64",
            "delivery_tag": f"{headers.get('id')}:{headers.get('retries') or 0}",
        },
    }, default=str).encode()  # AMQP header tables may hold timestamps (x-death after a delayed delivery)


class Relay:
    """The take and give threads of one pool (``node``): ``source`` (the family queue) through the
    fair order of ``intake`` to ``ready`` (see the module)."""

    def __init__(self, broker_url: str, store: redis.Redis, node: str, *, intake: Intake,
                 source: Queue, ready: Queue, present: float, keep: float,
                 transport_options: dict[str, Any] | None = None) -> None:
        self.url, self.store, self.node = broker_url, store, node
        self.intake, self.source, self.ready = intake, source, ready
        #: the fair order's name: the ready queue's (``names.fair_queue``), the intake's one queue
        self.queue = intake.queues[0]
        self.present, self.keep = present, keep
        self.options = dict(transport_options or {})
        self.processing = keys.fetching(node, self.queue)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(step,), name=f"fair-{step.__name__}", daemon=True)
                         for step in (self._take, self._give)]

    def start(self) -> None:
        self.readmit()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def readmit(self) -> int:
        """What an earlier process of this node picked and may not have published: back in its place."""
        stranded: list[bytes] = self.store.lrange(self.processing, 0, -1)  # type: ignore[assignment]
        if not stranded:
            return 0
        command = self.intake.admit_command(self.queue, [(self.queue, item) for item in stranded],
                                            out_of=self.processing)
        moved = int(self.store.eval(*command))  # type: ignore[no-untyped-call]
        log.warning("fair relay: %d message(s) picked by an earlier %s back in the fair order", moved, self.node)
        return moved

    def _run(self, step: Any) -> None:
        pauses = Backoff(0.1, 5.0)
        while not self._stop.is_set():
            try:
                with Connection(self.url, transport_options=self.options, heartbeat=0) as conn:
                    conn.ensure_connection(max_retries=1)
                    pauses = Backoff(0.1, 5.0)
                    step(conn)
            except Exception as exc:  # a broker or store outage: nothing is lost; again after a pause
                log.warning("fair relay (%s): %s; again shortly", step.__name__, type(exc).__name__)
                self._stop.wait(pauses.next())

    def _take(self, conn: Connection) -> None:
        lists = self.intake.lists[0]

        def on_message(message: Any) -> None:  # undecoded: whatever it holds, the pools' consumer judges it
            item = envelope_of(message)
            with self.store.pipeline(transaction=True) as pipe:
                pipe.lpush(lists, item)
                pipe.eval(*self.intake.admit_command(self.queue, [(self.queue, item)], once=True))
                pipe.execute()
            message.ack()

        with conn.Consumer([self.source], on_message=on_message, prefetch_count=64):
            while not self._stop.is_set():
                try:
                    conn.drain_events(timeout=1.0)
                except TimeoutError:
                    continue

    def _give(self, conn: Connection) -> None:
        channel = conn.channel()
        producer = conn.Producer(channel)
        pick = fairness.pick_command(self.node, [self.queue], present=self.present, keep=self.keep)
        bell = fairness.bell_command([self.queue], 1.0)
        while not self._stop.is_set():
            _, waiting, _ = channel.queue_declare(queue=self.ready.name, passive=True)
            if waiting:
                self._stop.wait(READY_POLL)
                continue
            reply = self.store.execute_command(*pick)
            if not reply:
                self.store.execute_command(*bell)
                continue
            item = reply[1]
            env = json.loads(as_text(item))
            props = env.get("properties") or {}
            producer.publish(
                base64.b64decode(env["body"]), exchange=self.ready.exchange, routing_key=self.ready.routing_key,
                headers=env.get("headers") or {}, content_type=env.get("content-type"),
                content_encoding=env.get("content-encoding"), correlation_id=props.get("correlation_id"),
                reply_to=props.get("reply_to") or None, priority=props.get("priority") or 0, delivery_mode=2,
                retry=False,
            )
            self.store.lrem(self.processing, 1, item)
