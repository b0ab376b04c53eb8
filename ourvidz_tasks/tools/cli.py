"""``ourvidz``: the operator's command line (submit and follow a job, memory, replay, dead letters, usage, metrics).

Everything comes from the same environment as the workers (CONTRACT.md
section 5): ``OURVIDZ_BROKER_URL`` reaches the queues and the result backend.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import threading
import time
from collections.abc import Sequence

import redis

from ..contract.errors import ConfigError, JobError
from ..contract.settings import Settings, load_settings
from ..services.redis_client import connect
from .memory_report import ledger_tables, load_counters, memory_status, table
from .queue_report import add_parsers as add_queue_parsers
from .submit import ProgressLine, build_job, error_text, follow, publish

PROG = "ourvidz"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3

DESCRIPTION = """\
Operate the ourvidz task cluster: publish a job and watch it, look at GPU
memory, re-send a callback, serve cluster metrics. Configuration comes from
the workers' environment (OURVIDZ_BROKER_URL, OURVIDZ_REDIS_URL, SUPABASE_*)."""

EPILOG = """\
examples:
  ourvidz submit job.json                        # publish, follow the progress bar, print the result
  ourvidz submit --type sdxl_image_fast --user-id u1 --prompt "a red fox" --set config.seed=7
  ourvidz memory                                 # per worker: models loaded and load counts
  ourvidz memory plan --card l40s                # which real models stay resident together, per job shape
  ourvidz replay 5f0c...                         # re-send a job's recorded terminal callback
  ourvidz dead                                   # dead letters: refused callbacks, items that are not tasks
  ourvidz queue 5f0c... --json                   # where a job stands: state, position, ETA
  ourvidz queue                                  # each family's waiting jobs per user
  ourvidz usage --since 7d                       # GPU seconds and jobs per user over the last 7 days
  ourvidz metrics --port 9100                    # Prometheus: queue depth, ledger, callback backlog"""

SUBMIT_HELP = """\
Publish one generation job and follow it until it ends.

The job comes from a JSON file (CONTRACT.md section 2; '-' reads stdin) and/or
flags; flags win. Without an id one is made up. It is checked here with the
workers' own rules before it is published, and routed by its type
(sdxl_* to ourvidz.sdxl.generate, the WAN types to ourvidz.wan.generate).

Following: the callback goes to Supabase, which this command cannot see.
It follows the Celery task through the result backend instead: queued,
started, then the PROGRESS state (percent, step, stage) as a progress bar on
stderr, and finally prints the task's result on stdout: the very callback
body the worker sent (JSON). Exit status 0 when the job completed, 1 when it
failed, 2 when the job or the configuration is invalid, 3 when --timeout
passed first (the job goes on)."""


# -- submit ------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    job = build_job(args.job, job_type=args.type, prompt=args.prompt, user_id=args.user_id,
                    job_id=args.id, sets=args.set)
    try:
        result = publish(job, settings, enhance=args.enhance)
    except JobError as exc:
        print(f"{PROG} submit: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    job_id = job.get("id") or job.get("job_id")
    print(f"job {job_id} published (task {result.id})", file=sys.stderr)
    if args.no_follow:
        return EXIT_OK
    line = ProgressLine(sys.stderr, f"job {job_id}")
    try:
        state, info = follow(result, line, args.timeout, args.interval)
    except KeyboardInterrupt:
        line.close()
        print(f"stopped following; the job goes on (task {result.id})", file=sys.stderr)
        return 130
    line.close()
    if state == "TIMEOUT":
        print(f"{PROG} submit: no result after {args.timeout:g}s; the job goes on (task {result.id})",
              file=sys.stderr)
        return EXIT_TIMEOUT
    if state == "FAILURE":
        print(f"{PROG} submit: the task failed: {error_text(info)}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return EXIT_OK if isinstance(info, dict) and info.get("status") == "completed" else EXIT_FAILED


# -- memory --------------------------------------------------------------------------
def cmd_memory_plan(args: argparse.Namespace, settings: Settings) -> int:
    """``ourvidz memory plan --card l40s``: from committed data only (no torch, no Redis)."""
    from ..models.memplan import CARDS_MIB, card_mib, format_plan, plan

    if args.card is not None:
        try:
            mib = card_mib(args.card)
        except ValueError as exc:
            raise ConfigError(f"memory plan: --card: {exc}") from None
    elif args.card_mib is not None and args.card_mib > 0:
        mib = args.card_mib
    elif args.card_gb is not None and args.card_gb > 0:
        mib = int(args.card_gb * 1024)
        print(f"(--card-gb {args.card_gb:g} is {mib} MiB, more than such a card reports: "
              f"--card {'|'.join(CARDS_MIB)} or --card-mib N plan from what it has)", file=sys.stderr)
    else:
        raise ConfigError("memory plan: give --card NAME (e.g. l40s, h100-80gb) or --card-mib N (what nvidia-smi reports)")
    data = plan(mib, context_mb=settings.cuda_context_mb, margin_mb=settings.memory_margin_mb)
    print(json.dumps(data, indent=2) if args.json else format_plan(data))
    return EXIT_OK


def cmd_memory(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "plan":
        return cmd_memory_plan(args, settings)
    store = connect(settings.redis, settings)
    replies = memory_status(args.timeout)
    loads = load_counters(store, args.timeout)
    devices, pools, notes = ledger_tables(replies)
    if args.json:
        print(json.dumps({"memory_status": dict(replies), "loads": loads}, indent=2, default=str))
        return EXIT_OK
    for title, rows in (("GPU memory (ledger)", devices), ("pools", pools), ("model loads per worker", loads)):
        if rows:
            print(f"{title}:")
            table(rows, sys.stdout)
            print()
    if not loads:
        print("no worker answered and none has loaded a model yet")
    for note in notes:
        print(f"(no ledger from {note})")
    return EXIT_OK


# -- status ---------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """The callback outbox: depth, oldest body, consumer; exit 1 when a configured consumer is missing or stuck."""
    from ..services.outbox_store import Outbox, consumer_health

    state = Outbox.for_settings(connect(settings.redis, settings), settings).state()
    health = consumer_health(state, settings.outbox_consumer)
    if args.json:
        print(json.dumps({"outbox": {**state.as_dict(), "consumer_health": health}}, indent=2))
    else:
        what = {"draining": f"consumer {state.consumer} drains it", "pools": "the pools drain it (no consumer)",
                "missing": "consumer MISSING (OURVIDZ_OUTBOX_CONSUMER is set; the pools drain it)",
                "stuck": f"consumer {state.consumer} STUCK (alive, not delivering)"}[health]
        oldest = f", oldest {state.oldest_age:g}s" if state.oldest_age is not None else ""
        last = state.last or {}
        tried = f"; last try {'ok' if last.get('ok') else last.get('error')}" if last else ""
        print(f"callback outbox: {state.depth} waiting{oldest}; {what}{tried}")
    return EXIT_FAILED if health in ("missing", "stuck") else EXIT_OK


# -- dead ------------------------------------------------------------------------------
def cmd_dead(args: argparse.Namespace, settings: Settings) -> int:
    """The dead letters, newest first: refused callbacks, queue items that are not tasks."""
    from ..services.guard import DeadLetters

    entries = DeadLetters(connect(settings.redis, settings)).entries()[: args.limit]
    if args.json:
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(e.get("at") or 0)))
        where = f" ({e['queue']})" if e.get("queue") else ""
        print(f"{when} job {e.get('job_id') or '-'} task {e.get('task_id') or '-'}{where}: {e.get('reason')}")
    print(f"{len(entries)} dead letter(s) shown (newest first; `--json` for the bodies)", file=sys.stderr)
    return EXIT_OK


# -- replay ---------------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from ..services.delivery import Delivery

    settings.require_delivery()
    store = connect(settings.redis, settings)
    delivery = Delivery(settings, f"{PROG}@{socket.gethostname()}", store)  # inline HTTP: we wait for the edge
    try:
        body = delivery.terminal_of(args.job_id)
        if body is None or not delivery.replay(args.job_id):
            print(f"{PROG} replay: job {args.job_id} has no recorded terminal callback "
                  "(unknown, still running, or older than OURVIDZ_IDEMPOTENCY_TTL)", file=sys.stderr)
            return EXIT_FAILED
        delivered = delivery.delivered(args.job_id)
    finally:
        delivery.close()
    if not delivered:
        print(f"{PROG} replay: the {body['status']} callback of job {args.job_id} was not delivered "
              "(kept for replay; see the log above)", file=sys.stderr)
        return EXIT_FAILED
    print(f"job {args.job_id}: {body['status']} callback re-sent "
          f"(callback_id {body.get('metadata', {}).get('callback_id')})")
    return EXIT_OK


# -- cancel ---------------------------------------------------------------------------
def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from ..runtime.lifecycle import cancel

    cancel(connect(settings.redis, settings), args.job_id)
    print(f"job {args.job_id}: cancel requested; a running job stops at its next step, a queued one when "
          "it is picked up (failed callback, CANCELLED)")
    return EXIT_OK


# -- usage ----------------------------------------------------------------------------
def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    """GPU seconds and jobs per user, summed over the UTC days since ``--since``."""
    from ..services.usage import days_since, read_usage

    try:
        days = days_since(args.since, datetime.datetime.now(datetime.UTC).date())
    except ValueError as exc:
        raise ConfigError(f"usage: {exc}") from None
    rows = read_usage(connect(settings.redis, settings), days)
    if args.json:
        users = {r.user: {"gpu_seconds": round(r.gpu_seconds, 3), "jobs": r.jobs} for r in rows}
        print(json.dumps({"since": days[0], "until": days[-1], "users": users}, indent=2))
        return EXIT_OK
    if rows:
        table([{"user": r.user, "gpu_seconds": round(r.gpu_seconds, 1), "jobs": r.jobs} for r in rows], sys.stdout)
    total = sum(r.gpu_seconds for r in rows)
    print(f"{len(rows)} user(s), {total:.1f} GPU seconds, {sum(r.jobs for r in rows)} job(s) "
          f"from {days[0]} to {days[-1]} (UTC)", file=sys.stderr)
    return EXIT_OK


# -- metrics --------------------------------------------------------------------------
def cmd_metrics(args: argparse.Namespace, settings: Settings) -> int:
    from ..services.metrics import serve

    exporter = serve(settings, args.port, args.address)
    print(f"serving cluster metrics on http://{args.address}:{exporter.port}/metrics", file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        exporter.close()
    return EXIT_OK


# -- entry point ------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("submit", help="publish a job and follow its progress until it ends",
                       description=SUBMIT_HELP, formatter_class=fmt)
    s.add_argument("job", nargs="?", help="a job JSON file ('-' for stdin); optional when flags give the job")
    s.add_argument("--type", help="job type, e.g. sdxl_image_fast, video_fast, image7b_fast_enhanced")
    s.add_argument("--prompt", help="the prompt")
    s.add_argument("--user-id", help="the user id (a storage path segment)")
    s.add_argument("--id", help="the job id (default: a new UUID)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any field by dotted path, value as JSON if it parses: "
                        "--set config.num_inference_steps=20 --set config.resolution=832x1216 (repeatable)")
    s.add_argument("--enhance", action="store_true", help="enhance the prompt first (chain: chat.enhance → generate)")
    s.add_argument("--no-follow", action="store_true", help="publish and return at once")
    s.add_argument("--timeout", type=float, default=3600, help="seconds to follow before giving up (default 3600)")
    s.add_argument("--interval", type=float, default=0.5, help="seconds between polls (default 0.5)")
    s.set_defaults(run=cmd_submit)

    m = sub.add_parser("memory", help="models loaded per worker (and the memory ledger) as a table",
                       description="Per worker: online or not, the models it loaded and how often, then the\n"
                                   "memory ledger per device (reserved / budget MB).", formatter_class=fmt)
    m.add_argument("action", nargs="?", choices=("status", "plan"), default="status",
                   help="status (default): what the workers hold; plan: what the real models need on a card")
    m.add_argument("--card", help="plan: a named card (l40s, a100-80gb, h100-80gb, h200, rtx-4090, ...)")
    m.add_argument("--card-mib", type=int, help="plan: the card's memory in MiB, as nvidia-smi reports it")
    m.add_argument("--card-gb", type=float, help="plan: a nominal size in GB (x 1024 MiB: more than real cards have)")
    m.add_argument("--json", action="store_true", help="print JSON instead of tables")
    m.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for worker replies (default 2)")
    m.set_defaults(run=cmd_memory)

    st = sub.add_parser("status", help="the callback outbox: waiting callbacks and its consumer",
                        description="Callbacks waiting in the outbox (the pools deliver at once; only failed\n"
                                    "deliveries wait there), the oldest one's age and who drains it. Exit 1\n"
                                    "when a configured consumer (OURVIDZ_OUTBOX_CONSUMER) is missing or stuck.",
                        formatter_class=fmt)
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(run=cmd_status)

    d = sub.add_parser("dead", help="the dead letters: refused callbacks, queue items that are not tasks",
                       description="Entries of the dead-letter list (ourvidz:dead in OURVIDZ_REDIS_URL), newest\n"
                                   "first: a callback the edge refused for good (4xx; `ourvidz replay JOB_ID`\n"
                                   "re-sends a terminal one) or a queue item that could not become a task.",
                       formatter_class=fmt)
    d.add_argument("--json", action="store_true", help="print JSON (with each entry's raw body)")
    d.add_argument("--limit", type=int, default=100, help="at most this many, newest first (default 100)")
    d.set_defaults(run=cmd_dead)

    r = sub.add_parser("replay", help="re-send a job's recorded terminal callback",
                       description="Re-send the terminal callback (completed or failed) recorded for a job,\n"
                                   "byte for byte the same body and callback_id, signed again; also when it\n"
                                   "was delivered before. Needs SUPABASE_URL and SUPABASE_SERVICE_KEY.",
                       formatter_class=fmt)
    r.add_argument("job_id", help="the job id")
    r.set_defaults(run=cmd_replay)

    c = sub.add_parser("cancel", help="stop a job at its next step (failed callback, CANCELLED)",
                       description="Celery's revoke reaches a solo worker only between jobs; this flag is\n"
                                   "read at every denoising step, and by a queued job when it starts.",
                       formatter_class=fmt)
    c.add_argument("job_id", help="the job id")
    c.set_defaults(run=cmd_cancel)

    add_queue_parsers(sub, fmt)
    u = sub.add_parser("usage", help="GPU seconds and jobs per user over the last days",
                       description="Per user, the model seconds of the jobs that ended (every attempt of each)\n"
                                   "and how many ended, summed over UTC days from daily keys kept 40 days\n"
                                   "(ourvidz:usage:YYYY-MM-DD in OURVIDZ_REDIS_URL); most GPU seconds first.",
                       formatter_class=fmt)
    u.add_argument("--since", default="7d", help="Nd (the last N days with today) or YYYY-MM-DD (default 7d)")
    u.add_argument("--json", action="store_true", help="print JSON")
    u.set_defaults(run=cmd_usage)

    x = sub.add_parser("metrics", help="serve the cluster metrics for Prometheus (no pool needed)",
                       description="Queue depth per queue, unacked messages, legacy lists, dead letters,\n"
                                   "callback backlog and the memory ledger, read from Redis at every scrape.",
                       formatter_class=fmt)
    x.add_argument("--port", type=int, default=9100, help="port (default 9100)")
    x.add_argument("--address", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    x.set_defaults(run=cmd_metrics)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
        code = args.run(args, settings)
    except ConfigError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except (OSError, json.JSONDecodeError) as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except redis.RedisError as exc:
        print(f"{PROG} {args.command}: Redis unreachable: {type(exc).__name__}", file=sys.stderr)
        code = EXIT_FAILED
    raise SystemExit(code)


if __name__ == "__main__":
    main()
