"""The memory probes: real numbers on CPU, a load or an OOM attempt never counted as working memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch

from ourvidz_tasks.contract.errors import OutOfMemory
from ourvidz_tasks.runtime import memprobe
from ourvidz_tasks.runtime.faults import Remedy, step_down
from ourvidz_tasks.runtime.memprobe import CpuProbe, configure_cuda_allocator, default_budget, probe_for

MB = 2**20


def block(mb: int) -> torch.Tensor:
    return torch.ones(mb * MB // 4)  # written: resident


def test_probe_is_chosen_per_device_kind() -> None:
    assert isinstance(probe_for("cpu"), CpuProbe) and probe_for("cpu").kind == "cpu"
    assert probe_for("cpu").exact  # Linux: clear_refs + VmHWM, not a ru_maxrss lower bound


def test_working_memory_and_resident_part_are_split() -> None:
    probe = CpuProbe()
    kept: list[torch.Tensor] = []
    with probe.measure() as m:
        kept.append(block(24))  # stays after the call (a cache the model keeps)
        tmp = block(48)  # given back when the call ends
        del tmp
    assert 20 <= m.resident_mb <= 32, m.resident_mb
    assert 40 <= m.mb <= 60, m.mb
    with probe.measure() as again:  # the next call: nothing new kept
        tmp = block(48)
        del tmp
    assert again.resident_mb <= 4 and 40 <= again.mb <= 60, (again.resident_mb, again.mb)


def test_an_attempt_that_ran_out_of_memory_is_not_counted() -> None:
    """step_down's attempt hooks restart the measurement: only the attempt that returned is measured."""
    probe = CpuProbe()
    tried: list[str] = []

    def run(remedy: Remedy) -> int:
        tried.append(remedy.name)
        if remedy.name == "whole":
            held = block(96)  # the failed attempt's tensors...
            del held  # ...gone, but its high-water mark is what a naive probe would report
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        tmp = block(24)
        del tmp
        return 1

    with probe.measure() as m:
        step_down([Remedy("whole"), Remedy("halves")], run, family="sdxl", stage="txt2img", total=1,
                  device=torch.device("cpu"), hooks=[lambda attempt: m.restart()])
    assert tried == ["whole", "halves"] and m.restarts == 2
    assert 16 <= m.mb <= 40, m.mb
    with pytest.raises(OutOfMemory):
        step_down([Remedy("whole")], run, family="sdxl", stage="txt2img", total=1, device=None)


FALLBACK = """
import resource, sys, torch
from pathlib import Path
from ourvidz_tasks.runtime.memprobe import CpuProbe
proc = Path(sys.argv[1])
(proc / "clear_refs").mkdir()  # not writable: the high-water mark can't be reset (as in some containers)
(proc / "status").symlink_to("/proc/self/status")  # VmRSS still readable
probe = CpuProbe(proc=proc)  # peaks from ru_maxrss, the process's high-water mark
assert not probe.exact
torch.ones(1)
# ru_maxrss outlives exec: this process starts with its parent's high-water mark
headroom = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - probe.current()
with probe.measure() as first:  # 64 MB above the earlier peak: those 64 MB are seen
    tmp = torch.ones((headroom + 64 * 2**20) // 4)
    del tmp
with probe.measure() as second:  # under the first one's peak: the high-water mark does not move
    tmp = torch.ones(32 * 2**20 // 4)
    del tmp
print(first.mb, second.mb, headroom // 2**20)
"""


def test_fallback_without_clear_refs_is_a_lower_bound(tmp_path: Path) -> None:
    """Never more than the block used: only its growth above the process's earlier peak (ru_maxrss)."""
    out = subprocess.run([sys.executable, "-c", FALLBACK, str(tmp_path)], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    first, second, headroom = (int(x) for x in out.split())
    assert 40 <= first <= 66, out  # headroom + 64 MB used: the 64 MB above the earlier peak
    assert second == 0, out  # 32 MB used, under the peak: a lower bound, never an over-count
    print(f"fallback probe: {first} of {headroom + 64} MB seen (the rest under the earlier peak), then 0 of 32")


def test_allocator_conf_respects_the_operator() -> None:
    env: dict[str, str] = {}
    assert configure_cuda_allocator(env) == "expandable_segments:True"
    env = {memprobe.ALLOC_CONF: "max_split_size_mb:512"}
    assert configure_cuda_allocator(env) == "max_split_size_mb:512"


def test_default_budget_leaves_contexts_and_margin() -> None:
    cpu = default_budget("cpu", pools=3, context_mb=768, margin_mb=1024)
    assert cpu.context_mb == 0 and cpu.budget_mb == cpu.total_mb - 1024  # no CUDA contexts on CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_probe_counts_reserved_memory() -> None:
    probe = probe_for("cuda:0")
    keep = torch.ones(2**20, device="cuda")
    with probe.measure() as m:
        tmp = torch.ones(64 * MB // 4, device="cuda")
        del tmp
    assert 64 <= m.mb < 80 and m.resident_mb == 0
    budget = default_budget("cuda:0", pools=3, context_mb=768, margin_mb=1024)
    assert budget.budget_mb == budget.total_mb - 3 * 768 - 1024
    del keep


def test_a_job_holds_its_shape_before_the_call_and_gives_it_back_after(store: redis.Redis) -> None:
    """ModelSlot.hold before a model call, bookkeeping.remember_peak and ModelSlot.settle after it: the first
    call after a load gives the resident part (not the process's first call: that is the process's own),
    every call a work sample; between jobs only the weights and resident caches stay reserved."""
    import uuid
    from types import SimpleNamespace

    from ourvidz_tasks.runtime.bookkeeping import remember_peak
    from ourvidz_tasks.runtime.ledger import Ledger
    from ourvidz_tasks.runtime.memprobe import Measurement
    from ourvidz_tasks.runtime.runtime import ModelSlot

    ledger = Ledger(store, f"t-{uuid.uuid4().hex[:8]}", "cpu", 1000, queue_depth=lambda p: 0, slack=0.0, window=2)
    weights = SimpleNamespace(nbytes=lambda: 250 * MB, unload=lambda: 250 * MB)
    slot = ModelSlot("wan", lambda: weights, lambda name, seconds: None, pool="wan", ledger=ledger,
                     default_mb=300, default_work_mb=50, wait=1)
    try:
        slot.get()
        res = slot.reservation
        assert res is not None and res.mb == 300  # measured weights, no work yet: the first estimate
        rt = SimpleNamespace(ledger=ledger, used={"wan"}, fresh={"wan"}, models={"wan": slot}, measured_calls=0,
                             family="wan", cap_memory=lambda: None)

        def job(work_mb: int, resident_mb: int) -> int:
            held = slot.hold("64x64x9")
            m = Measurement(CpuProbe())
            m.bytes, m.resident, m.stopped = work_mb * MB, resident_mb * MB, True
            remember_peak(rt, "64x64x9", m)
            slot.settle()
            return held

        assert job(90, 40) == 300  # the process's first call: its 40 MB leftovers are not the model's
        assert ledger.sizes("wan")["resident"] == 0 and res.mb == 250  # between jobs: the weights
        assert job(30, 5) == 250 + 90  # held for the shape's recent figure before the call
        assert ledger.sizes("wan")["resident"] == 0 and res.mb == 250  # not fresh any more: nothing resident
        assert job(30, 0) == 250 + 90
        assert slot.hold("64x64x9") == 250 + 30  # the 90 MB sample aged out of the window of 2
        slot.settle()
        rt.fresh.add("wan")  # a reload: its first call's leftovers are the model's caches
        job(32, 12)
        assert ledger.sizes("wan")["resident"] == 12 and res.mb == 250 + 12
        assert slot.hold("64x64x9") == 250 + 12 + 32 and ledger.status()["reserved_mb"] == 250 + 12 + 32
    finally:
        ledger.clear()
