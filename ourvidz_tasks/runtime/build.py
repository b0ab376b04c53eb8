"""Building a pool's :class:`~ourvidz_tasks.runtime.runtime.Runtime`: clients, policy, ledger, model slots.

The pool's family is the queue it consumes (``bin/worker sdxl`` consumes ``sdxl``); its model
slots load through the family's loaders below. This module is a pool's own: it imports the model
loaders (torch, PIL), which the outbox consumer's light install does not have.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx
from celery import Celery

from ..contract import names
from ..contract.settings import Settings, load_settings
from ..models import resolve_device, use_device
from ..models.chat_engine import load_chat_engine
from ..models.chat_remote import RemoteChat
from ..models.sdxl import load_sdxl
from ..models.wan import load_wan
from ..services.delivery import Delivery
from ..services.durations import Durations
from ..services.fair_relay import Relay
from ..services.fairness import Intake, load_weights
from ..services.fetch import ReferenceFetcher
from ..services.guard import DeadLetters
from ..services.outbox_store import pool_callbacks
from ..services.policy import load_policy
from ..services.redis_client import connect
from .deadletters import route_raw_jobs
from .estimates import first_estimate
from .faults import exit_when_dead, load_plugins
from .ledger import Ledger
from .memprobe import configure_cuda_allocator, probe_for
from .recovery import Recovery
from .runtime import Loaded, ModelSlot, Runtime

if TYPE_CHECKING:
    import torch


def loaders(family: str, settings: Settings, device: torch.device) -> dict[str, Callable[[], Loaded]]:
    """The model slots of ``family`` and how each one loads."""
    if family == "sdxl":
        return {"sdxl": lambda: load_sdxl(settings, device)}
    if family == "wan":
        return {"wan": lambda: load_wan(settings, device)}
    if settings.chat_server_url:  # an external engine answers; nothing loads here
        return {"qwen_instruct": lambda: RemoteChat(settings, "qwen_instruct"),
                "qwen_base": lambda: RemoteChat(settings, "qwen_base")}
    return {
        "qwen_instruct": lambda: load_chat_engine(settings, "qwen_instruct", device, exit_when_dead("qwen_instruct")),
        "qwen_base": lambda: load_chat_engine(settings, "qwen_base", device, exit_when_dead("qwen_base")),
    }


def build_runtime(app: Celery, family: str, worker_id: str, settings: Settings | None = None) -> Runtime:
    """Everything a pool needs, built once: clients, policy, model slots (nothing loaded yet)."""
    configure_cuda_allocator()  # before the first CUDA allocation
    import torch  # the worker install's; imported here, after the allocator is configured

    settings = settings or load_settings()
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // len(names.FAMILIES))
    torch.set_num_threads(threads)
    device = resolve_device(settings.device)
    use_device(device)  # cuda:N current before anything measures or allocates
    store = connect(settings.redis, settings)
    dead = DeadLetters(store)
    client = httpx.Client(timeout=settings.http_timeout, follow_redirects=False)
    transport, drainer = pool_callbacks(settings, store, client, worker_id) if settings.callbacks == "outbox" \
        else (None, None)
    runtime = Runtime(
        settings=settings, family=family, worker_id=worker_id, device=device, redis=store,
        delivery=Delivery(settings, worker_id, store, client=client, transport=transport),
        fetcher=ReferenceFetcher(settings),
        policy=load_policy(settings.prompt_policy), dead=dead, drainer=drainer,
    )
    if settings.broker_is_redis:
        runtime.recovery = Recovery(
            connect(settings.broker_url, settings), worker_id,
            lease_seconds=settings.lease_seconds, owner_ttl=settings.visibility_timeout,
        )
        if settings.fair_order:
            broker = runtime.recovery.broker
            runtime.intake = Intake(broker, runtime.recovery.identity, [family],
                                    estimate=Durations(store, settings).estimate,
                                    weigh=load_weights(settings.fair_weights, broker), ttl=settings.idempotency_ttl)
    elif settings.fair_relay:
        intake = Intake(store, worker_id, [names.ready_queue(family)], estimate=Durations(store, settings).estimate,
                        weigh=load_weights(settings.fair_weights, store), ttl=settings.idempotency_ttl)
        runtime.relay = Relay(settings.broker_url, store, worker_id, intake=intake,
                              source=app.amqp.queues[family], ready=app.amqp.queues[names.ready_queue(family)],
                              present=settings.lease_seconds, keep=2.0 * settings.max_job_seconds,
                              transport_options=dict(app.conf.broker_transport_options or {}))
    runtime.ledger = Ledger.for_settings(store, settings, device)
    runtime.heartbeat = runtime.ledger.keepalive()

    runtime.probe = probe_for(device)
    runtime.attempt_hooks.append(runtime.restart_measurement)
    runtime.models = {
        name: ModelSlot(name, loader, runtime.record_load, pool=family, ledger=runtime.ledger,
                        heartbeat=runtime.heartbeat, wait=settings.memory_wait,
                        **first_estimate(name, tiny=settings.model_source == "tiny", slack=settings.memory_slack,
                                         shape=f"tokens:{settings.chat_cache_tokens}" if family == "chat" else None))
        for name, loader in loaders(family, settings, device).items()
    }
    route_raw_jobs(app, dead)
    load_plugins(settings.runtime_plugins, runtime)
    return runtime
