"""Every Redis client of the project comes from :func:`connect`: ``redis://``, ``rediss://`` or ``sentinel://``.

A ``sentinel://`` URL names the sentinels, not a server, as kombu and Celery's
Redis backend spell it (one entry per sentinel, separated by ``;``; password
and database on any entry)::

    sentinel://:password@sentinel-a:26379/0;sentinel://sentinel-b:26379;sentinel://sentinel-c:26379

The client asks the sentinels for the primary of ``OURVIDZ_SENTINEL_MASTER``
(:attr:`Settings.sentinel_master`) and asks again whenever a connection to it
fails or the server it reaches has become a replica, so after a failover the
next command (retried by redis-py on connection errors) goes to the new primary.

A failover has answers that are not errors of the command but of the moment:
``NOREPLICAS`` (a primary with ``min-replicas-to-write`` whose replica is not in
sync yet), ``READONLY`` (a demoted primary), ``LOADING``, ``MASTERDOWN``. Every
connection of the project (these clients and the broker transport,
``services.guard``) raises them as :class:`TransientError`, a connection error:
retried with backoff, never fatal. A script missing on a new primary
(``NOSCRIPT``) is loaded again by redis-py's ``Script`` objects, which every
project script uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection

from ..contract.errors import ConfigError
from .backoff import Backoff

if TYPE_CHECKING:
    from ..contract.settings import Settings

log = logging.getLogger(__name__)

SENTINEL_SCHEMES = ("sentinel",)
#: the Settings default of ``OURVIDZ_SENTINEL_MASTER`` (Redis' own example name)
DEFAULT_MASTER = "mymaster"
#: retries of a command while the sentinels elect a new primary and its replica syncs (about a minute
#: with the backoff below: 0.1 s doubling to 2 s)
FAILOVER_RETRIES = 32
#: how long :func:`steady` waits out a failover's transient answers before they count as a lost connection
STEADY_WAIT = 60.0
#: runs of a script whose ``NOSCRIPT`` outlives reloading it (the primary changed in between)
SCRIPT_RETRIES = 8
#: answers of a server in a failover, not of the command: retried, never fatal
TRANSIENT = ("NOREPLICAS", "READONLY", "LOADING", "MASTERDOWN")


class TransientError(redis.ConnectionError):
    """``NOREPLICAS``, ``READONLY``, ``LOADING`` or ``MASTERDOWN``: the server answers again soon."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TransientError) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(TRANSIENT))


class _Transient:
    """A connection mixin: a transient answer drops the connection (the next one asks the sentinels
    again) and raises :class:`TransientError`, so every retry of connection errors covers it."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if not is_transient(exc):
                raise
            self.disconnect()  # type: ignore[attr-defined]
            raise TransientError(str(exc)) from exc


class Connection(_Transient, redis.Connection):
    pass


class SSLConnection(_Transient, redis.SSLConnection):
    pass


class SentinelConnection(_Transient, SentinelManagedConnection):
    pass


class SentinelSSLConnection(_Transient, SentinelManagedSSLConnection):
    pass


class SteadyScript(Script):
    """redis-py's ``Script`` (loaded again where it is missing), also when the primary changes between
    loading it and running it: a failover empties the script cache, so ``NOSCRIPT`` is retried."""

    def __call__(self, keys: Any = (), args: Any = (), client: Any = None) -> Any:
        for attempt in range(SCRIPT_RETRIES):
            try:
                return super().__call__(keys=keys, args=args, client=client)
            except NoScriptError:
                if attempt == SCRIPT_RETRIES - 1:
                    raise
                time.sleep(min(1.0, 0.05 * 2 ** attempt))
        raise AssertionError("unreachable")


def steady(call: Callable[[], Any]) -> Any:
    """Run one broker command (or transaction) until the server stops answering transiently.

    A transient answer (:class:`TransientError`) means nothing was done (a refused write, an aborted
    MULTI), so running it again is safe; after :data:`STEADY_WAIT` it counts as a lost connection.
    """
    pauses, deadline = Backoff(0.05, 1.0), time.monotonic() + STEADY_WAIT
    while True:
        try:
            return call()
        except TransientError as exc:
            if time.monotonic() >= deadline:
                raise
            if not pauses.backing_off:
                log.warning("broker answers %s; retrying", str(exc).split(" ", 1)[0])
            time.sleep(pauses.next())


def register_script(client: redis.Redis, source: str) -> SteadyScript:
    """A project script on ``client`` (every Lua script of the project is run through one)."""
    return SteadyScript(client, source)


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
        scheme = urlsplit(url).scheme
        if scheme in ("redis", "rediss"):
            kwargs.setdefault("connection_class", SSLConnection if scheme == "rediss" else Connection)
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
    kwargs.setdefault("retry_on_error", [redis.ConnectionError, redis.TimeoutError])
    kwargs.setdefault("connection_class", SentinelConnection)
    return sentinel.master_for(master, db=parsed.db, password=parsed.password, username=parsed.username,
                               socket_connect_timeout=timeout, **kwargs)
