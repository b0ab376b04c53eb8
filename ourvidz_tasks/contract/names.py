"""The names the pools, the publishers and the operator tools share: families, roles, queues, tasks."""

from __future__ import annotations

from typing import Literal

Family = Literal["sdxl", "chat", "wan"]
#: the model families, one worker pool (and one Celery queue) each
FAMILIES: tuple[Family, ...] = ("sdxl", "chat", "wan")
#: the role and queue of the optional callback outbox consumer (``bin/worker outbox``)
OUTBOX = "outbox"
#: what ``bin/worker`` can run: a family pool or the outbox consumer
ROLES: tuple[str, ...] = (*FAMILIES, OUTBOX)
#: the Celery queues: one per role, named like it
QUEUES = ROLES
#: what one pod (``bin/worker all``) can supervise: the roles, Flower and the metrics exporter
POD_PROGRAMS: tuple[str, ...] = (*ROLES, "flower", "metrics")

ChatModel = Literal["qwen_instruct", "qwen_base"]
#: the chat models a request may name (CONTRACT section 3)
CHAT_MODELS: tuple[ChatModel, ...] = ("qwen_instruct", "qwen_base")
#: the roles of a chat message
CHAT_ROLES = ("system", "user", "assistant")

SDXL_GENERATE = "ourvidz.sdxl.generate"
CHAT_CHAT = "ourvidz.chat.chat"
CHAT_ENHANCE = "ourvidz.chat.enhance"
WAN_GENERATE = "ourvidz.wan.generate"
OUTBOX_DELIVER = "ourvidz.outbox.deliver"
#: the generation task of each family that takes image/video jobs
GENERATE: dict[str, str] = {"sdxl": SDXL_GENERATE, "wan": WAN_GENERATE}
#: every task the workers register
TASKS = (SDXL_GENERATE, CHAT_CHAT, CHAT_ENHANCE, WAN_GENERATE, OUTBOX_DELIVER)


def ready_queue(family: str) -> str:
    """RabbitMQ with the fair order on: the queue a family's pools consume, fed in fair order from the
    family queue the publishers send to (``services.fair_relay``)."""
    return f"{family}.fair"


def fair_queue(family: str, relay: bool) -> str:
    """The name of a family's fair order (``keys.fair``): its queue's on Redis; its ready queue's where
    the pools relay it (RabbitMQ), so one store never mixes the two."""
    return ready_queue(family) if relay else family


def family_of_queue(queue: str) -> str:
    """The family of a queue or of its ready queue."""
    return queue.removesuffix(".fair")


def route_pattern(queue: str) -> str:
    """The Celery ``task_routes`` glob of the tasks of ``queue`` (``ourvidz.{queue}.*``)."""
    return f"ourvidz.{queue}.*"
