"""Model loaders, one module per family; helpers shared by all of them here.

Each family module (:mod:`.sdxl`, :mod:`.wan`, :mod:`.qwen`) offers a
``load_*`` that reads real weights and tiny ones (:mod:`.tiny`: small
random-weight models written as real checkpoint folders, offline) through the
same ``from_pretrained`` code path. What the two diffusers families share is in
:mod:`.diffusion`, what every chat backend shares in :mod:`.chat_common`.
Layer 2: imports only :mod:`ourvidz_tasks.contract`; torch, diffusers and
transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import fcntl
import gc
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..contract.devices import local_cuda_index
from ..contract.errors import ConfigError

if TYPE_CHECKING:
    import torch

def resolve_device(name: str | None) -> torch.device:
    """``OURVIDZ_DEVICE`` as this process's torch device: default the first GPU, else CPU.

    ``cpu:N`` (a simulated device) computes on the CPU; ``cuda:N`` is the host's card N, renumbered
    as the container sees it (:func:`ourvidz_tasks.contract.devices.local_cuda_index`).
    """
    import torch

    if name is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"OURVIDZ_DEVICE: {name} requested but CUDA is not available")
        try:
            index = local_cuda_index(device.index or 0, os.environ)
        except ValueError as exc:
            raise ConfigError(f"OURVIDZ_DEVICE: {exc}") from None
        if index >= torch.cuda.device_count():
            raise ConfigError(f"OURVIDZ_DEVICE: {name} requested but only {torch.cuda.device_count()} GPU(s) exist")
        return torch.device("cuda", index)
    return device


def use_device(device: torch.device, set_device: Callable[[torch.device], None] | None = None) -> None:
    """Make ``device`` this process's current CUDA device (nothing on CPU, CUDA untouched).

    Helpers that take no device (``torch.cuda.mem_get_info()``, transformers' cache sizing, a
    library's handle) use the current one: with ``OURVIDZ_DEVICE=cuda:1`` they would measure
    card 0 and open a context there. ``set_device`` is the seam tests replace.
    """
    if device.type != "cuda":
        return
    if set_device is None:
        import torch

        set_device = torch.cuda.set_device
    set_device(device)


def compute_dtype(device: torch.device, prefer: str = "bfloat16") -> torch.dtype:
    """Half precision on CUDA (``prefer``), float32 on CPU."""
    import torch

    if device.type != "cuda":
        return torch.float32
    return getattr(torch, prefer)


def module_bytes(modules: Iterable[object]) -> int:
    """Parameter and buffer bytes of the torch modules given (others are skipped)."""
    import torch

    total = 0
    seen: set[int] = set()
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def release_memory(device: torch.device | None = None) -> None:
    """Collect garbage and hand cached CUDA blocks back to the driver."""
    import torch

    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()


def build_once(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build ``dest`` with ``build(tmpdir)`` unless it exists; safe across processes.

    The build goes to a temporary folder beside ``dest`` and is renamed into
    place, under a file lock, so two workers starting together build it once
    and never see half a model.
    """
    dest = Path(dest)
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / ".complete").exists():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def brief_error(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, at most ``limit`` characters (for load errors)."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
