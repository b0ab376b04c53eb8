"""Every Redis client of the project comes from :func:`connect`: ``redis://``, ``rediss://`` or ``sentinel://``.

A ``sentinel://`` URL names the sentinels, not a server, as kombu and Celery's
Redis backend spell it (one entry per sentinel, separated by ``;``; password
and database on any entry)::

    sentinel://:password@sentinel-a:26379/0;sentinel://sentinel-b:26379;sentinel://sentinel-c:26379

The client asks the sentinels for the primary of ``OURVIDZ_SENTINEL_MASTER``
(:attr:`Settings.sentinel_master`) and asks again whenever a connection to it
fails or the server it reaches has become a replica, so after a failover the
next command (retried by redis-py on connection errors) goes to the new primary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..contract.errors import ConfigError

if TYPE_CHECKING:
    from ..contract.settings import Settings

SENTINEL_SCHEMES = ("sentinel",)
#: the Settings default of ``OURVIDZ_SENTINEL_MASTER`` (Redis' own example name)
DEFAULT_MASTER = "mymaster"
#: how long a command keeps retrying while the sentinels elect a new primary (seconds, roughly)
FAILOVER_RETRIES = 10


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme in SENTINEL_SCHEMES


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``sentinel://`` URL: the sentinels, and what the primary needs."""

    hosts: tuple[tuple[str, int], ...]
    db: int
    password: str | None
    username: str | None


def parse_sentinel(url: str) -> SentinelUrl:
    hosts: list[tuple[str, int]] = []
    db, password, username = 0, None, None
    for part in filter(None, (p.strip() for p in url.split(";"))):
        split = urlsplit(part)
        if split.scheme not in SENTINEL_SCHEMES or not split.hostname:
            raise ConfigError("a sentinel URL is sentinel://[:password@]host:port[/db] entries separated by ';'")
        hosts.append((split.hostname, split.port or 26379))
        password = unquote(split.password) if split.password else password
        username = unquote(split.username) if split.username else username
        if split.path.strip("/"):
            try:
                db = int(split.path.strip("/"))
            except ValueError:
                raise ConfigError("the database of a sentinel URL is a number (sentinel://host:26379/0)") from None
    if not hosts:
        raise ConfigError("a sentinel URL names at least one sentinel")
    return SentinelUrl(tuple(hosts), db, password, username)


def connect(url: str, settings: Settings | None = None, **kwargs: Any) -> redis.Redis:
    """A client of the Redis at ``url``; for ``sentinel://``, of the current primary of the sentinel group."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    parsed = parse_sentinel(url)
    master = settings.sentinel_master if settings is not None else DEFAULT_MASTER
    timeout = kwargs.pop("socket_connect_timeout", 5)
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    if settings is not None and settings.sentinel_password is not None:
        sentinel_kwargs["password"] = settings.sentinel_password.get_secret_value()
    sentinel = Sentinel(list(parsed.hosts), sentinel_kwargs=sentinel_kwargs)
    # the primary: reconnects through the sentinels on any connection error, retried with backoff
    # long enough for an election (down-after-milliseconds + failover)
    kwargs.setdefault("retry", Retry(ExponentialBackoff(cap=2.0, base=0.1), FAILOVER_RETRIES))
    kwargs.setdefault("retry_on_error", [redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError])
    return sentinel.master_for(master, db=parsed.db, password=parsed.password, username=parsed.username,
                               socket_connect_timeout=timeout, **kwargs)
