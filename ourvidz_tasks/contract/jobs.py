"""Job payload schemas (CONTRACT.md sections 2, 3 and 6).

:class:`Job` mirrors what the edge function sends: legacy aliases are fields
too, unknown fields are ignored. The per-family ``*_params`` functions apply
section 6's precedence rules and return flat, checked parameters; every
problem is an :class:`~ourvidz_tasks.contract.errors.InvalidJob` whose message names
the field, the value and what is allowed.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidJob
from .settings import Settings
from .steps import MAX_SCHEDULE as MAX_SCHEDULE  # re-exported: the step arithmetic lives in steps.py
from .steps import exact_copy_plan as exact_copy_plan
from .steps import img2img_steps as img2img_steps
from .steps import steps_run_of as steps_run_of
from .steps import strength_for as strength_for

SEED_MODULUS = 2**31
#: exact-copy mode's denoise cap (section 6)
EXACT_COPY_DENOISE = 0.05
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_RESOLUTION = re.compile(r"^\s*(\d{2,5})\s*[x*X]\s*(\d{2,5})\s*$")

SDXL_TYPES = ("sdxl_image_fast", "sdxl_image_high")
WAN_TYPES = (
    "image_fast", "image_high", "video_fast", "video_high",
    "image7b_fast_enhanced", "image7b_high_enhanced",
    "video7b_fast_enhanced", "video7b_high_enhanced",
)
#: seconds each job type may run (``OURVIDZ_TIME_LIMITS`` overrides); all under ``max_job_seconds``
TIME_LIMITS = {
    "sdxl_image_fast": 300, "sdxl_image_high": 600, "image_fast": 600, "image_high": 900,
    "video_fast": 1800, "video_high": 3000, "image7b_fast_enhanced": 600, "image7b_high_enhanced": 900,
    "video7b_fast_enhanced": 1800, "video7b_high_enhanced": 3000,
}
FAMILY_OF_TYPE = {**{t: "sdxl" for t in SDXL_TYPES}, **{t: "wan" for t in WAN_TYPES}}
REFERENCE_MODES = ("none", "single", "start", "end", "both")
#: ``both`` fixes a first and a last frame: the shortest clip with frames between them
MIN_BOTH_FRAMES = 5
#: the old system's ``sample_shift`` (it ran 5.0 at 480x832); ``OURVIDZ_WAN_SHIFT`` overrides per size
DEFAULT_WAN_SHIFT = 5.0
MIN_SHIFT, MAX_SHIFT = 0.1, 50.0
CHAT_MODELS = ("qwen_instruct", "qwen_base")
CHAT_ROLES = ("system", "user", "assistant")

Number = float | int


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class EnhanceSpec(_Loose):
    """``metadata.enhance``: how ``ourvidz.chat.enhance`` should enhance."""

    system_prompt: str | None = None
    model: Literal["qwen_instruct", "qwen_base"] | None = None
    max_tokens: int | None = Field(None, ge=1, le=2048)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)


class JobConfig(_Loose):
    num_images: int | None = None
    num_inference_steps: int | None = None
    steps: int | None = None
    sample_steps: int | None = None
    guidance_scale: Number | None = None
    sample_guide_scale: Number | None = None
    resolution: str | None = None
    size: str | None = None
    seed: int | None = None
    pipeline: str | None = None
    denoise_strength: Number | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    frame_num: int | None = None
    fps: int | None = None
    sample_shift: Number | None = None
    reference_mode: str | None = None
    image: str | None = None
    first_frame: str | None = None
    last_frame: str | None = None
    negative_prompt: str | None = None


class JobMetadata(_Loose):
    reference_image_url: str | None = None
    start_reference_url: str | None = None
    end_reference_url: str | None = None
    reference_strength: Number | None = None
    denoise_strength: Number | None = None
    exact_copy_mode: bool = False
    reference_type: str | None = None
    negative_prompt: str | None = None
    #: read by ``ourvidz.chat.enhance`` only (as :class:`EnhanceSpec`); never fatal to generation
    enhance: Any = None
    original_prompt: str | None = None
    enhanced_prompt: str | None = None
    enhancement_error: str | None = None
    enhancement_source: str | None = None
    enhancement_time: Number | None = None


class Job(_Loose):
    """A job payload as published; aliases resolved by the properties."""

    id: str | None = None
    job_id: str | None = None
    type: str | None = None
    job_type: str | None = None
    user_id: str | None = None
    prompt: str = ""
    negative_prompt: str | None = None
    compel_enabled: bool = False
    compel_weights: str | None = None
    seed: int | None = None
    reference_image_url: str | None = None
    reference_strength: Number | None = None
    original_prompt: str | None = None
    enhanced_prompt: str | None = None
    config: JobConfig = Field(default_factory=JobConfig)
    metadata: JobMetadata = Field(default_factory=JobMetadata)

    @field_validator("config", "metadata", mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        return {} if value is None else value

    @property
    def the_id(self) -> str:
        return self.id or self.job_id or ""

    @property
    def the_type(self) -> str:
        return self.type or self.job_type or ""

    @property
    def family(self) -> str | None:
        return FAMILY_OF_TYPE.get(self.the_type)

    @property
    def is_enhanced(self) -> bool:
        """Enhancement already ran (or failed for good) for this job."""
        return self.metadata.enhanced_prompt is not None or self.metadata.enhancement_error is not None


def usable_id(payload: object) -> str | None:
    """The job id if the payload has one that can become a storage path segment."""
    if not isinstance(payload, dict):
        return None
    for key in ("id", "job_id"):
        value = payload.get(key)
        if value is not None:
            return value if isinstance(value, str) and _ID.match(value) else None
    return None


def parse_job(payload: object, settings: Settings, family: str | None = None) -> Job:
    """Validate a payload as a job of ``family``; InvalidJob names the field."""
    if not isinstance(payload, dict):
        raise InvalidJob(f"the job must be a JSON object, got {type(payload).__name__}", field="job")
    try:
        job = Job.model_validate(payload)
    except ValidationError as exc:
        raise _invalid(exc) from None
    _check_id(job.the_id, "id")
    if job.user_id is None:
        raise InvalidJob("`user_id` is required", field="user_id")
    _check_id(job.user_id, "user_id")
    if not job.the_type:
        raise InvalidJob("`type` is required", field="type")
    if job.family is None:
        allowed = ", ".join(FAMILY_OF_TYPE)
        raise InvalidJob(f"`type` must be one of {allowed}; got {job.the_type!r}", field="type")
    if family is not None and job.family != family:
        raise InvalidJob(
            f"`type` {job.the_type!r} belongs to the {job.family} family, not {family}", field="type"
        )
    if len(job.prompt) > settings.max_prompt_chars:
        raise InvalidJob(
            f"`prompt` must be at most {settings.max_prompt_chars} characters; got {len(job.prompt)}",
            field="prompt",
        )
    return job


def _check_id(value: str, field: str) -> None:
    if not value:
        raise InvalidJob(f"`{field}` is required", field=field)
    if not _ID.match(value):
        raise InvalidJob(f"`{field}` must be 1-128 characters of [A-Za-z0-9_-]", field=field)


_UNION_TAGS = ("float", "int", "str", "bool", "none")


def _invalid(exc: ValidationError) -> InvalidJob:
    first = exc.errors()[0]
    # a union (``float | int``) adds the member's type to the location: not a field
    field = ".".join(str(part) for part in first["loc"] if part not in _UNION_TAGS) or "job"
    got = first.get("input")
    shown = repr(got) if isinstance(got, (int, float, bool)) or (isinstance(got, str) and len(got) < 40) else type(got).__name__
    return InvalidJob(f"`{field}`: {first['msg']}; got {shown}", field=field)


def _first(*candidates: tuple[str, Any]) -> tuple[str, Any]:
    """The first ``(field, value)`` whose value is not None, else ``("", None)``."""
    for name, value in candidates:
        if value is not None:
            return name, value
    return "", None


def _range(field: str, value: Number, low: Number, high: Number) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidJob(f"`{field}` must be a finite number; got {value}", field=field)
    if not low <= value <= high:
        raise InvalidJob(f"`{field}` must be between {low} and {high}; got {value}", field=field)


def _seeds(job: Job, count: int) -> tuple[list[int], bool]:
    """Image i uses ``(seed + i) mod 2^31``; an absent seed is drawn at random."""
    field, seed = _first(("config.seed", job.config.seed), ("seed", job.seed))
    random_seed = seed is None
    if seed is None:
        seed = secrets.randbelow(SEED_MODULUS)
    _range(field, seed, 0, SEED_MODULUS - 1)
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
    _range(field, steps, 1, 150)
    return field, int(steps)


def _guidance(job: Job, default: float) -> float:
    field, value = _first(
        ("config.guidance_scale", job.config.guidance_scale),
        ("config.sample_guide_scale", job.config.sample_guide_scale),
    )
    if value is None:
        return default
    _range(field, value, 0, 30)
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
        _range(field, value, low, high)
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
            _range(strength_field, strength, 0, 1)
            denoise, denoise_field = 1 - float(strength), strength_field
    if denoise is not None:
        _range(denoise_field, denoise, 0, 1)
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
        _range(frames_field, requested, 1, 83)
    fps = c.fps if c.fps is not None else settings.wan_fps
    _range("config.fps", fps, 8, 24)
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
    _range("config.sample_shift", value, MIN_SHIFT, MAX_SHIFT)
    return float(value)


# -- chat --------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str


class ChatRequest(BaseModel):
    """Section 3: pure inference on the caller's messages."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    messages: list[ChatMessage]
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    model: str = "qwen_instruct"
    seed: int | None = None


def parse_chat(payload: object, settings: Settings) -> ChatRequest:
    """Validate a chat request; InvalidJob names the field."""
    if not isinstance(payload, dict):
        raise InvalidJob(f"the chat request must be a JSON object, got {type(payload).__name__}", field="request")
    try:
        request = ChatRequest.model_validate(payload)
    except ValidationError as exc:
        raise _invalid(exc) from None
    if not request.messages:
        raise InvalidJob("`messages` must hold at least one message", field="messages")
    if len(request.messages) > settings.max_messages:
        raise InvalidJob(f"`messages` must hold at most {settings.max_messages} messages; got {len(request.messages)}", field="messages")
    total = 0
    for i, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            raise InvalidJob(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}", field=f"messages[{i}].role")
        total += len(message.content)
    if total > settings.max_message_chars:
        raise InvalidJob(
            f"`messages` must hold at most {settings.max_message_chars} characters in all; got {total}", field="messages"
        )
    if request.model not in CHAT_MODELS:
        raise InvalidJob(f"`model` must be one of {', '.join(CHAT_MODELS)}; got {request.model[:40]!r}", field="model")
    _range("max_tokens", request.max_tokens, 1, 2048)
    _range("temperature", request.temperature, 0, 2)
    if not 0 < request.top_p <= 1:
        raise InvalidJob(f"`top_p` must be in (0, 1]; got {request.top_p}", field="top_p")
    if request.seed is not None:
        _range("seed", request.seed, 0, 2**63 - 1)
    if request.id is not None and not _ID.match(request.id):
        raise InvalidJob("`id` must be 1-128 characters of [A-Za-z0-9_-]", field="id")
    return request
