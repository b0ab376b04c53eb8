"""What the two diffusers families (SDXL, WAN) share: step callbacks, reference images, run arguments, quiet loads."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    from PIL import Image

#: Called by pipelines after each denoising step as ``on_step(step, total)``.
#: It may raise (cancel, time limit) to stop the pipeline at that step.
StepCallback = Callable[[int, int], None]


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """The reference policy of every family: upright (EXIF), RGB, scaled to cover
    ``width`` x ``height`` and center-cropped to exactly that."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(image) or image
    return ImageOps.fit(upright.convert("RGB"), (width, height), method=PILImage.Resampling.LANCZOS)


def step_callback(on_step: StepCallback | None,
                  on_latents: Callable[[int, int, Any], None] | None = None) -> Callable[..., dict[str, object]]:
    """diffusers' ``callback_on_step_end`` calling ``on_step(step, total)`` (exceptions propagate),
    then ``on_latents(step, total, latents)`` (a live preview; the pipeline must be asked for
    ``callback_on_step_end_tensor_inputs=["latents"]``). Both only read: the latents go back unchanged."""

    def callback(pipe: object, step_index: int, timestep: object, callback_kwargs: dict[str, object]) -> dict[str, object]:
        step, total = step_index + 1, int(getattr(pipe, "num_timesteps", 0) or 0)
        if on_step is not None:
            on_step(step, total)
        if on_latents is not None and "latents" in callback_kwargs:
            on_latents(step, total, callback_kwargs["latents"])
        return callback_kwargs

    return callback


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence diffusers' and transformers' load/save progress bars, restoring their state after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = []
    for library in (diffusers_logging, transformers_logging):
        if library.is_progress_bar_enabled():
            library.disable_progress_bar()
            restore.append(library)
    try:
        yield
    finally:
        for library in restore:
            library.enable_progress_bar()


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_seed(value: object) -> bool:
    """An integer seed a ``torch.Generator`` takes: in [0, 2**64)."""
    return is_int(value) and 0 <= value < 2**64


def check_run_args(*, width: object, height: object, multiple: int, steps: object, guidance_scale: object) -> None:
    """``ValueError`` naming the first bad one of the arguments every diffusion family takes
    (never echoing a prompt): sizes are positive multiples of ``multiple``, ``steps`` a positive
    integer, ``guidance_scale`` a finite number >= 0."""
    for name, value in (("width", width), ("height", height)):
        if not is_int(value) or value < multiple or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, (int, float))
        or not math.isfinite(guidance_scale)
        or guidance_scale < 0
    ):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
