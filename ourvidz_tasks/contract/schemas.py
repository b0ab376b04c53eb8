"""The wire types as pydantic models: what a new publisher sends and receives.

:class:`Job` and :class:`ChatRequest` subclass the lenient models of
:mod:`ourvidz_tasks.contract.jobs` (which accept every legacy alias and validate in
``parse_job``) with what a new publisher must send: ``id``, ``type`` and
``user_id`` required, ids matching ``[A-Za-z0-9_-]{1,128}``, the enums of the
contract, and the legacy aliases marked deprecated. The callback models are
the contract's section 4 (and 6): open objects, since workers add metadata.

``python -m devtools.schemas`` (a development tool, not in the wheel) writes the
JSON Schemas in ``schemas/`` and ``edge/src/schema.ts`` from these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import jobs
from .names import ChatModel

ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"

# The enums of the contract, spelled out for the type checkers; tests/test_schemas.py
# holds them equal to the constants of ``jobs`` and ``errors``.
JobType = Literal[
    "sdxl_image_fast", "sdxl_image_high",
    "image_fast", "image_high", "video_fast", "video_high",
    "image7b_fast_enhanced", "image7b_high_enhanced", "video7b_fast_enhanced", "video7b_high_enhanced",
]
ErrorCode = Literal[
    "INVALID_JOB", "INVALID_PROMPT", "OOM_ERROR", "MODEL_LOAD_ERROR", "WORKER_UNAVAILABLE", "TIMEOUT_ERROR",
    "REFERENCE_FRAME_ERROR", "I2I_PIPELINE_ERROR", "THUMBNAIL_GENERATION_ERROR", "CANCELLED",
]


def _legacy(of: str) -> Any:
    """A deprecated alias field (the workers accept it; ``of`` wins when both are present)."""
    return Field(None, deprecated=True, description=f"legacy alias of `{of}` (`{of}` wins when both are given)")


# -- the job payload (section 2) ----------------------------------------------


class EnhanceSpec(jobs.EnhanceSpec):
    """`metadata.enhance`: how `ourvidz.chat.enhance` should enhance (all optional)."""


class JobConfig(jobs.JobConfig):
    """Generation parameters; section 6 of the contract says which field wins."""

    num_images: Literal[1, 3, 6] | None = None
    steps: int | None = _legacy("num_inference_steps")
    pipeline: Literal["txt2img", "img2img", "video"] | None = None
    reference_mode: Literal["none", "single", "start", "end", "both"] | None = None


class JobMetadata(jobs.JobMetadata):
    """References, img2img strength and enhancement options and results."""

    enhance: EnhanceSpec | None = None


class Job(jobs.Job):
    """A generation job: the one argument of `ourvidz.sdxl.generate` and `ourvidz.wan.generate`."""

    id: str = Field(pattern=ID_PATTERN, description="the job id; also a storage path segment")
    type: JobType = Field(description="routes the job: sdxl_* to SDXL, the others to WAN")
    user_id: str = Field(pattern=ID_PATTERN, description="the owner; also a storage path segment")
    job_id: str | None = _legacy("id")
    job_type: str | None = _legacy("type")
    seed: int | None = _legacy("config.seed")
    reference_image_url: str | None = _legacy("metadata.reference_image_url")
    reference_strength: jobs.Number | None = _legacy("metadata.reference_strength")
    original_prompt: str | None = _legacy("metadata.original_prompt")
    enhanced_prompt: str | None = _legacy("metadata.enhanced_prompt")
    config: JobConfig = Field(default_factory=lambda: JobConfig())
    metadata: JobMetadata = Field(default_factory=JobMetadata)


# -- chat (sections 3 and 6) ----------------------------------------------------


class ChatMessage(jobs.ChatMessage):
    """One message of a chat request."""

    role: Literal["system", "user", "assistant"]


class ChatRequest(jobs.ChatRequest):
    """The one argument of `ourvidz.chat.chat`: pure inference on the caller's messages."""

    id: str | None = Field(None, pattern=ID_PATTERN)
    messages: list[ChatMessage] = Field(min_length=1)  # type: ignore[assignment]  # narrower items: fine for a schema
    max_tokens: int = Field(512, ge=1, le=2048)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    model: ChatModel = "qwen_instruct"


class ChatResult(BaseModel):
    """What `ourvidz.chat.chat` returns (its Celery result)."""

    model_config = ConfigDict(extra="allow")

    response: str
    model: ChatModel
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    generation_time: float


# -- the callback body (sections 4 and 6) ---------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class AssetMetadata(_Open):
    """What one asset is; video assets add `frames`, `fps` and `duration`."""

    width: int
    height: int
    format: Literal["png", "mp4"]
    file_size_bytes: int
    asset_index: int
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    denoise_strength: float | None = None
    pipeline: str | None = None
    frames: int | None = None
    fps: int | None = None
    duration: float | None = None


class CallbackAsset(BaseModel):
    """One uploaded output: storage paths relative to the storage API (`bucket/user/job/name`)."""

    type: Literal["image", "video"]
    url: str
    thumbnail_url: str | None
    metadata: AssetMetadata


class Preview(BaseModel):
    """A live preview of a running job (a `processing` callback's `metadata.preview`).

    One storage key per job, overwritten by each newer preview (`index` grows, so a
    client fetching `url?v={index}` never sees a cached older one); never an asset.
    """

    url: str = Field(description="storage path relative to the storage API: `bucket/user/job/preview.webp`")
    step: int = Field(ge=1, description="the denoising step it shows")
    total: int = Field(ge=1, description="the steps of the run")
    index: int = Field(ge=1, description="1 for the job's first preview, then 2, 3, ...")
    width: int = Field(ge=1, le=256)
    height: int = Field(ge=1, le=256)
    frames: int | None = Field(None, ge=1, description="an animated WEBP's frames (video jobs)")


class CallbackMetadata(_Open):
    """Job-level metadata; `callback_id` repeats only when the same callback is re-sent."""

    callback_id: str
    attempt: int = Field(ge=1)
    progress: int | None = Field(None, ge=0, le=100)
    preview: Preview | None = Field(None, description="a live preview (processing callbacks only); safe to ignore")
    processing_time: float | None = None
    queue_wait_s: float | None = Field(
        None, ge=0, description="seconds from the job's arrival on its family queue to the start of this attempt "
        "(the first `processing` callback of an attempt and the terminal one; absent when no arrival was recorded)")
    gpu_seconds: float | None = Field(
        None, ge=0, description="the job's model time on the pools, every attempt of it (terminal callbacks)")
    batch_size: int | None = None
    frame_num: int | None = None
    reference_mode: str | None = None
    original_prompt: str | None = None
    enhanced_prompt: str | None = None
    enhancement_error: str | None = None
    fallback: dict[str, Any] | None = None


class CallbackError(BaseModel):
    """Why a job failed."""

    code: ErrorCode
    message: str
    retryable: bool


class CallbackBody(BaseModel):
    """The body POSTed to `/functions/v1/job-callback` (signed with `X-Callback-Signature`)."""

    job_id: str
    worker_id: str
    status: Literal["processing", "completed", "failed"]
    assets: list[CallbackAsset]
    metadata: CallbackMetadata
    error: CallbackError | None = Field(None, description="present only when status is failed")
