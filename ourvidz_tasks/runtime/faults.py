"""Faults that come from the device, the same for every pool.

Two kinds, told apart by following an exception's ``__cause__`` and
``__context__`` (a model load wraps what went wrong in ``ModelLoadError``,
a family wraps torch's error in ``OutOfMemory``):

* **Out of memory** (:func:`is_oom`): the job steps down through its
  family's remedies (:func:`step_down`) and only then fails, retryably.
  Memory is released *after* leaving the ``except`` clause: until then the
  traceback holds the frames, and so the tensors, of the run that failed,
  and ``empty_cache`` would return nothing to the other pools. Out of
  memory outside the caching allocator is out of memory too: an
  ``AcceleratorError`` saying ``CUDA error: out of memory``, a library's
  ``*_ALLOC_FAILED`` (cuBLAS, cuDNN), a ``MemoryError``.
* **Device fault** (:func:`device_fault`): any other CUDA error (an illegal
  address, a device-side assert, ``torch.AcceleratorError``). The process's
  CUDA context can't be trusted, so :func:`exit_on_device_fault` ends the
  process with status 75 at once: the message is never acknowledged, the
  broker (or crash recovery) hands the job to a fresh worker, and the poison
  guard counts the delivery.

The seam: every model call that may step down goes through
:func:`step_down`, which calls the runtime's attempt hooks with the
:class:`Attempt` about to run. Plug-ins (``OURVIDZ_RUNTIME_PLUGINS``) add
hooks at start; a hook that raises ``torch.OutOfMemoryError`` takes exactly
the path a real CUDA out-of-memory takes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from ..contract.errors import ConfigError, ModelLoadError, OutOfMemory
from ..models import release_memory
from ..services.plugins import import_callable

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

#: exit status of a worker that stopped after a device fault (its supervisor restarts it)
EXIT_DEVICE_FAULT = 75

#: what torch and its libraries put in the message of a device error other than OOM
_FAULT_MARKERS = ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error", "device-side assert",
                  "an illegal memory access")
#: out of memory, also outside the caching allocator: a cudaMalloc of a library (``CUDA error: out of
#: memory``, raised as ``torch.AcceleratorError``), cuBLAS/cuDNN/cuFFT/cuSOLVER/cuSPARSE handles and
#: workspaces (``..._ALLOC_FAILED``), the CPU allocator (``can't allocate memory``)
_OOM_MARKERS = ("out of memory", "can't allocate memory", "_ALLOC_FAILED", "cudaErrorMemoryAllocation")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it (``__cause__`` first, then ``__context__``), once each."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]


def _is_oom_one(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError | OutOfMemory | MemoryError):  # MemoryError: transformers' cache sizing
        return True
    return isinstance(exc, RuntimeError) and _says_oom(str(exc))


def _says_oom(text: str) -> bool:
    return any(m in text for m in _OOM_MARKERS)


def is_oom(exc: BaseException) -> bool:
    """True when out-of-memory is anywhere in the chain (and no device fault is)."""
    return device_fault(exc) is None and any(_is_oom_one(e) for e in causes(exc))


def device_fault(exc: BaseException) -> BaseException | None:
    """The CUDA error other than out-of-memory in ``exc``'s chain, or None."""
    for current in causes(exc):
        text = str(current)
        if _says_oom(text):  # an out-of-memory, whatever its type: the ladder, not an exit
            continue
        if type(current).__name__ == "AcceleratorError":  # torch >= 2.8 raises it for CUDA errors
            return current
        if isinstance(current, RuntimeError) and any(m in text for m in _FAULT_MARKERS):
            return current
    return None


def exit_process(status: int) -> NoReturn:
    """End this process now with ``status``, logs flushed: no Celery shutdown, nothing acknowledged."""
    logging.shutdown()
    os._exit(status)


def exit_on_device_fault(exc: BaseException, what: str, exit: Callable[[int], object] = exit_process) -> None:
    """Exit the process (status 75, nothing acknowledged) when ``exc`` holds a device fault.

    ``what`` names the job or request (an id, never a prompt). ``os._exit``
    skips Celery's warm shutdown, which would acknowledge the running
    message; the job comes back to a fresh worker and the poison guard counts it.
    ``exit`` is the seam in-process tests replace (the default ends the process).
    """
    fault = device_fault(exc)
    if fault is None:
        return
    log.critical("%s: device fault (%s); the worker exits with status %d, the job is requeued",
                 what, type(fault).__name__, EXIT_DEVICE_FAULT)
    exit(EXIT_DEVICE_FAULT)


def exit_when_dead(what: str, exit: Callable[[int], object] = exit_process) -> Callable[[BaseException], None]:
    """What a chat engine calls when its decode thread died and a fresh one could not start: the pool
    exits with the device-fault status, so its supervisor starts it clean (waiting jobs are requeued)."""

    def dead(exc: BaseException) -> None:
        log.critical("%s: the chat engine could not start again (%s); the worker exits with status %d",
                     what, type(exc).__name__, EXIT_DEVICE_FAULT)
        exit(EXIT_DEVICE_FAULT)

    return dead


def detach(exc: BaseException) -> BaseException:
    """Drop ``exc``'s traceback and chain, which hold the frames (and tensors) of the failed run."""
    exc.__traceback__ = None
    exc.__cause__ = None
    exc.__context__ = None
    return exc


def load_failure(name: str, exc: BaseException) -> Exception:
    """What a failed model load raises, without the chain that holds its half-loaded tensors.

    A device fault exits the process here; out-of-memory anywhere in the
    chain is :class:`OutOfMemory`; a ConfigError or ModelLoadError stays
    what it is; anything else becomes a ModelLoadError naming its type.
    """
    exit_on_device_fault(exc, f"loading {name}")
    failure: Exception
    if is_oom(exc):
        failure = OutOfMemory(f"{name} does not fit in device memory")
    elif isinstance(exc, ConfigError | ModelLoadError):
        failure = exc
    else:
        failure = ModelLoadError(f"{name} failed to load: {type(exc).__name__}")
    detach(failure)
    return failure


# -- the seam: attempts and hooks ---------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One model call about to run: what hooks see (no prompt in it)."""

    family: str
    #: e.g. ``txt2img``, ``img2img``, ``video``, ``chat``, ``enhance``
    stage: str
    #: the remedy in force: ``batch``, ``vae_tiling``, ``text_encoder_offload``, ``cpu_offload``, ``retry``, ...
    remedy: str
    #: images (or sequences) in this call
    batch: int = 1
    #: 1 for the first try of the job, then one more per remedy or retry
    number: int = 1


#: called before every attempt; may raise (a plug-in injecting faults, a tracer, a limiter)
AttemptHook = Callable[[Attempt], None]


def load_plugins(paths: Sequence[str], target: Any) -> None:
    """Import each ``module:callable`` and call it with ``target`` (the worker's Runtime).

    A plug-in may append :data:`AttemptHook` callables to ``target.attempt_hooks``.
    A bad path is a ConfigError naming ``OURVIDZ_RUNTIME_PLUGINS``.
    """
    for path in paths:
        import_callable(path, "OURVIDZ_RUNTIME_PLUGINS")(target)


@dataclass(frozen=True)
class Remedy:
    """One rung of a family's step-down ladder."""

    name: str
    #: images per call (SDXL); 0 means the job's whole batch
    batch: int = 0
    #: switches the remedy on before its attempt (kept on for the later rungs)
    apply: Callable[[], None] | None = None


@dataclass
class Outcome:
    """What :func:`step_down` reports: the rungs that ran out of memory and the one that worked."""

    failed: list[str]
    remedy: str
    batch: int

    def metadata(self) -> dict[str, Any] | None:
        """``metadata.oom_step_down`` of the job, or None when the first rung worked."""
        return {"failed": self.failed, "batch": self.batch, "remedy": self.remedy} if self.failed else None


def step_down(ladder: Sequence[Remedy], run: Callable[[Remedy], T], *, family: str, stage: str, total: int,
              device: torch.device | None, hooks: Sequence[AttemptHook] = (), what: str = "",
              release: Callable[[torch.device | None], None] = release_memory) -> tuple[T, Outcome]:
    """Run ``run(remedy)`` on each rung of ``ladder`` until one does not run out of memory.

    Before each call the hooks see the :class:`Attempt`. Out of memory moves
    to the next rung after ``release(device)`` outside the ``except``; any
    other error propagates (a device fault exits the process first). When
    every rung runs out of memory: :class:`OutOfMemory` (retryable), with no
    traceback attached.
    """
    failed: list[str] = []
    for number, remedy in enumerate(ladder, start=1):
        if remedy.apply is not None:
            remedy.apply()
        batch = remedy.batch or total
        attempt = Attempt(family, stage, remedy.name, batch, number)
        ok, value = _try(run, remedy, attempt, hooks, what)
        if ok:
            return value, Outcome(failed, remedy.name, batch)  # type: ignore[return-value]
        failed.append(f"{remedy.name}:{batch}")
        log.warning("%s: out of memory at %s (%s x%d), stepping down", what or family, stage, remedy.name, batch)
        release(device)  # here, not in the except: the failed run's frames are gone now
    raise OutOfMemory(f"{family} {stage} ran out of memory after every remedy ({', '.join(failed)})")


def _try(run: Callable[[Remedy], T], remedy: Remedy, attempt: Attempt, hooks: Sequence[AttemptHook],
         what: str) -> tuple[bool, T | None]:
    """``(True, value)``, or ``(False, None)`` after out-of-memory; the exception dies with this frame."""
    try:
        for hook in hooks:
            hook(attempt)
        return True, run(remedy)
    except Exception as exc:
        exit_on_device_fault(exc, what or attempt.family)
        if not is_oom(exc):
            raise
    return False, None


def retry_once(run: Callable[[], T], *, family: str, stage: str, device: torch.device | None,
               hooks: Sequence[AttemptHook] = (), what: str = "") -> T:
    """``run()``; after out-of-memory release memory and run it once more (chat)."""
    ladder = (Remedy("first"), Remedy("retry"))
    value, _ = step_down(ladder, lambda _remedy: run(), family=family, stage=stage, total=1, device=device,
                         hooks=hooks, what=what)
    return value
