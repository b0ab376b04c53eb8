"""The memory ledger's Redis scripts: the ``*.lua`` files beside this module, read once per process.

A ledger operation (:data:`OPERATIONS`) is ``prelude.lua`` followed by ``{operation}.lua``,
run atomically by Redis; ``recent.lua`` runs alone
(:meth:`~ourvidz_tasks.runtime.estimates.MeasuredSizes.record_work`). Each file's first
lines say its arguments and what it returns.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

#: the parts of one device's ledger (the keys ``{prefix}:{part}``); the prelude knows each key by its part
STATE = ("held", "token", "lease", "pools", "tickets", "tlease", "tinfo", "seq",
         "requests", "wants", "wantmb", "stats", "switches", "meta")
OPERATIONS = ("reserve", "cancel", "refresh", "release", "set_busy", "want", "request", "done", "snapshot")


@cache
def source(name: str) -> str:
    """The text of ``{name}.lua``."""
    return (files(__name__) / f"{name}.lua").read_text(encoding="utf-8")


def operation(name: str) -> str:
    """The whole script of one ledger operation: the prelude, then the operation's own file."""
    if name not in OPERATIONS:
        raise ValueError(f"no ledger operation {name!r}")
    return source("prelude") + source(name)
