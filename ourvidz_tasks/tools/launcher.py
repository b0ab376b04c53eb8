"""``bin/worker sdxl|chat|wan|outbox``: one worker on its role's queue (solo; chat: threads).

``outbox`` is the light callback consumer (no model); the others are GPU pools.

The configuration is checked before Celery starts; anything wrong exits with
status 2 and one line naming the variable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..contract.errors import ConfigError
from ..contract.settings import Settings, load_settings
from ..runtime.worker import FAMILIES, node_name

ROLES = (*FAMILIES, "outbox")
USAGE = "usage: bin/worker sdxl|chat|wan|outbox [extra celery worker options]"
MODEL_VARS = {
    "sdxl": ("sdxl_model",),
    "wan": ("wan_model",),
    "chat": ("qwen_instruct_model",),
}


def check(family: str, settings: Settings) -> None:
    """Raise ConfigError (one line) when this pool cannot work with ``settings``."""
    settings.require_delivery()
    remote = family == "chat" and settings.chat_server_url
    if family in MODEL_VARS and settings.model_source == "local" and not remote:
        for name in MODEL_VARS[family]:
            path: Path | None = getattr(settings, name)
            env = f"OURVIDZ_{name.upper()}"
            if path is None:
                raise ConfigError(f"{env} is required when OURVIDZ_MODEL_SOURCE=local")
            if not path.exists():
                raise ConfigError(f"{env}: {path} does not exist")
        single_file = family == "sdxl" and settings.sdxl_model and settings.sdxl_model.suffix == ".safetensors"
        if single_file and (settings.sdxl_config is None or not settings.sdxl_config.is_dir()):
            raise ConfigError("OURVIDZ_SDXL_CONFIG must name a local diffusers config folder for a .safetensors checkpoint")
    from ..services.policy import load_policy

    load_policy(settings.prompt_policy)


def worker_argv(family: str, settings: Settings, extra: list[str]) -> list[str]:
    # chat: task threads feeding the one in-process engine (no fork, one model), twice the batch
    # so that requests wait inside the pool, where enhancements pass chats
    pool = ["--pool", "threads", "--concurrency", str(2 * settings.chat_concurrency)] if family == "chat" \
        else ["--pool", "solo", "--concurrency", "1"]
    return [
        "worker", "--queues", family, "--hostname", node_name(family, settings), *pool, "--task-events",
        "--without-gossip", "--without-mingle", "--loglevel", "INFO", *extra,
    ]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ROLES:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    family, extra = args[0], args[1:]
    # these libraries' warnings can quote prompts; set before they are imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        settings = load_settings()
        check(family, settings)
    except ConfigError as exc:
        print(f"bin/worker {family}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from ..celery import app

    app.worker_main(worker_argv(family, settings, extra))


if __name__ == "__main__":
    main()
