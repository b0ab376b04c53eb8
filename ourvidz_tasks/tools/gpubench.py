"""The tools of ``bin/gpu-check`` (:mod:`ourvidz_tasks.tools.gpucheck`): its shapes, measuring (time,
peak memory, host syncs, output checks) and models built at full size from the committed configs (or
the tiny ones without CUDA). The sections that use them are in :mod:`ourvidz_tasks.tools.gpusections`.

Imports only torch, diffusers, transformers and the package's torch-side
modules (``faults``, ``memplan``, ``models``): never Celery or Redis.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MB = 2**20


@dataclass(frozen=True)
class Plan:
    """The shapes of one run: the real ones on CUDA, small ones on the tiny models elsewhere."""

    real: bool
    sdxl_size: int
    sdxl_batches: tuple[int, ...]
    sdxl_steps: int
    wan_shape: tuple[int, int, int]  # height, width, frames
    wan_steps: int
    qwen_batches: tuple[int, ...]
    qwen_prompt: int
    qwen_new: int


REAL = Plan(True, 1024, (1, 6), 3, (480, 832, 81), 2, (1, 8), 128, 64)
TINY = Plan(False, 64, (1, 6), 2, (32, 32, 5), 2, (1, 8), 16, 8)


# -- measuring -----------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Peak reserved memory (MB) of the block, on CUDA; None elsewhere."""
    import torch

    out: dict[str, Any] = {"peak_reserved_mb": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / MB)


def count_syncs(device: torch.device, fn: Callable[[], Any]) -> int | None:
    """Host synchronisations ``fn`` makes (CUDA's sync debug mode); None without CUDA."""
    import torch

    if device.type != "cuda":
        fn()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message))


def image_check(images: torch.Tensor) -> dict[str, Any]:
    """NaN/inf anywhere, or an output that is one flat colour (black), in a [-1, 1] or [0, 1] batch."""
    import torch

    values = images.float()
    finite = bool(torch.isfinite(values).all())
    spread = float(values.std()) if finite and values.numel() > 1 else 0.0
    return {"finite": finite, "std": round(spread, 5), "black": spread < 1e-3, "ok": finite and spread >= 1e-3}


def ledger_estimate(plan: Plan, model: str, shape: str, measured: dict[str, Any],
                    weights_mb: float) -> dict[str, Any] | None:
    """The ledger's first estimate of ``shape`` (real sizes only), beside the measured working memory.

    Compare working memory (peak reserved minus the weights built here): the
    estimate's weights also count the text encoders, which the check does not build.
    """
    from ourvidz_tasks.models import memplan

    if not plan.real:
        return None
    try:
        estimate = memplan.estimate(model, shape).as_dict()
    except (ValueError, KeyError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    peak = measured.get("peak_reserved_mb")
    if peak is not None:
        estimate["work_mb_measured"] = round(peak - weights_mb)
        estimate["work_measured_over_estimate"] = round((peak - weights_mb) / max(estimate["work_mb"], 1), 3)
    return estimate


# -- building models -----------------------------------------------------------------------


def scaled_init(module: torch.nn.Module, gain: float = 0.5) -> None:
    """Re-draw every weight matrix / kernel as N(0, gain / sqrt(fan_in)), biases 0: activations keep
    their scale through a deep random network, so fp16 and bf16 stay finite."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for sub in module.modules():
            weight = getattr(sub, "weight", None)
            if isinstance(sub, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d) \
                    and isinstance(weight, torch.Tensor):
                weight.normal_(0.0, gain / math.sqrt(weight[0].numel()))
                bias = getattr(sub, "bias", None)
                if isinstance(bias, torch.Tensor):
                    bias.zero_()


def build_real(config: str, dtype: torch.dtype, device: torch.device,
               overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """The module of a committed config (``overrides`` replacing some of its keys), random weights,
    built straight on ``device`` in ``dtype``."""
    import torch

    from ourvidz_tasks.models.sizes import class_of, read_config

    cls_name, cfg = class_of(config), {**read_config(config), **(overrides or {})}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if cls_name in ("UNet2DConditionModel", "AutoencoderKL", "AutoencoderKLWan", "WanVACETransformer3DModel",
                            "WanTransformer3DModel"):
                import diffusers

                module: torch.nn.Module = getattr(diffusers, cls_name).from_config(cfg)
                scaled_init(module)
            else:
                import transformers

                model_cls = getattr(transformers, cls_name)
                config_cls = getattr(transformers, model_cls.config_class.__name__)
                module = model_cls(config_cls.from_dict(cfg))  # its own init (std = initializer_range)
    finally:
        torch.set_default_dtype(previous)
    return module.to(device=device, dtype=dtype).eval()


def tiny_folder(family: str) -> Path:
    """The project's tiny model folder of ``family`` (built once into ``OURVIDZ_TINY_CACHE``)."""
    from ourvidz_tasks.models import build_once

    cache = Path(os.environ.get("OURVIDZ_TINY_CACHE") or Path(tempfile.gettempdir()) / "ourvidz-tiny")
    if family == "sdxl":
        from ourvidz_tasks.models.sdxl import build_tiny as sdxl_tiny

        return build_once(cache / "sdxl", sdxl_tiny)
    if family == "wan":
        from ourvidz_tasks.models.wan import build_tiny as wan_tiny

        return build_once(cache / "wan", wan_tiny)
    from ourvidz_tasks.models.qwen import build_tiny as qwen_tiny

    return build_once(cache / "qwen_base", lambda dest: qwen_tiny(dest, "qwen_base"))


def load_tiny(family: str, sub: str, cls_name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    import diffusers

    folder = tiny_folder(family)
    module: torch.nn.Module = getattr(diffusers, cls_name).from_pretrained(folder / sub, local_files_only=True)
    return module.to(device=device, dtype=dtype).eval()


def weights_mb(*modules: torch.nn.Module) -> float:
    from ourvidz_tasks.models import module_bytes

    return round(module_bytes(modules) / MB, 1)


def free(device: torch.device) -> None:
    from ourvidz_tasks.models import release_memory

    release_memory(device)
