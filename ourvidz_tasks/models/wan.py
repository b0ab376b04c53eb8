"""WAN 2.1 text-to-video, with VACE conditioning on reference images and frames.

Two checkpoint kinds are served through diffusers:

* ``vace``: :class:`~diffusers.WanVACEPipeline` (e.g. ``Wan2.1-VACE-1.3B``). It
  generates from text alone and can also be conditioned on a subject/style
  reference image or on a first and/or last frame.
* ``t2v``: :class:`~diffusers.WanPipeline` (e.g. ``Wan2.1-T2V-1.3B``), text
  only; any reference mode is refused so the caller can fall back.

:func:`~ourvidz_tasks.models.tiny.wan.build_tiny` writes a random-weight WAN
2.1 VACE folder (offline, seconds) that :func:`load_wan` reads through the
same ``from_pretrained`` path as real weights. Nothing here holds a model at
module level: a :class:`WanModel` is owned by whoever loaded it. numpy and PIL,
like torch, are imported where they are used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from ..contract.errors import ConfigError, ModelLoadError
from . import brief_error, build_once, compute_dtype, module_bytes, release_memory
from .diffusion import StepCallback, check_run_args, fit_image, is_int, is_seed, quiet_progress, step_callback
from .previews import LatentsHook
from .tiny.wan import build_tiny

if TYPE_CHECKING:
    import numpy as np
    import PIL.Image
    import torch
    from diffusers import DiffusionPipeline

    from ..contract.settings import Settings

#: How a VACE run is conditioned on images (``none`` is plain text-to-video).
ReferenceMode = Literal["none", "single", "start", "end", "both"]
WanKind = Literal["vace", "t2v"]

_REFERENCE_MODES: tuple[str, ...] = get_args(ReferenceMode)
#: WAN 2.1's VAE packs 4 frames per latent frame after the first: clips are 4k+1 long.
_TEMPORAL_FACTOR = 4
#: model_index.json ``_class_name`` -> kind
_PIPELINE_KINDS: dict[str, WanKind] = {"WanVACEPipeline": "vace", "WanPipeline": "t2v"}
#: Gray of the frames VACE has to generate, as in diffusers' first-last-frame example.
_GRAY = (128, 128, 128)
#: Components counted by :meth:`WanModel.nbytes` and dropped by :meth:`WanModel.unload`.
_WEIGHTS = ("transformer", "transformer_2", "vae", "text_encoder")
_COMPONENTS = (*_WEIGHTS, "tokenizer", "scheduler")


@dataclass
class WanModel:
    """A loaded WAN pipeline and what it was loaded as."""

    pipe: DiffusionPipeline
    kind: WanKind
    device: torch.device
    dtype: torch.dtype
    source: str
    #: the live previews' tiny video decoder (TAEHV's); None: previews are off
    preview: torch.nn.Module | None = None

    @property
    def conditions_on_frames(self) -> bool:
        """True when reference images and first/last frames really condition the clip."""
        return self.kind == "vace"

    def nbytes(self) -> int:
        """Bytes of the weights held (transformer(s), VAE, text encoder, preview decoder)."""
        return module_bytes([*(getattr(self.pipe, name, None) for name in _WEIGHTS), self.preview])

    def unload(self) -> int:
        """Drop the pipeline's components and hand memory back; returns the bytes freed.

        The :class:`WanModel` stays as an empty shell: :func:`run_wan` on it
        raises :class:`ModelLoadError`; a second ``unload`` returns 0.
        """
        freed = self.nbytes()
        for name in _COMPONENTS:
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        self.preview = None
        release_memory(self.device)
        return freed


# -- loading -------------------------------------------------------------------


def load_wan(settings: Settings, device: torch.device) -> WanModel:
    """Load the WAN checkpoint the settings name onto ``device``.

    ``model_source=tiny`` builds the tiny VACE folder once under
    ``tiny_cache/wan``; ``local`` reads ``OURVIDZ_WAN_MODEL``. Both then go
    through the same loader: kind from ``OURVIDZ_WAN_KIND`` (``auto`` reads
    ``model_index.json``), bf16 on CUDA with the VAE in float32, float32 on
    CPU, local files only, progress bar off.

    Raises :class:`ConfigError` when ``OURVIDZ_WAN_MODEL`` is unset or not a
    folder, :class:`ModelLoadError` when the checkpoint cannot be loaded.
    """
    if settings.model_source == "tiny":
        try:
            folder = build_once(settings.tiny_cache / "wan", build_tiny)
        except Exception as exc:
            raise ModelLoadError(f"tiny WAN model could not be built: {brief_error(exc)}") from exc
        source = f"tiny:{folder}"
    else:
        if settings.wan_model is None:
            raise ConfigError("OURVIDZ_WAN_MODEL is not set (needed when OURVIDZ_MODEL_SOURCE=local)")
        folder = Path(settings.wan_model)
        if not folder.is_dir():
            raise ConfigError(f"OURVIDZ_WAN_MODEL: {folder} is not a directory")
        source = f"local:{folder}"
    model = _load_folder(folder, settings.wan_kind, device, source)
    from .taehv import load_preview  # torch at import: only here

    model.preview = load_preview(settings, device, model.dtype)
    return model


def _detect_kind(folder: Path) -> WanKind:
    """The kind named by ``model_index.json``'s ``_class_name``."""
    index = folder / "model_index.json"
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index} is missing or unreadable: {brief_error(exc)}") from exc
    kind = _PIPELINE_KINDS.get(class_name)
    if kind is None:
        known = ", ".join(_PIPELINE_KINDS)
        raise ModelLoadError(f"{index}: pipeline {class_name!r} is not one of {known}")
    return kind


def _load_folder(folder: Path, wanted: Literal["auto", "vace", "t2v"], device: torch.device, source: str) -> WanModel:
    """Load a diffusers WAN folder as ``wanted`` (or its own kind) onto ``device``."""
    import torch
    from diffusers import WanPipeline, WanTransformer3DModel, WanVACEPipeline, WanVACETransformer3DModel

    kind: WanKind = _detect_kind(folder) if wanted == "auto" else wanted
    pipeline_class = WanVACEPipeline if kind == "vace" else WanPipeline
    dtype = compute_dtype(device)
    try:
        with quiet_progress():
            pipe = pipeline_class.from_pretrained(
                str(folder), dtype={"default": dtype, "vae": torch.float32}, local_files_only=True
            )
        pipe.to(device)
    except Exception as exc:
        raise ModelLoadError(f"WAN {kind} checkpoint {folder} could not be loaded: {brief_error(exc)}") from exc
    transformer = pipe.transformer
    is_vace = isinstance(transformer, WanVACETransformer3DModel)
    if (kind == "vace") != is_vace or not isinstance(transformer, (WanTransformer3DModel, WanVACETransformer3DModel)):
        found = type(transformer).__name__
        del pipe
        release_memory(device)
        raise ModelLoadError(f"OURVIDZ_WAN_KIND={wanted}: {folder} holds a {found}, not a {kind} transformer")
    pipe.set_progress_bar_config(disable=True)
    return WanModel(pipe=pipe, kind=kind, device=device, dtype=dtype, source=source)


# -- running -------------------------------------------------------------------


def valid_frame_count(requested: int) -> int:
    """The longest clip WAN can make that is not longer than ``requested``: 4k+1, at least 1.

    83 -> 81, 81 -> 81, 4 -> 1, 1 -> 1; below 1 raises ``ValueError``.
    """
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"num_frames must be a positive integer, got {requested!r}")
    return (requested - 1) // _TEMPORAL_FACTOR * _TEMPORAL_FACTOR + 1


def run_wan(
    model: WanModel,
    *,
    prompt: str,
    negative_prompt: str | None,
    width: int,
    height: int,
    num_frames: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    reference_mode: ReferenceMode = "none",
    reference: PIL.Image.Image | None = None,
    first_frame: PIL.Image.Image | None = None,
    last_frame: PIL.Image.Image | None = None,
    on_step: StepCallback | None = None,
    on_latents: LatentsHook | None = None,
    shift: float | None = None,
    on_conditioning: Callable[[dict[str, Any]], None] | None = None,
) -> np.ndarray:
    """Generate one clip; returns uint8 frames shaped ``(num_frames, height, width, 3)``.

    ``shift`` is the flow-matching schedule's shift (Wan's ``sample_shift``);
    None keeps the checkpoint's. The pipeline hands back a tensor that is
    turned into uint8 once, on the model's device, and copied out once.
    ``on_conditioning`` receives :func:`describe_conditioning` of exactly what
    the pipeline is given (for the job's metadata).

    ``reference_mode`` (VACE checkpoints only; ``t2v`` refuses all but ``none``
    with a ``ValueError`` starting ``reference_mode``):

    * ``none``: text only.
    * ``single``: ``reference`` is a subject/style image for the whole clip,
      given to VACE as a reference image (not as a frame of the clip).
    * ``start`` / ``end``: ``first_frame`` (``start``) or ``last_frame``
      (``end``) is fixed as the clip's first or last frame and the rest is
      generated; ``reference`` stands in when that frame is not given.
    * ``both``: ``first_frame`` and ``last_frame`` fix both ends (clip >= 5 frames).

    Images a mode does not use are ignored. Every image used is converted to
    RGB (EXIF orientation applied) and scaled to cover ``width`` x ``height``,
    then center-cropped to exactly that size: the aspect ratio is kept and the
    overflow cut evenly from both sides. Frames VACE must generate are gray
    (128) with a white (generate) mask; the given frames get a black (keep) mask.

    ``width``/``height`` must be multiples of 16 and ``num_frames`` already
    4k+1 (see :func:`valid_frame_count`); ``seed`` seeds a CPU generator, so a
    seed gives the same clip on any device of the same kind. ``on_step(i, n)``
    runs after each of the ``n`` denoising steps; what it raises propagates
    and stops the run; then ``on_latents(i, n, latents)`` (a live preview) reads the latents. Bad arguments raise ``ValueError`` naming the argument.
    """
    import torch

    pipe: Any = model.pipe
    if getattr(pipe, "transformer", None) is None:
        raise ModelLoadError("the WAN model was unloaded")
    _check_mode(model, reference_mode)
    _check_args(
        pipe, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
        num_frames=num_frames, steps=steps, guidance_scale=guidance_scale, seed=seed,
    )
    conditioning = _conditioning(
        reference_mode, reference=reference, first_frame=first_frame, last_frame=last_frame,
        width=width, height=height, num_frames=num_frames,
    )
    callback = step_callback(on_step, on_latents) if on_step is not None or on_latents is not None else None
    if shift is not None:
        set_shift(pipe, shift)
    if on_conditioning is not None:
        on_conditioning(describe_conditioning(conditioning))

    output = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance_scale=float(guidance_scale),
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
        callback_on_step_end=callback,
        **conditioning,
    )
    return to_uint8_frames(output.frames[0], (num_frames, height, width, 3))


def to_uint8_frames(video: torch.Tensor, expected: tuple[int, int, int, int]) -> np.ndarray:
    """A ``(frames, 3, H, W)`` tensor in [0, 1] as uint8 ``(frames, H, W, 3)``: one conversion,
    on the tensor's device, then one copy to host memory."""
    import torch

    with torch.inference_mode():
        frames = (video * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        clip: np.ndarray = frames.contiguous().cpu().numpy()
    if clip.shape != expected:
        raise RuntimeError(f"WAN returned frames of shape {clip.shape}, expected {expected}")
    return clip


def image_digest(image: PIL.Image.Image) -> str:
    """A short SHA-256 of an image's RGB pixels and size (what conditioning reports)."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()[:16]


def describe_conditioning(conditioning: dict[str, Any]) -> dict[str, Any]:
    """What VACE is conditioned on: digests of the reference images, and of each frame kept
    as given (black mask) by its index in the clip. Empty for text only."""
    described: dict[str, Any] = {}
    if "reference_images" in conditioning:
        described["reference_images"] = [image_digest(image) for image in conditioning["reference_images"]]
    if "mask" in conditioning:
        video, mask = conditioning["video"], conditioning["mask"]
        described["frames"] = {str(i): image_digest(video[i]) for i, m in enumerate(mask) if m.getextrema() == (0, 0)}
    return described


def set_shift(pipe: Any, shift: float) -> None:
    """Give the pipeline's flow-matching scheduler ``shift`` (UniPC's ``flow_shift``,
    FlowMatchEuler's ``shift``); rebuilt only when it changes."""
    scheduler = pipe.scheduler
    name = "flow_shift" if "flow_shift" in scheduler.config else "shift" if "shift" in scheduler.config else None
    if name is None:
        raise ValueError(f"the scheduler {type(scheduler).__name__} has no flow shift")
    if float(scheduler.config[name]) != float(shift):
        pipe.scheduler = type(scheduler).from_config(scheduler.config, **{name: float(shift)})


def _check_mode(model: WanModel, reference_mode: str) -> None:
    if reference_mode not in _REFERENCE_MODES:
        raise ValueError(f"reference_mode must be one of {', '.join(_REFERENCE_MODES)}, got {reference_mode!r}")
    if reference_mode != "none" and not model.conditions_on_frames:
        raise ValueError(
            f"reference_mode {reference_mode!r} needs a VACE checkpoint; {model.source} is a {model.kind} model"
        )


def _check_args(
    pipe: Any, *, prompt: object, negative_prompt: object, width: object, height: object,
    num_frames: object, steps: object, guidance_scale: object, seed: object,
) -> None:
    """Raise ``ValueError`` naming the first bad argument (never echoing a prompt)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
    base = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
    check_run_args(width=width, height=height, multiple=base, steps=steps, guidance_scale=guidance_scale)
    temporal = pipe.vae_scale_factor_temporal
    if not is_int(num_frames) or num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"num_frames must be {temporal}k+1 (1, 5, ..., 81), got {num_frames!r}")
    if not is_seed(seed):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")


def _conditioning(
    reference_mode: ReferenceMode, *, reference: PIL.Image.Image | None, first_frame: PIL.Image.Image | None,
    last_frame: PIL.Image.Image | None, width: int, height: int, num_frames: int,
) -> dict[str, Any]:
    """The VACE keyword arguments (``reference_images`` or ``video`` + ``mask``) of a mode."""
    if reference_mode == "none":
        return {}
    if reference_mode == "single":
        return {"reference_images": [fit_image(_require("reference", reference, reference_mode), width, height)]}
    first = last = None
    if reference_mode in ("start", "both"):
        image = first_frame if first_frame is not None or reference_mode == "both" else reference
        first = fit_image(_require("first_frame", image, reference_mode), width, height)
    if reference_mode in ("end", "both"):
        image = last_frame if last_frame is not None or reference_mode == "both" else reference
        last = fit_image(_require("last_frame", image, reference_mode), width, height)
    if first is not None and last is not None and num_frames < 5:
        raise ValueError(f"num_frames must be at least 5 for reference_mode 'both', got {num_frames}")

    import PIL.Image

    gray = PIL.Image.new("RGB", (width, height), _GRAY)
    keep = PIL.Image.new("L", (width, height), 0)
    generate = PIL.Image.new("L", (width, height), 255)
    video = [gray] * num_frames
    mask = [generate] * num_frames
    if first is not None:
        video[0], mask[0] = first, keep
    if last is not None:
        video[-1], mask[-1] = last, keep
    return {"video": video, "mask": mask}


def _require(name: str, image: object, reference_mode: str) -> PIL.Image.Image:
    import PIL.Image

    if image is None:
        raise ValueError(f"{name} is required for reference_mode {reference_mode!r}")
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"{name} must be a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{name} is empty ({image.width}x{image.height})")
    return image


