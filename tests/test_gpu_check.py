"""``bin/gpu-check`` without CUDA: every section runs on the tiny models and exits 0, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .support.env import TINY_CACHE
from .support.process import ROOT


@pytest.mark.slow
def test_gpu_check_runs_every_section_without_cuda_and_without_the_broker_stack(tmp_path: Path) -> None:
    # the check needs only torch, diffusers and transformers: make the worker stack unimportable
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("celery", "kombu", "redis", "pydantic_settings"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('gpu-check must not need {name}')\n")
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(blocked), "OURVIDZ_TINY_CACHE": str(TINY_CACHE), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([str(ROOT / "bin" / "gpu-check"), "--out", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["card"] == "cpu" and report["real_sizes"] is False and report["finished"]
    sections = report["sections"]
    assert list(sections) == ["sdxl", "oom", "wan", "qwen"]
    assert not [name for name, s in sections.items() if "error" in s]
    assert [s["shape"] for s in sections["sdxl"]["shapes"]] == ["64x64x1", "64x64x6"]
    for shape in sections["sdxl"]["shapes"]:
        assert shape["unet_it_s"] > 0 and shape["output"]["ok"], shape
    # the emulated cap fits one image: the workers' step-down path ran 6 -> 3 -> 1
    assert sections["oom"]["emulated"] is True
    assert sections["oom"]["step_down"] == {"failed": ["batch:6", "batch:3"], "batch": 1, "remedy": "batch"}
    assert sections["wan"]["frames_decoded"] == 5 and sections["wan"]["output"]["ok"]
    assert [s["batch"] for s in sections["qwen"]["shapes"]] == [1, 8]
    assert all(s["tok_s"] > 0 and s["output"]["finite"] for s in sections["qwen"]["shapes"])
    assert "cpu: 4 section(s) ok" in done.stdout


def test_a_cut_off_run_keeps_the_sections_it_finished(tmp_path: Path) -> None:
    """The JSON is rewritten after every section: what finished is there even if the run stops."""
    from ourvidz_tasks.tools.gpucheck import Report

    path = tmp_path / "r.json"
    report = Report(path, {"card": "x"})
    report.add("sdxl", {"seconds": 1})
    assert json.loads(path.read_text())["sections"] == {"sdxl": {"seconds": 1}}
    report.add("oom", {"error": "OutOfMemoryError"})
    assert list(json.loads(path.read_text())["sections"]) == ["sdxl", "oom"]
    assert not list(Path(tmp_path).glob("*.tmp"))


@pytest.mark.parametrize(("config", "dtype", "params"), [
    ("sdxl_unet.json", "float16", 2.567e9), ("sdxl_vae.json", "float16", 83.7e6),
    ("wan_vace_1_3b_transformer.json", "bfloat16", 2.15e9), ("wan_vae.json", "float32", 127e6),
    ("qwen2_5_7b.json", "bfloat16", 7.62e9),
])
def test_full_size_models_build_from_the_committed_configs(config: str, dtype: str, params: float) -> None:
    """What the check builds on CUDA, built here on the meta device: the class, the dtype, the size."""
    import torch

    from ourvidz_tasks.tools.gpubench import build_real

    module = build_real(config, getattr(torch, dtype), torch.device("meta"))
    tensors = list(module.parameters())
    assert {t.dtype for t in tensors} == {getattr(torch, dtype)}
    assert sum(t.numel() for t in tensors) == pytest.approx(params, rel=0.02)
