"""Job payload schemas (CONTRACT.md sections 2 and 3).

:class:`Job` mirrors what the edge function sends: legacy aliases are fields
too, unknown fields are ignored; :class:`ChatRequest` is a chat request.
:func:`parse_job` and :func:`parse_chat` check them; every problem is an
:class:`~ourvidz_tasks.contract.errors.InvalidJob` whose message names the
field, the value and what is allowed. Section 6 (the flat, checked parameters
of each family's run) is :mod:`ourvidz_tasks.contract.params`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidJob
from .names import CHAT_MODELS, CHAT_ROLES
from .settings import Settings

_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

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


def check_range(field: str, value: Number, low: Number, high: Number) -> None:
    """InvalidJob naming ``field`` unless ``value`` is finite and within ``[low, high]``."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidJob(f"`{field}` must be a finite number; got {value}", field=field)
    if not low <= value <= high:
        raise InvalidJob(f"`{field}` must be between {low} and {high}; got {value}", field=field)


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
    check_range("max_tokens", request.max_tokens, 1, 2048)
    check_range("temperature", request.temperature, 0, 2)
    if not 0 < request.top_p <= 1:
        raise InvalidJob(f"`top_p` must be in (0, 1]; got {request.top_p}", field="top_p")
    if request.seed is not None:
        check_range("seed", request.seed, 0, 2**63 - 1)
    if request.id is not None and not _ID.match(request.id):
        raise InvalidJob("`id` must be 1-128 characters of [A-Za-z0-9_-]", field="id")
    return request
