"""The invariant's witness (``ourvidz_tasks.tools.memsampler``): it reads what processes really hold.

On CPU a child process's resident memory, sampled from outside, rises by what it writes and the
baseline is taken off; on CUDA the NVML path maps NVML's processes to the pools by PID (a stand-in
``pynvml`` module here: no card on this machine), a process NVML does not list reading 0.
"""

from __future__ import annotations

import subprocess
import sys
import time
import types
from typing import Any

import pytest

from ourvidz_tasks.tools.memsampler import MB, MemorySampler, NvmlReader, Samples, reader_for

CHILD = """
import sys
print("up", flush=True)
sys.stdin.readline()
held = b"\\x01" * (64 << 20)  # written: resident
print("held", flush=True)
sys.stdin.readline()
"""


def test_resident_memory_of_a_process_above_its_baseline() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "up"
        sampler = MemorySampler(interval=0.01)
        pids = {"child": child.pid}
        sampler.start(pids, sampler.read(pids))
        time.sleep(0.05)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "held"
        time.sleep(0.05)
        samples = sampler.stop()
    finally:
        child.kill()
        child.wait()
    assert samples.kind == "rss" and len(samples.times) >= 5
    assert samples.pools["child"][0] < 8, samples.pools["child"][:3]  # the baseline is taken off
    assert 60 <= samples.peaks_mb["child"] <= 80 and samples.peak_sum_mb == samples.peaks_mb["child"]
    assert samples.baselines_mb["child"] > 4  # an interpreter


def test_sums_peaks_and_ticks_over_a_limit() -> None:
    samples = Samples("rss", {"a": 10.0, "b": 20.0}, times=[100.0, 100.5, 101.0],
                      pools={"a": [1.0, 5.0, 2.0], "b": [3.0, 4.0, 9.0]})
    assert samples.sums == [4.0, 9.0, 11.0] and samples.peak_sum_mb == 11.0
    assert samples.peaks_mb == {"a": 5.0, "b": 9.0}
    assert samples.over(10) == [(1.0, {"a": 2.0, "b": 9.0})]


def fake_nvml(processes: dict[int, list[Any]]) -> types.ModuleType:
    """A stand-in ``pynvml``: card ``i`` runs ``processes[i]``, each a (pid, usedGpuMemory)."""
    nvml = types.ModuleType("pynvml")
    nvml.calls = []  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: nvml.calls.append("init")  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: nvml.calls.append("shutdown")  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: [  # type: ignore[attr-defined]
        types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in processes[h]]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 << 30)  # type: ignore[attr-defined]
    return nvml


def test_nvml_reads_each_pool_by_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml({0: [(11, 900 * MB)], 1: [(11, 500 * MB), (12, 700 * MB), (12, 100 * MB), (13, None)]})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    reader = reader_for("cuda:1")
    assert isinstance(reader, NvmlReader) and reader.kind == "nvml"
    # per process on card 1 only: two entries of one PID add up; no figure (MIG, no rights) reads 0; absent 0
    assert reader.read({"sdxl": 11, "chat": 12, "wan": 13, "gone": 14}) == \
        {"sdxl": 500 * MB, "chat": 800 * MB, "wan": 0, "gone": 0}
    assert reader.total() == 80 << 30
    reader.close()
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]
    assert reader_for("cuda").read({"sdxl": 11}) == {"sdxl": 900 * MB}
    assert reader_for("cpu").kind == "rss"
