"""``ourvidz queue`` and ``ourvidz tier``: where jobs stand in the fair order, and users' tiers."""

from __future__ import annotations

import argparse
import json

from ..contract import keys, names
from ..contract.settings import Settings
from ..contract.text import as_text
from ..services import fairness
from ..services.redis_client import connect

EXIT_OK, EXIT_FAILED = 0, 1


def standing(settings: Settings, job_id: str) -> dict[str, object]:
    """Where ``job_id`` stands (CONTRACT section 7), read from the broker (and the store, when apart)."""
    broker = connect(settings.fair_url, settings)
    store = connect(settings.redis, settings) if settings.redis != settings.fair_url else None
    return fairness.standing(broker, job_id, present=settings.lease_seconds, store=store)


def describe(job_id: str, where: dict[str, object]) -> str:
    state = where["state"]
    if state != "queued":
        return f"job {job_id}: {state}"
    return (f"job {job_id}: queued on {where['family']}, position {where['position']} "
            f"({where['ahead']} ahead), starts in about {where['eta_s']:g}s, waited {where['waited_s']:g}s")


def cmd_queue(args: argparse.Namespace, settings: Settings) -> int:
    if args.job_id:
        where = standing(settings, args.job_id)
        print(json.dumps(where) if args.json else describe(args.job_id, where))
        return EXIT_OK if where["state"] != "unknown" else EXIT_FAILED
    broker = connect(settings.fair_url, settings)
    report = {family: fairness.waiting_by_user(broker, names.fair_queue(family, settings.fair_relay))
              for family in names.FAMILIES}
    if args.json:
        print(json.dumps({f: {"users": users, "not_taken_in": untaken} for f, (users, untaken) in report.items()}))
        return EXIT_OK
    for family, (users, untaken) in report.items():
        total = sum(users.values())
        extra = f", {untaken} not taken in yet (no pool of it running?)" if untaken else ""
        print(f"{family}: {total} waiting from {len(users)} user(s){extra}")
        for user, count in sorted(users.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {user or '(no user)'}: {count}")
    return EXIT_OK


def cmd_tier(args: argparse.Namespace, settings: Settings) -> int:
    broker = connect(settings.fair_url, settings)
    if args.tier is None:
        tier = broker.hget(keys.FAIR_TIERS, args.user_id)
        print(f"user {args.user_id}: tier {as_text(tier) if tier else '(none: weight 1)'}")
    elif args.tier == "-":
        broker.hdel(keys.FAIR_TIERS, args.user_id)
        print(f"user {args.user_id}: tier removed (weight 1)")
    else:
        broker.hset(keys.FAIR_TIERS, args.user_id, args.tier)
        print(f"user {args.user_id}: tier {args.tier} (its weight: OURVIDZ_FAIR_WEIGHTS; pools read it within 30 s)")
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:  # type: ignore[type-arg]
    q = sub.add_parser("queue", help="where a job stands (position, ETA), or each family's waiting jobs per user",
                       description="With a job id: its state (queued, running, ended, unknown) and, while\n"
                                   "queued, its position in the fair order (0 = next to start on its family),\n"
                                   "the jobs ahead, the estimated seconds until it starts and how long it has\n"
                                   "waited. Without: each family's waiting jobs per user. Exit 1 for an\n"
                                   "unknown job.", formatter_class=fmt)
    q.add_argument("job_id", nargs="?", help="the job id")
    q.add_argument("--json", action="store_true", help="print JSON (CONTRACT section 7)")
    q.set_defaults(run=cmd_queue)

    t = sub.add_parser("tier", help="a user's tier in the fair order (its weight: OURVIDZ_FAIR_WEIGHTS)",
                       description="Show, set or ('-') remove a user's tier. OURVIDZ_FAIR_WEIGHTS=pro=4,free=1\n"
                                   "gives each tier its weight; users without a tier weigh 1.",
                       formatter_class=fmt)
    t.add_argument("user_id", help="the user id")
    t.add_argument("tier", nargs="?", help="the tier to set; '-' removes it")
    t.set_defaults(run=cmd_tier)
