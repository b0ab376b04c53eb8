"""``bin/flower``: the Flower dashboard on the cluster's broker, behind basic auth.

Refuses to start without ``FLOWER_BASIC_AUTH`` (``user:password``, several
separated by commas) unless told ``--local-only``, which binds 127.0.0.1 and
nothing else. The password travels in the environment (Flower's own option
name), never in argv where ``ps`` shows it.

What the dashboard shows of a task: its name, the job id (``argsrepr``; the
prompt never reaches Flower), the state, and while it runs a ``PROGRESS``
state whose result is the progress meta (``job_id, percent, step, total,
stage``, sent by the workers as a ``task-progress`` event), drawn as a bar in
the tasks table (:mod:`~ourvidz_tasks.services.progress`). Results of finished tasks stay
hidden (:mod:`~ourvidz_tasks.services.redact`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import os
import signal
import sys
from typing import Any

from tornado.options import Error as TornadoOptionError

from ..contract.errors import ConfigError
from ..contract.settings import load_settings
from ..services.progress import PROGRESS, progress_text
from ..services.redact import HIDDEN

#: the tasks table: the job id is in ``args``; ``result`` holds the progress bar (uuid links to the task)
COLUMNS = "name,args,state,result,worker,received,runtime,uuid"
#: what the table shows instead of :data:`~ourvidz_tasks.services.redact.HIDDEN`
HIDDEN_SHORT = "hidden (see the callback)"


def format_task(task: Any) -> Any:
    """Flower's ``format_task`` hook (tasks table, task page): a running task's progress as a bar."""
    result = getattr(task, "result", None)
    if getattr(task, "state", None) == PROGRESS and isinstance(result, dict):
        task.result = progress_text(result)
    elif result == HIDDEN:
        task.result = HIDDEN_SHORT
    return task


def check_auth(value: str) -> None:
    """Every comma-separated entry must be ``user:password`` with both parts."""
    for entry in value.split(","):
        user, sep, password = entry.partition(":")
        if not (user and sep and password):
            raise ConfigError("FLOWER_BASIC_AUTH must be user:password (several separated by commas)")


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bin/flower",
        description="The Flower dashboard of the ourvidz cluster (same broker as the workers).",
        epilog=(
            "FLOWER_BASIC_AUTH=user:password must be set in the environment (never on the command line).\n"
            "Without it, --local-only serves 127.0.0.1 only, with no password (the API still answers 401).\n"
            "Other arguments go to Flower, e.g. --persistent=True --db=/data/flower.\n"
            "Every Flower option is also read from FLOWER_<OPTION> (FLOWER_PORT=5556); a flag beats its variable.\n"
            "The broker comes from OURVIDZ_BROKER_URL, as for the workers."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, default=None, help="port to listen on (FLOWER_PORT; default 5555)")
    p.add_argument("--address", default=None,
                   help="address to bind (FLOWER_ADDRESS; default 0.0.0.0, 127.0.0.1 with --local-only)")
    p.add_argument("--local-only", action="store_true",
                   help="bind 127.0.0.1 only; allowed without FLOWER_BASIC_AUTH")
    return p


def main(argv: list[str] | None = None) -> None:
    args, rest = parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        if any(arg.lstrip("-").replace("-", "_").startswith("basic_auth") for arg in rest):
            raise ConfigError("pass FLOWER_BASIC_AUTH in the environment, not on the command line (ps shows argv)")
        settings = load_settings()
        secret = settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else ""
        if secret:
            check_auth(secret)
        elif not args.local_only:
            raise ConfigError("FLOWER_BASIC_AUTH is not set (user:password); "
                              "--local-only serves 127.0.0.1 without a password")
        if not secret:
            os.environ.pop("FLOWER_BASIC_AUTH", None)  # an empty value would read as one empty credential
        flags = [f"--{name}={value}" for name, value in (("port", args.port), ("address", args.address))
                 if value is not None]
        options = resolve_options([*flags, *rest], args.local_only)
    except ConfigError as exc:
        print(f"bin/flower: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    run(options)


def resolve_options(flower_args: list[str], local_only: bool) -> Any:
    """Flower's options as ``celery flower`` resolves them (env, then config file, then flags), with our defaults.

    Our defaults go in first, so ``FLOWER_<OPTION>`` and flags still win; an address nobody
    set is 0.0.0.0, or 127.0.0.1 with ``local_only``, which refuses any other address.
    """
    from flower import command
    from tornado.options import options

    options.tasks_columns = COLUMNS
    options.format_task = format_task
    try:
        command.apply_env_options()  # FLOWER_BASIC_AUTH, FLOWER_PORT, FLOWER_ADDRESS, ... (a bad value raises)
        command.apply_options("flower", flower_args)
    except (ValueError, KeyError, TypeError, TornadoOptionError) as exc:
        raise ConfigError(f"bad Flower option: {exc}") from None
    if not options.address and not options.unix_socket:
        options.address = "127.0.0.1" if local_only else "0.0.0.0"
    if local_only and (options.unix_socket or not _is_loopback(options.address)):
        where = options.unix_socket or options.address
        raise ConfigError(f"--local-only binds a loopback address, not {where!r}")
    return options


def run(options: Any) -> None:
    """Start Flower as ``celery flower`` does, on options from :func:`resolve_options`."""
    from flower import command
    from flower.app import Flower
    from flower.urls import settings as web_settings

    from ..celery import app

    command.extract_settings()
    command.setup_logging()
    app.conf.include = []  # Flower knows the tasks from their events; their modules are the pools' (torch)
    dashboard = Flower(capp=app, options=options, **web_settings)
    atexit.register(dashboard.stop)
    signal.signal(signal.SIGTERM, command.sigterm_handler)
    bound = dashboard.start_http_server()
    command.print_banner(app, "ssl_options" in web_settings, bound)
    with contextlib.suppress(KeyboardInterrupt, SystemExit):  # SIGTERM exits through SystemExit
        dashboard.start()


if __name__ == "__main__":
    main()
