"""GPU seconds and jobs per user, per UTC day, in bounded Redis keys (issue 26, ``ourvidz usage``).

One hash per day (``keys.usage``): ``{user}:gpu`` the model seconds of the user's jobs that ended
that day (every attempt of each), ``{user}:jobs`` how many ended. Each day's hash expires after
:data:`USAGE_TTL`, so what ``ourvidz usage --since`` can sum reaches back :data:`USAGE_DAYS` days.
Written by the pools when a job ends (``runtime.bookkeeping``); torch-free.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

import redis

from ..contract import keys
from ..contract.text import as_text

#: days a day's usage is kept (and the furthest back ``--since`` reaches)
USAGE_DAYS = 40
USAGE_TTL = USAGE_DAYS * 24 * 3600
_SINCE = re.compile(r"^(\d{1,3})d$")


def day_of(at: float) -> str:
    """The UTC day (``YYYY-MM-DD``) of a time in seconds since the epoch."""
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d")


def queue_usage(pipe: Any, user: str, gpu_seconds: float, jobs: int, at: float) -> None:
    """Add one ended job's usage to the day of ``at`` on the caller's pipeline (executed by the caller)."""
    key = keys.usage(day_of(at))
    pipe.hincrbyfloat(key, f"{user}:gpu", round(max(0.0, gpu_seconds), 3))
    pipe.hincrby(key, f"{user}:jobs", jobs)
    pipe.expire(key, USAGE_TTL)


def days_since(since: str, today: dt.date) -> list[str]:
    """The days from ``since`` (``7d``: the last 7 days with today; or ``YYYY-MM-DD``) to ``today``.

    ValueError naming what is allowed for anything else, a future day or more than :data:`USAGE_DAYS`.
    """
    match = _SINCE.match(since.strip())
    if match:
        count = int(match[1])
        if not 1 <= count <= USAGE_DAYS:
            raise ValueError(f"--since must be 1d to {USAGE_DAYS}d; got {since!r}")
        first = today - dt.timedelta(days=count - 1)
    else:
        try:
            first = dt.date.fromisoformat(since.strip())
        except ValueError:
            raise ValueError(f"--since must be Nd (e.g. 7d) or YYYY-MM-DD; got {since!r}") from None
        if first > today:
            raise ValueError(f"--since {since} is after today ({today.isoformat()})")
        first = max(first, today - dt.timedelta(days=USAGE_DAYS - 1))
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((today - first).days + 1)]


@dataclass
class UserUsage:
    user: str
    gpu_seconds: float = 0.0
    jobs: int = 0


def read_usage(store: redis.Redis, days: list[str]) -> list[UserUsage]:
    """Each user's GPU seconds and jobs summed over ``days`` (one round trip), most GPU seconds first."""
    with store.pipeline(transaction=False) as pipe:
        for day in days:
            pipe.hgetall(keys.usage(day))
        found = pipe.execute()
    users: dict[str, UserUsage] = {}
    for fields in found:
        for raw_field, raw_value in fields.items():
            user, _, what = as_text(raw_field).rpartition(":")
            row = users.setdefault(user, UserUsage(user))
            try:
                if what == "gpu":
                    row.gpu_seconds += float(raw_value)
                elif what == "jobs":
                    row.jobs += int(raw_value)
            except ValueError:
                continue
    return sorted(users.values(), key=lambda row: (-row.gpu_seconds, row.user))
