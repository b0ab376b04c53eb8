"""JSON Schemas of what crosses the wire, generated from the pydantic models.

``python -m ourvidz_tasks.contract.schemas`` writes, from the models below:

- ``schemas/job.schema.json``: the job payload (CONTRACT.md section 2);
- ``schemas/chat-request.schema.json`` and ``schemas/chat-result.schema.json``
  (sections 3 and 6);
- ``schemas/callback.schema.json``: the callback body (section 4);
- ``edge/src/schema.ts``: the same types for the TypeScript publisher, plus the
  job types and the id pattern as constants.

``--check`` writes nothing and exits 1 when a checked-in file is stale.

:class:`Job` and :class:`ChatRequest` subclass the lenient models of
:mod:`ourvidz_tasks.contract.jobs` (which accept every legacy alias and validate in
``parse_job``) with what a new publisher must send: ``id``, ``type`` and
``user_id`` required, ids matching ``[A-Za-z0-9_-]{1,128}``, the enums of the
contract, and the legacy aliases marked deprecated. The callback models are
the contract's section 4 (and 6): open objects, since workers add metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import jobs

ROOT = Path(__file__).resolve().parents[2]
ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"

# The enums of the contract, spelled out for the type checkers; tests/test_schemas.py
# holds them equal to the constants of ``jobs`` and ``errors``.
JobType = Literal[
    "sdxl_image_fast", "sdxl_image_high",
    "image_fast", "image_high", "video_fast", "video_high",
    "image7b_fast_enhanced", "image7b_high_enhanced", "video7b_fast_enhanced", "video7b_high_enhanced",
]
ChatModel = Literal["qwen_instruct", "qwen_base"]
ErrorCode = Literal[
    "INVALID_JOB", "INVALID_PROMPT", "OOM_ERROR", "MODEL_LOAD_ERROR", "WORKER_UNAVAILABLE", "TIMEOUT_ERROR",
    "REFERENCE_FRAME_ERROR", "I2I_PIPELINE_ERROR", "THUMBNAIL_GENERATION_ERROR", "CANCELLED",
]
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


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


class CallbackMetadata(_Open):
    """Job-level metadata; `callback_id` repeats only when the same callback is re-sent."""

    callback_id: str
    attempt: int = Field(ge=1)
    progress: int | None = Field(None, ge=0, le=100)
    processing_time: float | None = None
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


#: file stem → model
MODELS: dict[str, type[BaseModel]] = {
    "job": Job,
    "chat-request": ChatRequest,
    "chat-result": ChatResult,
    "callback": CallbackBody,
}


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema (2020-12) of ``model``: what a publisher sends or receives."""
    schema = model.model_json_schema(mode="validation")
    return {"$schema": SCHEMA_DIALECT, **schema}


# -- TypeScript ----------------------------------------------------------------


def _literal(value: Any) -> str:
    return json.dumps(value)


def _ts_type(node: dict[str, Any]) -> str:
    """The TypeScript type of one JSON Schema node (the subset pydantic emits)."""
    if "$ref" in node:
        return str(node["$ref"]).rsplit("/", 1)[-1]
    if "enum" in node:
        return " | ".join(_literal(v) for v in node["enum"])
    if "const" in node:
        return _literal(node["const"])
    if "anyOf" in node:
        parts: list[str] = []
        for option in node["anyOf"]:
            part = _ts_type(option)
            if part not in parts:
                parts.append(part)
        return " | ".join(parts)
    kind = node.get("type")
    if kind == "array":
        inner = _ts_type(node.get("items", {}))
        return f"({inner})[]" if " " in inner else f"{inner}[]"
    if kind == "object":
        extra = node.get("additionalProperties", True)
        value = "unknown" if extra is True or extra == {} else _ts_type(extra)
        return f"Record<string, {value}>"
    return {"string": "string", "integer": "number", "number": "number", "boolean": "boolean", "null": "null"}.get(
        str(kind), "unknown"
    )


def _doc(lines: list[str], indent: str) -> list[str]:
    lines = [line for line in lines if line]
    if not lines:
        return []
    if len(lines) == 1:
        return [f"{indent}/** {lines[0]} */"]
    return [f"{indent}/**", *(f"{indent} * {line}" for line in lines), f"{indent} */"]


def _interface(name: str, node: dict[str, Any]) -> list[str]:
    out = _doc([node.get("description", "").replace("\n", " ")], "")
    out.append(f"export interface {name} {{")
    required = set(node.get("required", []))
    for prop, spec in node.get("properties", {}).items():
        notes = [spec.get("description", "")]
        if spec.get("deprecated"):
            notes.append("@deprecated")
        out += _doc(notes, "  ")
        optional = "" if prop in required else "?"
        out.append(f"  {prop}{optional}: {_ts_type(spec)};")
    if node.get("additionalProperties") is True:
        out.append("  [key: string]: unknown;")
    out.append("}")
    return out


def typescript() -> str:
    """``edge/src/schema.ts``: interfaces for every model, and the routing constants."""
    definitions: dict[str, dict[str, Any]] = {}
    for model in MODELS.values():
        schema = model.model_json_schema(mode="validation")
        for name, node in schema.pop("$defs", {}).items():
            definitions.setdefault(name, node)
        definitions[str(schema["title"])] = schema
    lines = [
        "// Generated by `python -m ourvidz_tasks.contract.schemas` from the pydantic models; do not edit.",
        "// The JSON Schemas of the same types are in schemas/ at the repository root.",
        "",
        f"export const SDXL_TYPES = {json.dumps(list(jobs.SDXL_TYPES))} as const;",
        f"export const WAN_TYPES = {json.dumps(list(jobs.WAN_TYPES))} as const;",
        "export type JobType = (typeof SDXL_TYPES)[number] | (typeof WAN_TYPES)[number];",
        f"export const ID_PATTERN = /{ID_PATTERN}/;",
    ]
    for name in sorted(definitions):
        lines += ["", *_interface(name, definitions[name])]
    return "\n".join(lines) + "\n"


# -- files -----------------------------------------------------------------------


def rendered() -> dict[Path, str]:
    """Every generated file (relative to the repository root) and its text."""
    files = {
        Path("schemas") / f"{stem}.schema.json": json.dumps(schema_of(model), indent=2, ensure_ascii=False) + "\n"
        for stem, model in MODELS.items()
    }
    files[Path("edge") / "src" / "schema.ts"] = typescript()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ourvidz_tasks.contract.schemas", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in rendered().items():
        path = args.root / rel
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(str(rel))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print(f"stale: {', '.join(stale)} (run python -m ourvidz_tasks.contract.schemas)", file=sys.stderr)
        return 1
    for name in stale:
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
