"""What each pool's process really holds, read from outside every few milliseconds: the invariant's witness.

The ledger says what the pools *reserved*; this reads what their processes *hold*, the way the device
sees it, so a test or a rehearsal can check that the pools together never hold more than the budget:

* on CUDA, :class:`NvmlReader`: each process's used memory on the card as NVML reports it
  (``nvmlDeviceGetComputeRunningProcesses``: its CUDA context, the allocator's cached blocks and
  every library's workspace included; what ``nvidia-smi`` shows, not the allocator's view);
* on CPU, :class:`RssReader`: each process's resident memory (``/proc/PID/statm``), from which the
  caller subtracts what the process held before (its idle context, :meth:`MemorySampler.read`).

``MemorySampler(reader).start({"sdxl": pid, ...}, baselines)`` samples from a daemon thread;
``stop()`` returns the :class:`Samples`: per pool the MB held above its baseline at every tick,
their sum per tick, its peak. ``nvidia-ml-py`` is imported only by :class:`NvmlReader`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

MB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Reader(Protocol):
    """Bytes each process holds now (a process gone or not seen: 0)."""

    kind: str

    def read(self, pids: Mapping[str, int]) -> dict[str, int]: ...


class RssReader:
    """Resident memory of each process (``/proc/PID/statm``; one small read per process)."""

    kind = "rss"

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc

    def read(self, pids: Mapping[str, int]) -> dict[str, int]:
        out = {}
        for name, pid in pids.items():
            try:
                out[name] = int((self.proc / str(pid) / "statm").read_text().split()[1]) * PAGE
            except (OSError, IndexError, ValueError):
                out[name] = 0  # gone meanwhile
        return out


class NvmlReader:
    """Used memory of each process on one card, as NVML reports it (contexts included).

    ``index``: the card's NVML index (``CUDA_VISIBLE_DEVICES`` renumbers torch's devices, not
    NVML's). Inside a container without the host's PID namespace NVML names host PIDs: a
    process not found reads 0, so a caller checks that every pool was seen at all.
    """

    kind = "nvml"

    def __init__(self, index: int = 0) -> None:
        import pynvml  # nvidia-ml-py: the worker extra; only where a card is

        pynvml.nvmlInit()
        self.nvml: Any = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def read(self, pids: Mapping[str, int]) -> dict[str, int]:
        used: dict[int, int] = {}
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            used[int(proc.pid)] = used.get(int(proc.pid), 0) + int(proc.usedGpuMemory or 0)
        return {name: used.get(pid, 0) for name, pid in pids.items()}

    def total(self) -> int:
        """The card's memory (bytes), as NVML reports it."""
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).total)

    def close(self) -> None:
        self.nvml.nvmlShutdown()


def reader_for(device: str) -> Reader:
    """NVML for ``cuda``/``cuda:N`` (card N), resident memory otherwise."""
    if device.startswith("cuda"):
        _, _, index = device.partition(":")
        return NvmlReader(int(index or 0))
    return RssReader()


@dataclass
class Samples:
    """What a :class:`MemorySampler` read: per pool the MB held above its baseline at each tick."""

    kind: str
    baselines_mb: dict[str, float]
    times: list[float] = field(default_factory=list)
    pools: dict[str, list[float]] = field(default_factory=dict)

    @property
    def sums(self) -> list[float]:
        return [sum(tick) for tick in zip(*self.pools.values(), strict=True)] if self.pools else []

    @property
    def peak_sum_mb(self) -> float:
        return max(self.sums, default=0.0)

    @property
    def peaks_mb(self) -> dict[str, float]:
        return {name: max(values, default=0.0) for name, values in self.pools.items()}

    def over(self, limit_mb: float) -> list[tuple[float, dict[str, float]]]:
        """The ticks whose sum went over ``limit_mb``: (seconds since start, MB per pool)."""
        start = self.times[0] if self.times else 0.0
        return [(round(t - start, 3), {n: round(v[i], 1) for n, v in self.pools.items()})
                for i, t in enumerate(self.times) if sum(v[i] for v in self.pools.values()) > limit_mb]

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "samples": len(self.times), "peak_sum_mb": round(self.peak_sum_mb, 1),
                "peaks_mb": {n: round(v, 1) for n, v in self.peaks_mb.items()},
                "baselines_mb": {n: round(v, 1) for n, v in self.baselines_mb.items()},
                "seconds": round(self.times[-1] - self.times[0], 1) if self.times else 0.0}


class MemorySampler:
    """Reads every pool's process memory each ``interval`` seconds from a daemon thread."""

    def __init__(self, reader: Reader | None = None, interval: float = 0.02) -> None:
        self.reader: Reader = reader or RssReader()
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples: Samples | None = None

    def read(self, pids: Mapping[str, int]) -> dict[str, int]:
        """Bytes each process holds now (a caller's baseline: its idle context)."""
        return self.reader.read(pids)

    def start(self, pids: Mapping[str, int], baselines: Mapping[str, int] | None = None) -> MemorySampler:
        """Sample ``{pool: pid}`` from now; each pool's bytes less its ``baselines`` entry (default 0)."""
        base = {name: int((baselines or {}).get(name, 0)) for name in pids}
        self._samples = Samples(self.reader.kind, {n: b / MB for n, b in base.items()},
                                pools={name: [] for name in pids})
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(dict(pids), base), name="memsampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Samples:
        """Stop sampling; what was read."""
        assert self._thread is not None and self._samples is not None, "start() first"
        self._stop.set()
        self._thread.join(10)
        self._thread = None
        return self._samples

    def _run(self, pids: dict[str, int], base: dict[str, int]) -> None:
        samples = self._samples
        assert samples is not None
        while True:
            held = self.reader.read(pids)
            samples.times.append(time.monotonic())
            for name in pids:
                samples.pools[name].append(max(0, held[name] - base[name]) / MB)  # below idle: 0, never a credit
            if self._stop.wait(self.interval):
                return
