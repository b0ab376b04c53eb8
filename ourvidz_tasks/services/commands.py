"""The pools' remote-control commands by name, registered wherever the app is loaded.

Celery's CLI checks a command's name in the calling process, against the commands
registered there, before it sends anything: ``celery -A ourvidz_tasks inspect
memory_status`` answers "not recognized" unless the operator's process knows the name.
That process loads the app only (:mod:`ourvidz_tasks.celery`, no torch), so the app
calls :func:`declare`: every command's name, arguments and help, with a stand-in that
answers ``{"error": ...}`` in a worker that runs no pool. A pool imports
:mod:`ourvidz_tasks.runtime.control`, whose :func:`command` registers the implementation
under the same name and arguments (it replaces the stand-in whichever is imported first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from celery.worker.control import Panel


class Spec(NamedTuple):
    """One command as Celery's registry (``Panel``) and CLI know it."""

    kind: str  # "inspect" or "control"
    help: str
    args: list[tuple[str, type]] | None = None
    signature: str | None = None


COMMANDS: dict[str, Spec] = {
    "memory_status": Spec("inspect", "The GPU's memory ledger: pools, reserved and free MB, pressure, waiters, "
                                     "requests."),
    "pressure_check": Spec("inspect", "Pressure level, available MB and recommendations "
                                      "(e.g. ``unload_chat_for_wan``)."),
    "model_load": Spec("control", "Ask this pool to load a model (default its first) between jobs, when it fits.",
                       [("model", str)], "[model]"),
    "model_unload": Spec("control", "Ask this pool to unload a model (default all it holds) between jobs.",
                         [("model", str)], "[model]"),
    "force_unload": Spec("control", "Ask any pool on this GPU (default this one) to unload, queued work or not.",
                         [("target", str), ("model", str)], "<pool> [model]"),
    "predictive_load": Spec("control", "Make room ahead of queued work for a cold model; its pool loads it "
                                       "between jobs.",
                            [("target", str), ("model", str), ("mb", int)], "<pool> [model] [mb]"),
}

Handler = Callable[..., dict[str, Any]]


def command(name: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as command ``name`` (replacing whatever was registered)."""
    spec = COMMANDS[name]
    return Panel.register(name=name, type=spec.kind, help=spec.help, args=spec.args,  # type: ignore[no-any-return]
                          signature=spec.signature)


def declare() -> None:
    """Every command's name in this process: a stand-in where no implementation is registered yet."""
    for name in COMMANDS:
        if name not in Panel.data:
            command(name)(_stand_in(name))


def _stand_in(name: str) -> Handler:
    def answer(state: Any, **_: Any) -> dict[str, Any]:
        return {"error": f"{getattr(state, 'hostname', 'this worker')} runs no pool: {name} is a pool's command"}

    answer.__name__ = name
    return answer
