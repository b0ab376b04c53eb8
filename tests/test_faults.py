"""Device faults and out-of-memory, in process: classification, the step-down loop, cleanup outside ``except``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import weakref
from typing import Any

import pytest
import torch

from ourvidz_tasks.contract.errors import ModelLoadError, OutOfMemory
from ourvidz_tasks.runtime.faults import (
    EXIT_DEVICE_FAULT,
    Attempt,
    Remedy,
    causes,
    device_fault,
    is_oom,
    load_failure,
    retry_once,
    step_down,
)
from ourvidz_tasks.runtime.lifecycle import as_job_error
from ourvidz_tasks.runtime.remedies import batch_sizes

CUDA_FAULT = "CUDA error: an illegal memory access was encountered"


def wrapped(inner: BaseException, outer: type[Exception] = ModelLoadError, implicit: bool = False) -> Exception:
    """``outer`` raised while handling ``inner`` (``from`` unless ``implicit``), as libraries do."""
    try:
        try:
            raise inner
        except BaseException as exc:
            if implicit:
                raise outer("wrapped")  # noqa: B904 - __context__ only, as careless code does
            raise outer("wrapped") from exc
    except Exception as caught:
        return caught


@pytest.mark.parametrize("implicit", [False, True])
def test_device_faults_are_found_behind_wrappers(implicit: bool) -> None:
    for inner in (RuntimeError(CUDA_FAULT), torch.AcceleratorError(CUDA_FAULT),
                  RuntimeError("CUDA error: device-side assert triggered")):
        exc = wrapped(inner, implicit=implicit)
        assert device_fault(exc) is inner and not is_oom(exc)
        assert inner in list(causes(exc))


def test_out_of_memory_is_not_a_device_fault() -> None:
    for inner in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                  RuntimeError("CUDA error: out of memory"), RuntimeError("[enforce fail] can't allocate memory")):
        exc = wrapped(inner)
        assert device_fault(exc) is None and is_oom(exc)
        assert isinstance(as_job_error(exc), OutOfMemory)  # a load that ran out of memory is OOM_ERROR
    plain = wrapped(ValueError("bad file"))
    assert device_fault(plain) is None and not is_oom(plain)
    assert isinstance(as_job_error(plain), ModelLoadError)


#: messages torch 2.13 raises when memory runs out outside the caching allocator (c10/cuda/CUDAException.h,
#: aten/src/ATen/cuda/CublasHandlePool.cpp, aten/src/ATen/cudnn/Handle.cpp)
CUDA_OOM = ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call, "
            "so the stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
            "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")
CUBLAS_OOM = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
CUDNN_OOM = "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"


@pytest.mark.parametrize("implicit", [False, True])
def test_out_of_memory_outside_the_allocator_is_out_of_memory(implicit: bool) -> None:
    for inner in (torch.AcceleratorError(CUDA_OOM), RuntimeError(CUDA_OOM), torch.AcceleratorError(CUBLAS_OOM),
                  RuntimeError(CUBLAS_OOM), RuntimeError(CUDNN_OOM), MemoryError("not enough memory for the cache")):
        for exc in (inner, wrapped(inner, implicit=implicit), wrapped(inner, RuntimeError, implicit)):
            assert device_fault(exc) is None, repr(inner)
            assert is_oom(exc), repr(inner)
            assert isinstance(as_job_error(exc), OutOfMemory)
    # a real fault anywhere in the chain still wins over an out-of-memory beside it
    fault = torch.AcceleratorError(CUDA_FAULT)
    both = RuntimeError(CUDA_OOM)
    both.__cause__ = fault
    assert device_fault(both) is fault and not is_oom(both)


def test_a_chat_engine_that_cannot_size_its_cache_is_out_of_memory() -> None:
    """transformers raises MemoryError from its cache sizing; the engine wraps it: OOM_ERROR, not MODEL_LOAD_ERROR."""
    sizing = MemoryError("Memory footprint 1237319680 is more than available memory 1073741824")
    failure = load_failure("qwen_instruct", wrapped(sizing, ModelLoadError))
    assert isinstance(failure, OutOfMemory) and failure.__cause__ is None


def test_causes_survive_a_cycle() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__context__ = b, a
    assert list(causes(a)) == [a, b]


def test_step_down_releases_memory_outside_the_except_with_the_failed_run_gone() -> None:
    """The failed run's tensor must be unreachable (traceback dropped) when memory is released."""
    seen: list[tuple[bool, bool]] = []
    ref: list[weakref.ref[torch.Tensor]] = []

    def run(remedy: Remedy) -> str:
        activations = torch.ones(1024)
        ref.append(weakref.ref(activations))
        if remedy.name == "big":
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return remedy.name

    def release(device: Any) -> None:
        seen.append((sys.exc_info()[1] is None, ref[-1]() is None))

    attempts: list[Attempt] = []
    value, outcome = step_down([Remedy("big", 6), Remedy("small", 1)], run, family="sdxl", stage="txt2img",
                               total=6, device=None, hooks=[attempts.append], release=release)
    assert value == "small" and seen == [(True, True)]
    assert outcome.metadata() == {"failed": ["big:6"], "batch": 1, "remedy": "small"}
    assert [(a.remedy, a.batch, a.number) for a in attempts] == [("big", 6, 1), ("small", 1, 2)]


def test_step_down_gives_up_with_a_bare_out_of_memory_and_lets_other_errors_through() -> None:
    def oom(_: Remedy) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    with pytest.raises(OutOfMemory) as info:
        step_down([Remedy("a"), Remedy("b")], oom, family="wan", stage="video", total=1, device=None)
    assert "a:1, b:1" in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None  # nothing holds the runs' frames
    calls: list[str] = []

    def bad(remedy: Remedy) -> None:
        calls.append(remedy.name)
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        step_down([Remedy("a"), Remedy("b")], bad, family="wan", stage="video", total=1, device=None)
    assert calls == ["a"]


def test_retry_once_tries_exactly_twice() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 2:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return "ok"

    assert retry_once(flaky, family="chat", stage="chat", device=None) == "ok" and len(calls) == 2
    def always() -> str:
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    calls.clear()
    with pytest.raises(OutOfMemory):
        retry_once(always, family="chat", stage="chat", device=None)
    assert len(calls) == 2


def test_load_failure_drops_the_chain_and_names_out_of_memory() -> None:
    failure = load_failure("sdxl", wrapped(torch.OutOfMemoryError("CUDA out of memory"), ValueError))
    assert isinstance(failure, OutOfMemory) and failure.__cause__ is None
    other = load_failure("sdxl", ValueError("bad header"))
    assert isinstance(other, ModelLoadError) and "ValueError" in str(other)


def test_batch_rungs() -> None:
    assert batch_sizes(6) == [6, 3, 1] and batch_sizes(3) == [3, 2, 1] and batch_sizes(1) == [1]


@pytest.mark.parametrize("where", ["load", "step"])
def test_a_device_fault_exits_the_process_with_75(where: str) -> None:
    """A real process: a CUDA error behind a load error (or in a step-down attempt) ends it at once."""
    code = textwrap.dedent(f"""
        import torch
        from ourvidz_tasks.runtime.faults import Remedy, step_down
        from ourvidz_tasks.runtime.runtime import ModelSlot

        def broken():
            try:
                raise torch.AcceleratorError({CUDA_FAULT!r})
            except RuntimeError as exc:
                raise ValueError("could not move the weights") from exc

        if {where!r} == "load":
            ModelSlot("sdxl", broken, lambda name, seconds: None, pool="sdxl").get()
        else:
            step_down([Remedy("batch")], lambda remedy: broken(), family="sdxl", stage="txt2img", total=1,
                      device=None)
        print("still running")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_DEVICE_FAULT, done.stderr[-2000:]
    assert "still running" not in done.stdout
    assert "device fault (AcceleratorError)" in done.stderr
