"""The checked-in JSON Schemas (schemas/) and TypeScript types (edge/src/schema.ts) are current."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from devtools import schemas as generator
from ourvidz_tasks.contract import jobs, names, schemas
from ourvidz_tasks.contract.callbacks import callback_body
from ourvidz_tasks.contract.errors import ERROR_CODES
from ourvidz_tasks.contract.schemas import CallbackBody, ChatRequest, ChatResult, Job
from ourvidz_tasks.contract.settings import load_settings

from .support.process import ROOT

CONTRACT_JOB = {
    "id": "8b7d3f7e-0c55-4a3f-9d62-1f0f5a2f7b11", "type": "sdxl_image_fast", "prompt": "text",
    "user_id": "user_123", "negative_prompt": "optional", "compel_enabled": False, "compel_weights": None,
    "config": {
        "num_images": 1, "num_inference_steps": 15, "guidance_scale": 7.5, "resolution": "1024x1024", "seed": 0,
        "pipeline": "txt2img", "denoise_strength": 0.15, "width": 480, "height": 832, "frames": 83, "fps": 16,
        "reference_mode": "none", "image": "url", "first_frame": "url", "last_frame": "url",
    },
    "metadata": {
        "reference_image_url": "url", "start_reference_url": "url", "end_reference_url": "url",
        "reference_strength": 0.85, "denoise_strength": 0.15, "exact_copy_mode": False, "reference_type": "style",
        "enhance": {"system_prompt": "...", "model": "qwen_instruct", "max_tokens": 200, "temperature": 0.7},
    },
}


def test_spelled_out_enums_are_the_constants() -> None:
    assert get_args(schemas.JobType) == (*jobs.SDXL_TYPES, *jobs.WAN_TYPES)
    assert get_args(schemas.ChatRequest.model_fields["model"].annotation) == names.CHAT_MODELS
    assert get_args(schemas.ErrorCode) == tuple(ERROR_CODES)
    assert get_args(schemas.ChatMessage.model_fields["role"].annotation) == names.CHAT_ROLES
    modes = schemas.JobConfig.model_fields["reference_mode"].annotation
    assert get_args(get_args(modes)[0]) == jobs.REFERENCE_MODES


def test_checked_in_files_are_current() -> None:
    stale = [str(rel) for rel, text in generator.rendered().items()
             if not (ROOT / rel).exists() or (ROOT / rel).read_text() != text]
    assert not stale, f"stale: {stale}; run .venv/bin/python -m devtools.schemas"
    assert generator.main(["--check"]) == 0


def test_check_reports_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generator.main(["--check", "--root", str(tmp_path)]) == 1
    assert "schemas/job.schema.json" in capsys.readouterr().err
    assert generator.main(["--root", str(tmp_path)]) == 0
    assert generator.main(["--check", "--root", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "schemas" / "callback.schema.json").read_text())["title"] == "CallbackBody"


def _interfaces(source: str) -> dict[str, dict[str, bool]]:
    """``interface name → {property: required}`` of the generated TypeScript."""
    out: dict[str, dict[str, bool]] = {}
    for name, body in re.findall(r"export interface (\w+) \{\n(.*?)\n\}", source, re.S):
        props = re.findall(r"^  (\w+)(\??): ", body, re.M)
        out[name] = {prop: not optional for prop, optional in props}
    return out


def _definitions() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for model in generator.MODELS.values():
        schema = json.loads((ROOT / "schemas" / f"{_stem(model)}.schema.json").read_text())
        found.update(schema.pop("$defs", {}))
        found[schema["title"]] = schema
    return found


def _stem(model: type) -> str:
    return next(stem for stem, m in generator.MODELS.items() if m is model)


def test_typescript_types_match_the_schemas() -> None:
    source = (ROOT / "edge" / "src" / "schema.ts").read_text()
    interfaces = _interfaces(source)
    definitions = _definitions()
    assert set(interfaces) == set(definitions)
    for name, definition in definitions.items():
        required = set(definition.get("required", []))
        expected = {prop: prop in required for prop in definition["properties"]}
        assert interfaces[name] == expected, name
    assert json.dumps(list(jobs.SDXL_TYPES)) in source and json.dumps(list(jobs.WAN_TYPES)) in source
    assert "ID_PATTERN = /^[A-Za-z0-9_-]{1,128}$/" in source


def test_job_schema_is_the_contract() -> None:
    schema = generator.schema_of(Job)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["required"]) == {"id", "type", "user_id"}
    assert schema["properties"]["type"]["enum"] == [*jobs.SDXL_TYPES, *jobs.WAN_TYPES]
    assert schema["properties"]["job_id"]["deprecated"] is True
    Job.model_validate(CONTRACT_JOB)
    jobs.parse_job(CONTRACT_JOB, load_settings())
    for bad in ({"id": "a b"}, {"type": "sdxl_video"}, {"user_id": None}, {"config": {"num_images": 2}}):
        with pytest.raises(ValidationError):
            Job.model_validate({**CONTRACT_JOB, **bad})


def test_chat_schemas() -> None:
    ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "sfw_mode": True})
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"messages": [{"role": "robot", "content": "hi"}]})
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"messages": []})
    ChatResult.model_validate({"response": "blue", "model": "qwen_instruct", "prompt_tokens": 9,
                               "completion_tokens": 1, "finish_reason": "stop", "generation_time": 0.1})


def test_callback_bodies_built_by_delivery_validate() -> None:
    asset = {"type": "image", "url": "workspace-temp/u/j/0.png", "thumbnail_url": "workspace-temp/u/j/0.thumb.webp",
             "metadata": {"width": 64, "height": 64, "format": "png", "file_size_bytes": 10, "asset_index": 0,
                          "seed": 1, "steps": 4, "guidance_scale": 7.5, "denoise_strength": None, "pipeline": "txt2img"}}
    bodies = [
        callback_body("j", "sdxl@h", "processing", attempt=1, metadata={"progress": 50}),
        callback_body("j", "sdxl@h", "completed", attempt=1, assets=[asset], metadata={"processing_time": 1.0}),
        callback_body("j", "sdxl@h", "failed", attempt=2, error={"code": "OOM_ERROR", "message": "m", "retryable": True}),
    ]
    for body in bodies:
        CallbackBody.model_validate(body)
    with pytest.raises(ValidationError):
        CallbackBody.model_validate({**bodies[2], "error": {"code": "NOPE", "message": "m", "retryable": False}})
    schema = generator.schema_of(CallbackBody)
    assert schema["$defs"]["CallbackError"]["properties"]["code"]["enum"] == list(ERROR_CODES)
