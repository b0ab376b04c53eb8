"""How much memory this process really uses: one probe per device kind, chosen at start.

* :class:`CudaProbe`: the caching allocator's *reserved* memory (what the
  process holds on the card, cached blocks included; allocated memory
  understates it). The per-process CUDA context is not in it: the budget
  sets an allowance aside for it per pool (:func:`default_budget`).
* :class:`CpuProbe`: the process's real memory high-water mark, reset per
  measurement (Linux: write ``5`` to ``/proc/self/clear_refs``, read
  ``VmHWM`` from ``/proc/self/status``; free heap pages are handed back
  first with ``malloc_trim`` so memory freed by the last job does not hide
  this one's). Elsewhere it falls back to ``ru_maxrss``, a lower bound.

A :class:`Measurement` splits what one model call added into two parts:

* ``resident``: what is still held when the call ends (caches a model builds
  at its first call after a load: kernels' workspaces, attention and rope
  tables); it lives as long as the model, like its weights;
* ``bytes`` (working memory): the peak above the start, less ``resident``:
  what the call needs while it runs and gives back.

It is restarted after a load and before every attempt (an attempt that ran
out of memory is never counted), and only a call that returned is recorded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..contract.names import FAMILIES

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MB = 2**20
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE = "expandable_segments:True"


def mb_of(nbytes: int) -> int:
    """Bytes as whole MB, rounded up."""
    return max(0, -(-nbytes // MB))


class Probe:
    """What every probe offers: bytes held now, a resettable high-water mark."""

    kind = "none"

    def current(self) -> int:
        """Bytes this process holds on the device now."""
        raise NotImplementedError

    def reset(self) -> int:
        """Start a new high-water mark; returns the baseline it is measured from."""
        raise NotImplementedError

    def peak(self) -> int:
        """The high-water mark since the last :meth:`reset`."""
        raise NotImplementedError

    def held(self) -> int:
        """Bytes in live use now (memory freed but kept by an allocator not counted)."""
        return self.current()

    def give_back(self) -> None:
        """Hand what the allocator keeps cached back to the device (after a job: the other pools' now)."""

    @contextmanager
    def measure(self) -> Iterator[Measurement]:
        """A :class:`Measurement` of the block (``bytes`` set when it ends)."""
        m = Measurement(self)
        m.restart()
        try:
            yield m
        finally:
            m.stop()


class Measurement:
    """The working memory of one model call: peak above the baseline of the last (re)start."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.baseline = self.held_at_start = 0
        self.bytes = self.resident = 0
        self.restarts = -1
        self.stopped = False

    @property
    def mb(self) -> int:
        return mb_of(self.bytes)

    @property
    def resident_mb(self) -> int:
        return mb_of(self.resident)

    def restart(self) -> None:
        """Forget everything before now (a model load, an attempt that ran out of memory)."""
        if not self.stopped:
            self.held_at_start = self.probe.held()
            self.baseline = self.probe.reset()
            self.restarts += 1

    def stop(self) -> int:
        if not self.stopped:
            grown = max(0, self.probe.peak() - self.baseline)
            self.resident = min(grown, max(0, self.probe.held() - self.held_at_start))
            self.bytes = grown - self.resident
            self.stopped = True
        return self.bytes


class CpuProbe(Probe):
    """Real memory (RSS) high-water mark of this process, reset per measurement."""

    kind = "cpu"

    def __init__(self, proc: Path = Path("/proc/self")) -> None:
        self.proc = proc
        self.exact = self._can_reset()
        self._trim = _malloc_trim()
        self._floor = 0
        if not self.exact:
            log.warning("memory probe: %s/clear_refs unavailable; CPU peaks are lower bounds (ru_maxrss)", proc)

    def current(self) -> int:
        """VmRSS; without ``/proc`` at all, ru_maxrss (then every growth looks resident: working memory 0)."""
        try:
            return self._status("VmRSS")
        except OSError:
            return _max_rss()

    def held(self) -> int:
        if self._trim is not None:
            self._trim(0)  # freed heap pages back to the system first: RSS is then what is in use
        return self.current()

    def give_back(self) -> None:
        if self._trim is not None:
            self._trim(0)

    def reset(self) -> int:
        if self._trim is not None:
            self._trim(0)
        if self.exact:
            (self.proc / "clear_refs").write_text("5")
            return self._status("VmRSS")
        self._floor = _max_rss()
        return self._floor

    def peak(self) -> int:
        return self._status("VmHWM") if self.exact else _max_rss()

    def _status(self, field: str) -> int:
        for line in (self.proc / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"{field} missing from {self.proc}/status")

    def _can_reset(self) -> bool:
        try:
            (self.proc / "clear_refs").write_text("5")
            self._status("VmHWM")
        except OSError:
            return False
        return True


class CudaProbe(Probe):
    """Reserved memory of this process on one CUDA device (the caching allocator's view)."""

    kind = "cuda"

    def __init__(self, device: torch.device) -> None:
        import torch

        self.torch, self.device = torch, device

    def current(self) -> int:
        return int(self.torch.cuda.memory_reserved(self.device))

    def reset(self) -> int:
        cuda = self.torch.cuda
        cuda.synchronize(self.device)
        # cached blocks the call would reuse unseen go back first: its growth is its working memory
        cuda.empty_cache()
        cuda.reset_peak_memory_stats(self.device)
        return int(cuda.memory_reserved(self.device))

    def peak(self) -> int:
        self.torch.cuda.synchronize(self.device)
        return int(self.torch.cuda.max_memory_reserved(self.device))

    def held(self) -> int:
        return int(self.torch.cuda.memory_allocated(self.device))

    def give_back(self) -> None:
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.empty_cache()  # a job's cached blocks go back to the card, for the other pools

    def total(self) -> int:
        return int(self.torch.cuda.get_device_properties(self.device).total_memory)

    def cap(self, mb: int) -> None:
        """Let this process hold at most ``mb`` on the card (an allocation beyond is an OOM here)."""
        fraction = min(1.0, mb * MB / self.total())
        self.torch.cuda.set_per_process_memory_fraction(fraction, self.device)


def probe_for(device: torch.device | str) -> Probe:
    """The probe of ``device``'s kind, chosen once at start."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return CudaProbe(torch.device("cuda", dev.index or 0))
    return CpuProbe()


@contextmanager
def measure_peak(device: torch.device | str | None = None) -> Iterator[Measurement]:
    """Working memory of the block, measured by the probe of ``device``'s kind (default: CPU)."""
    with probe_for(device if device is not None else "cpu").measure() as measurement:
        yield measurement


def configure_cuda_allocator(environ: dict[str, str] | None = None) -> str:
    """``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the operator set it; returns it.

    Must run before the first CUDA allocation: segments that grow in place
    keep fragmentation (reserved minus allocated) small across job shapes.
    """
    env = os.environ if environ is None else environ
    env.setdefault(ALLOC_CONF, EXPANDABLE)
    return env[ALLOC_CONF]


@dataclass(frozen=True)
class Budget:
    """How the default budget was computed (MB)."""

    total_mb: int
    pools: int
    context_mb: int
    margin_mb: int

    @property
    def budget_mb(self) -> int:
        return max(1, self.total_mb - self.pools * self.context_mb - self.margin_mb)


def default_budget(device: torch.device | str, *, pools: int = len(FAMILIES), context_mb: int = 768,
                   margin_mb: int = 1024) -> Budget:
    """The card's memory minus one CUDA context per pool and a safety margin; on CPU the machine's
    RAM minus the margin (no contexts)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev.index or 0).total_memory
        return Budget(mb_of(total), pools, context_mb, margin_mb)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Budget(mb_of(total), pools, 0, margin_mb)


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] | None = getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None
    return trim
