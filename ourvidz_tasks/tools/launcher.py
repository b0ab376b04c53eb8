"""``bin/worker sdxl|chat|wan|outbox``: one worker on its role's queue (solo; chat: threads).

``bin/worker all`` runs every program of ``OURVIDZ_POD`` in one container (tools/supervise.py).

``outbox`` is the light callback consumer (no model, no torch: it runs in the plain
``pip install .``); the others are GPU pools (``pip install '.[worker]'``). Each role's
worker imports only its own task module (Celery's ``include``).

The configuration is checked before Celery starts; anything wrong exits with
status 2 and one line naming the variable.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from ..contract.devices import node_name
from ..contract.errors import ConfigError
from ..contract.names import FAMILIES, ROLES, ready_queue
from ..contract.settings import Settings, load_settings
from ..services.policy import load_policy

USAGE = f"usage: bin/worker {'|'.join(ROLES)} [extra celery worker options] | bin/worker all"
MODEL_VARS = {
    "sdxl": ("sdxl_model",),
    "wan": ("wan_model",),
    "chat": ("qwen_instruct_model",),
}


def check(role: str, settings: Settings) -> None:
    """Raise ConfigError (one line) when this role cannot work with ``settings``."""
    settings.require_delivery()
    remote = role == "chat" and settings.chat_server_url
    if role in MODEL_VARS and settings.model_source == "local" and not remote:
        for name in MODEL_VARS[role]:
            path: Path | None = getattr(settings, name)
            env = f"OURVIDZ_{name.upper()}"
            if path is None:
                raise ConfigError(f"{env} is required when OURVIDZ_MODEL_SOURCE=local")
            if not path.exists():
                raise ConfigError(f"{env}: {path} does not exist")
        single_file = role == "sdxl" and settings.sdxl_model and settings.sdxl_model.suffix == ".safetensors"
        if single_file and (settings.sdxl_config is None or not settings.sdxl_config.is_dir()):
            raise ConfigError("OURVIDZ_SDXL_CONFIG must name a local diffusers config folder for a .safetensors checkpoint")
    load_policy(settings.prompt_policy)


def task_modules(role: str) -> list[str]:
    """What the role's worker imports (Celery's ``include``): its own task module only, so the outbox
    consumer never loads a model family's code (nor torch)."""
    return [f"ourvidz_tasks.{role}"]


def worker_argv(role: str, settings: Settings, extra: list[str]) -> list[str]:
    # chat: task threads feeding the one in-process engine (no fork, one model), twice the batch
    # so that requests wait inside the pool, where enhancements pass chats
    pool = ["--pool", "threads", "--concurrency", str(2 * settings.chat_concurrency)] if role == "chat" \
        else ["--pool", "solo", "--concurrency", "1"]
    host = node_name(role, settings.hostname or socket.gethostname(), settings.device)
    return [
        "worker", "--queues", ready_queue(role) if settings.fair_relay and role in FAMILIES else role,
        "--hostname", host, *pool, "--task-events",
        "--without-gossip", "--without-mingle", "--loglevel", "INFO", *extra,
    ]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args == ["all"]:
        raise SystemExit(pod())
    if not args or args[0] not in ROLES:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    role, extra = args[0], args[1:]
    # these libraries' warnings can quote prompts; set before they are imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("OTEL_SERVICE_NAME", f"ourvidz-{role}")  # when tracing is on
    try:
        settings = load_settings()
        check(role, settings)
    except ConfigError as exc:
        print(f"bin/worker {role}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # only now: the app's configuration module reads the settings when it is imported
    from ..celery import app

    app.conf.include = task_modules(role)
    app.worker_main(worker_argv(role, settings, extra))


def pod() -> int:
    """``bin/worker all``: check every role of ``OURVIDZ_POD`` here (exit 2 naming the variable), then
    supervise them all (tools/supervise.py)."""
    from .supervise import run

    try:
        settings = load_settings()
        for role in settings.pod:
            if role in ROLES:
                check(role, settings)
    except ConfigError as exc:
        print(f"bin/worker all: {exc}", file=sys.stderr)
        return 2
    return run(settings)


if __name__ == "__main__":
    main()
