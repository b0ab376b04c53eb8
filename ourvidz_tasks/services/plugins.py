"""``module:callable`` plug-ins named by a setting (prompt policy, runtime plug-ins)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..contract.errors import ConfigError


def import_callable(path: str, variable: str) -> Callable[..., Any]:
    """Import ``module:callable``; a bad path is a ConfigError naming ``variable``."""
    module_name, _, attr = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{variable}: cannot import {path!r} ({type(exc).__name__})") from None
    if not callable(found):
        raise ConfigError(f"{variable}: {path!r} is not callable")
    return found  # type: ignore[no-any-return]
