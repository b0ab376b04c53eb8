"""Section 6 of the contract: a :class:`~ourvidz_tasks.contract.jobs.Job` as its family's flat, checked parameters.

:func:`sdxl_params` and :func:`wan_params` apply section 6's precedence rules
(which of a value's spellings wins) and ranges; every problem is an
:class:`~ourvidz_tasks.contract.errors.InvalidJob` whose message names the
field, the value and what is allowed. The step arithmetic of img2img and exact
copy is :mod:`ourvidz_tasks.contract.steps`.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InvalidJob
from .jobs import REFERENCE_MODES, Job, check_range
from .settings import Settings
from .steps import exact_copy_plan, img2img_steps

SEED_MODULUS = 2**31
#: exact-copy mode's denoise cap (section 6)
EXACT_COPY_DENOISE = 0.05
_RESOLUTION = re.compile(r"^\s*(\d{2,5})\s*[x*X]\s*(\d{2,5})\s*$")
#: ``both`` fixes a first and a last frame: the shortest clip with frames between them
MIN_BOTH_FRAMES = 5
#: the old system's ``sample_shift`` (it ran 5.0 at 480x832); ``OURVIDZ_WAN_SHIFT`` overrides per size
DEFAULT_WAN_SHIFT = 5.0
MIN_SHIFT, MAX_SHIFT = 0.1, 50.0


def _first(*candidates: tuple[str, Any]) -> tuple[str, Any]:
    """The first ``(field, value)`` whose value is not None, else ``("", None)``."""
    for name, value in candidates:
        if value is not None:
            return name, value
    return "", None


def _seeds(job: Job, count: int) -> tuple[list[int], bool]:
    """Image i uses ``(seed + i) mod 2^31``; an absent seed is drawn at random."""
    field, seed = _first(("config.seed", job.config.seed), ("seed", job.seed))
    random_seed = seed is None
    if seed is None:
        seed = secrets.randbelow(SEED_MODULUS)
    check_range(field, seed, 0, SEED_MODULUS - 1)
    return [(seed + i) % SEED_MODULUS for i in range(count)], random_seed


def _negative(job: Job) -> str | None:
    _, value = _first(
        ("negative_prompt", job.negative_prompt),
        ("config.negative_prompt", job.config.negative_prompt),
        ("metadata.negative_prompt", job.metadata.negative_prompt),
    )
    return value or None


def _steps(job: Job, default: int) -> tuple[str, int]:
    field, steps = _first(
        ("config.num_inference_steps", job.config.num_inference_steps),
        ("config.steps", job.config.steps),
        ("config.sample_steps", job.config.sample_steps),
    )
    if steps is None:
        return "config.num_inference_steps", default
    check_range(field, steps, 1, 150)
    return field, int(steps)


def _guidance(job: Job, default: float) -> float:
    field, value = _first(
        ("config.guidance_scale", job.config.guidance_scale),
        ("config.sample_guide_scale", job.config.sample_guide_scale),
    )
    if value is None:
        return default
    check_range(field, value, 0, 30)
    return float(value)


def _size(job: Job, *, multiple: int, default: tuple[int, int], low: int, high: int, text_field: str) -> tuple[int, int]:
    c = job.config
    if c.width is not None or c.height is not None:
        if c.width is None or c.height is None:
            missing = "config.height" if c.height is None else "config.width"
            raise InvalidJob(f"`{missing}` is required when the other dimension is given", field=missing)
        width, height, wf, hf = c.width, c.height, "config.width", "config.height"
    else:
        text = getattr(c, text_field.split(".")[-1])
        if text is None:
            return default
        match = _RESOLUTION.match(text)
        if not match:
            raise InvalidJob(f"`{text_field}` must look like '1024x1024'; got {text[:40]!r}", field=text_field)
        width, height = int(match[1]), int(match[2])
        wf = hf = text_field
    for field, value in ((wf, width), (hf, height)):
        check_range(field, value, low, high)
        if value % multiple:
            raise InvalidJob(f"`{field}` must be divisible by {multiple}; got {value}", field=field)
    return width, height


# -- SDXL --------------------------------------------------------------------


@dataclass(frozen=True)
class SdxlParams:
    """Everything an SDXL run needs, after section 6's rules."""

    job_id: str
    user_id: str
    job_type: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int  #: schedule length (num_inference_steps)
    steps_run: int  #: denoising steps that actually run
    guidance_scale: float
    seeds: list[int]
    seed_was_random: bool
    pipeline: Literal["txt2img", "img2img"]
    reference: str | None
    reference_field: str | None
    denoise_strength: float | None
    exact_copy: bool
    steps_raised: bool
    compel: bool
    compel_weights: str | None

    @property
    def num_images(self) -> int:
        return len(self.seeds)


def sdxl_params(job: Job, settings: Settings) -> SdxlParams:
    """Section 6 for SDXL: sizes, steps, seeds, img2img modes."""
    c, m = job.config, job.metadata
    count = c.num_images if c.num_images is not None else 1
    if count not in (1, 3, 6):
        raise InvalidJob(f"`config.num_images` must be one of 1, 3, 6; got {count}", field="config.num_images")
    width, height = _size(job, multiple=8, default=(1024, 1024), low=64, high=2048, text_field="config.resolution")
    default_steps = settings.sdxl_high_steps if job.the_type.endswith("_high") else settings.sdxl_fast_steps
    _, steps = _steps(job, default_steps)
    guidance = _guidance(job, settings.sdxl_guidance)
    seeds, random_seed = _seeds(job, count)
    negative = _negative(job)

    ref_field, reference = _first(
        ("config.image", c.image),
        ("metadata.reference_image_url", m.reference_image_url),
        ("reference_image_url", job.reference_image_url),
    )
    reference = reference or None
    denoise_field, denoise = _first(
        ("config.denoise_strength", c.denoise_strength),
        ("metadata.denoise_strength", m.denoise_strength),
    )
    if denoise is None:
        strength_field, strength = _first(
            ("metadata.reference_strength", m.reference_strength),
            ("reference_strength", job.reference_strength),
        )
        if strength is not None:
            check_range(strength_field, strength, 0, 1)
            denoise, denoise_field = 1 - float(strength), strength_field
    if denoise is not None:
        check_range(denoise_field, denoise, 0, 1)
    if c.pipeline is not None and c.pipeline not in ("txt2img", "img2img"):
        raise InvalidJob(f"`config.pipeline` must be txt2img or img2img for SDXL; got {c.pipeline[:40]!r}", field="config.pipeline")

    # exact copy is img2img by definition: without a usable reference it fails (sdxl._reference)
    exact = bool(m.exact_copy_mode) and not job.prompt.strip()
    wants_i2i = exact or c.pipeline == "img2img" or (reference is not None and c.pipeline != "txt2img")
    steps_run, raised = steps, False
    if not wants_i2i:
        return SdxlParams(
            job.the_id, job.user_id or "", job.the_type, job.prompt, negative, width, height, steps, steps,
            guidance, seeds, random_seed, "txt2img", None, None, None, False, False,
            job.compel_enabled, job.compel_weights,
        )
    if exact:
        denoise = min(float(denoise) if denoise is not None else EXACT_COPY_DENOISE, EXACT_COPY_DENOISE)
        if denoise <= 0:
            denoise = EXACT_COPY_DENOISE
        steps_run = min(max(steps, 6), 10)
        steps, denoise = exact_copy_plan(steps_run, denoise)
        guidance, negative = 1.0, None
    else:
        denoise = float(denoise) if denoise is not None else settings.sdxl_denoise
        denoise, steps_run, raised = img2img_steps(steps, denoise)
    return SdxlParams(
        job.the_id, job.user_id or "", job.the_type, job.prompt, negative, width, height, steps, steps_run,
        guidance, seeds, random_seed, "img2img", reference, ref_field or None, denoise, exact, raised,
        job.compel_enabled, job.compel_weights,
    )


# -- WAN ---------------------------------------------------------------------


@dataclass(frozen=True)
class WanParams:
    """Everything a WAN run needs, after section 6's rules."""

    job_id: str
    user_id: str
    job_type: str
    prompt: str
    negative_prompt: str | None
    output: Literal["image", "video"]
    width: int
    height: int
    frames: int  #: the real count, 4k+1
    frames_requested: int
    fps: int
    steps: int
    guidance_scale: float
    seed: int
    seed_was_random: bool
    reference_mode: Literal["none", "single", "start", "end", "both"]
    references: dict[str, tuple[str, str]]  #: role ("single"/"first"/"last") → (field, url)
    enhanced_type: bool
    shift: float  #: the flow-matching schedule's shift (``config.sample_shift``, else per resolution)


def frame_count(requested: int) -> int:
    """Round down to the nearest 4k+1 that Wan can generate (83 → 81)."""
    return ((requested - 1) // 4) * 4 + 1


def wan_params(job: Job, settings: Settings) -> WanParams:
    """Section 6 for WAN: sizes, frames, fps, reference frames."""
    c, m = job.config, job.metadata
    kind = job.the_type
    output: Literal["image", "video"] = "video" if kind.startswith("video") else "image"
    high = "_high" in kind
    width, height = _size(
        job, multiple=16, default=(settings.wan_width, settings.wan_height), low=16, high=1280, text_field="config.size"
    )
    _, steps = _steps(job, settings.wan_high_steps if high else settings.wan_fast_steps)
    guidance = _guidance(job, settings.wan_guidance)
    frames_field, requested = _first(("config.frames", c.frames), ("config.frame_num", c.frame_num))
    if output == "image":
        requested = 1
    elif requested is None:
        requested = settings.wan_frames
    else:
        check_range(frames_field, requested, 1, 83)
    fps = c.fps if c.fps is not None else settings.wan_fps
    check_range("config.fps", fps, 8, 24)
    (seed,), random_seed = _seeds(job, 1)

    single = _first(("config.image", c.image), ("metadata.reference_image_url", m.reference_image_url),
                    ("reference_image_url", job.reference_image_url))
    first = _first(("config.first_frame", c.first_frame), ("metadata.start_reference_url", m.start_reference_url))
    last = _first(("config.last_frame", c.last_frame), ("metadata.end_reference_url", m.end_reference_url))
    mode = c.reference_mode
    if mode is None:
        mode = "both" if first[1] and last[1] else "start" if first[1] else "end" if last[1] else "single" if single[1] else "none"
    if mode not in REFERENCE_MODES:
        raise InvalidJob(
            f"`config.reference_mode` must be one of {', '.join(REFERENCE_MODES)}; got {mode[:40]!r}",
            field="config.reference_mode",
        )
    frames = frame_count(requested)
    if mode == "both" and output == "image":
        raise InvalidJob(
            f"`config.reference_mode` 'both' needs a video type of at least {MIN_BOTH_FRAMES} frames "
            f"(`config.frames`); {kind!r} makes one frame", field="config.reference_mode"
        )
    if mode == "both" and frames < MIN_BOTH_FRAMES:
        field = frames_field or "config.frames"
        raise InvalidJob(
            f"`{field}` must give at least {MIN_BOTH_FRAMES} frames after rounding down to 4k+1 for "
            f"reference_mode 'both' (a first and a last frame); got {requested} → {frames}", field=field
        )
    needed = {"none": (), "single": ("single",), "start": ("first",), "end": ("last",), "both": ("first", "last")}[mode]
    names = {"single": ("config.image", single), "first": ("config.first_frame", first), "last": ("config.last_frame", last)}
    references: dict[str, tuple[str, str]] = {}
    for role in needed:
        default_field, (field, url) = names[role]
        if not url:
            raise InvalidJob(f"`{default_field}` is required when reference_mode is {mode!r}", field=default_field)
        references[role] = (field, url)
    return WanParams(
        job.the_id, job.user_id or "", kind, job.prompt, _negative(job), output, width, height,
        frames, requested, fps, steps, guidance, seed, random_seed,
        mode,  # type: ignore[arg-type]
        references, kind.endswith("_enhanced"), _shift(job, settings, width, height),
    )


def wan_shift(settings: Settings, width: int, height: int) -> float:
    """The default flow shift of a WAN size: ``OURVIDZ_WAN_SHIFT``'s ``WxH`` entry (either
    orientation), else its ``*`` entry."""
    table = settings.wan_shift
    for key in (f"{width}x{height}", f"{height}x{width}", "*"):
        if key in table:
            return float(table[key])
    return DEFAULT_WAN_SHIFT


def _shift(job: Job, settings: Settings, width: int, height: int) -> float:
    value = job.config.sample_shift
    if value is None:
        return wan_shift(settings, width, height)
    check_range("config.sample_shift", value, MIN_SHIFT, MAX_SHIFT)
    return float(value)
