"""``bin/gpu-check`` without CUDA: every section runs on the tiny models and exits 0, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

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
    # a later run on the same card (bin/gpu-check --service) keeps them beside its own; another card's does not
    Report(path, {"card": "x"}).add("service", {"seconds": 2})
    assert list(json.loads(path.read_text())["sections"]) == ["sdxl", "oom", "service"]
    assert list(Report(path, {"card": "y"}).data["sections"]) == []


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


# -- the service rehearsal -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_service_rehearsal_runs_the_real_workers_at_tiny_size(tmp_path: Path) -> None:
    """``bin/gpu-check --service`` on CPU: model folders in the real layouts, Redis, the sink and the three
    real workers under the mixed workload; every job ends once, no OOM, memory sampled, estimates compared."""
    results_md = ROOT / "bench" / "RESULTS.md"
    committed = results_md.read_text()
    out, table = tmp_path / "gpu.json", tmp_path / "RESULTS.md"
    env = {**os.environ, "OURVIDZ_TINY_CACHE": str(TINY_CACHE), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([str(ROOT / "bin" / "gpu-check"), "--service", "--minutes", "0.4", "--out", str(out),
                           "--models-dir", str(tmp_path / "models"), "--results-md", str(table),
                           "--work-dir", str(tmp_path / "work")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    service = json.loads(out.read_text())["sections"]["service"]
    assert service["size"] == "tiny" and "error" not in service
    assert service["disk_needed_full_gib_total"] == pytest.approx(35.7, abs=0.1)
    kinds = {job["kind"].split("_")[0] for job in service["jobs"]}
    assert {"txt2img", "img2img", "wan", "chat", "enhance"} <= kinds
    assert {"txt2img_b1", "txt2img_b6"} <= {job["kind"] for job in service["jobs"]}
    assert all(job["terminal_callbacks"] == 1 and job["status"] == "completed" for job in service["jobs"])
    summary = service["summary"]
    assert summary["ended_once"] == summary["jobs"] > 0 and summary["oom_count"] == 0
    samples = service["memory"]["samples"]
    assert len(samples) >= 10
    assert all(s["pools"][pool]["used_mb"] > 0 and s["pools"][pool]["held_mb"] >= 0
               for s in samples for pool in ("sdxl", "chat", "wan"))
    shapes = {(row["model"], row["shape"]) for row in service["estimates"]}
    assert {("sdxl", "128x128x1"), ("sdxl", "128x128x6"), ("wan", "32x32x5")} <= shapes
    assert all(row["first_estimate_work_mb"] > 0 and row["measured_first_mb"] >= 0 for row in service["estimates"])
    assert set(service["exit_codes"].values()) == {0} and all(service["workers_alive_at_end"].values())
    assert "jobs ended exactly once" in table.read_text() and "<!-- gpu-check service cpu: begin -->" in table.read_text()
    assert results_md.read_text() == committed  # never the committed table from a CPU run


def test_the_sdxl_checkpoint_layout_is_what_diffusers_reads_at_full_size() -> None:
    """The full-size SDXL, on the meta device: written in the original layout, diffusers' own single-file
    conversion gives back every key and shape of the four components, and detects SDXL base."""
    from diffusers.loaders import single_file_utils as su

    from ourvidz_tasks.models.sizes import build_meta, read_config
    from ourvidz_tasks.tools.sdxl_layout import OPEN_CLIP_PREFIX, original_layout

    modules = {name: build_meta(f"sdxl_{name}.json") for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    state = {name: module.state_dict() for name, module in modules.items()}
    checkpoint = original_layout(state["unet"], read_config("sdxl_unet.json"), state["vae"],
                                 read_config("sdxl_vae.json"), state["text_encoder"], state["text_encoder_2"])
    assert su.infer_diffusers_model_type(checkpoint) == "xl_base"
    assert checkpoint["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    back = {"unet": su.convert_ldm_unet_checkpoint(checkpoint, read_config("sdxl_unet.json")),
            "vae": su.convert_ldm_vae_checkpoint(checkpoint, read_config("sdxl_vae.json")),
            "text_encoder": su.convert_ldm_clip_checkpoint(checkpoint),
            "text_encoder_2": su.convert_open_clip_checkpoint(modules["text_encoder_2"], checkpoint,
                                                              prefix=OPEN_CLIP_PREFIX)}
    for name, want in state.items():
        expected = {(k if k.startswith("text_model.") or name != "text_encoder" else "text_model." + k): tuple(v.shape)
                    for k, v in want.items() if not k.endswith("position_ids")}
        assert {k: tuple(v.shape) for k, v in back[name].items()} == expected, name


def test_the_full_size_writers_write_what_the_loaders_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The full-size writers with the tiny modules standing in for the published configs' (a CPU cannot
    hold the real ones): the SDXL single file + config folder, the Wan VACE folder and the Qwen folder load
    through the pools' own loaders, and SDXL renders."""
    import torch
    from diffusers import StableDiffusionXLPipeline, WanVACEPipeline
    from transformers import AutoModelForCausalLM

    from ourvidz_tasks.contract.settings import load_settings
    from ourvidz_tasks.models import build_once
    from ourvidz_tasks.models.qwen import load_qwen
    from ourvidz_tasks.models.sdxl import load_sdxl, run_sdxl
    from ourvidz_tasks.models.tiny.qwen import build_tiny
    from ourvidz_tasks.models.wan import load_wan
    from ourvidz_tasks.tools import gpulayouts
    from ourvidz_tasks.tools.gpubench import tiny_folder

    monkeypatch.setenv("OURVIDZ_TINY_CACHE", str(TINY_CACHE))
    sdxl: Any = StableDiffusionXLPipeline.from_pretrained(tiny_folder("sdxl"), local_files_only=True)
    wan: Any = WanVACEPipeline.from_pretrained(str(tiny_folder("wan")), local_files_only=True)
    qwen = AutoModelForCausalLM.from_pretrained(build_once(TINY_CACHE / "qwen_instruct",
                                                           lambda d: build_tiny(d, "qwen_instruct")))
    stand_ins = {"sdxl_unet.json": sdxl.unet, "sdxl_vae.json": sdxl.vae, "sdxl_text_encoder.json": sdxl.text_encoder,
                 "sdxl_text_encoder_2.json": sdxl.text_encoder_2, "umt5_xxl_encoder.json": wan.text_encoder,
                 "wan_vae.json": wan.vae, "wan_vace_1_3b_transformer.json": wan.transformer,
                 "qwen2_5_7b_instruct.json": qwen}
    monkeypatch.setattr(gpulayouts, "build_real", lambda name, dtype, device, overrides=None: stand_ins[name])
    cpu = torch.device("cpu")
    env = gpulayouts.write_models(tmp_path, True, cpu)
    assert not gpulayouts.missing(tmp_path)
    assert sorted(p.name for p in (tmp_path / "sdxl").iterdir()) == [".complete", "config", "sdxl.safetensors"]
    assert not list((tmp_path / "sdxl" / "config").rglob("*.safetensors"))
    settings = load_settings(model_source="local", sdxl_model=env["OURVIDZ_SDXL_MODEL"],
                             sdxl_config=env["OURVIDZ_SDXL_CONFIG"], wan_model=env["OURVIDZ_WAN_MODEL"],
                             qwen_instruct_model=env["OURVIDZ_QWEN_INSTRUCT_MODEL"], previews=False)
    model = load_sdxl(settings, cpu)
    image = run_sdxl(model, prompt="a cat", negative_prompt=None, width=64, height=64, steps=2, guidance_scale=5.0,
                     seeds=[1])[0]
    assert image.size == (64, 64)
    assert load_wan(settings, cpu).kind == "vace"
    assert load_qwen(settings, "qwen_instruct", cpu).tokenizer.chat_template


def test_the_disk_a_full_size_rehearsal_needs_and_a_refusal_without_it(tmp_path: Path) -> None:
    from ourvidz_tasks.models.memplan import sizes
    from ourvidz_tasks.tools.gpulayouts import GIB, check_space, disk_needed

    need = disk_needed(True)
    families = sizes()["families"]
    assert need["sdxl"] == 2 * families["sdxl"]["params"]  # all float16
    assert need["qwen_instruct"] == 2 * families["qwen_instruct"]["params"]  # bfloat16
    wan = {c["name"]: c["params"] for c in families["wan"]["components"]}
    assert need["wan"] == 2 * (wan["transformer"] + wan["text_encoder"]) + 4 * wan["vae"]  # the VAE in float32
    assert sum(need.values()) / GIB == pytest.approx(35.7, abs=0.1)
    with pytest.raises(SystemExit, match=r"need 35\.7 GiB .* has 20\.0 GiB free; pass --models-dir"):
        check_space(tmp_path / "models", True, free_bytes=20 * GIB)
    assert check_space(tmp_path / "models", True, free_bytes=100 * GIB) == sum(need.values())
    for name in need:
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / ".complete").write_text("ok\n")
    assert check_space(tmp_path / "models", True, free_bytes=0) == 0  # written once, reused


def test_the_results_table_goes_between_its_card_markers(tmp_path: Path) -> None:
    from ourvidz_tasks.tools.gpuservice import render_table, write_results_md

    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\ntext\n")
    result = {"size": "full", "rounds": 3, "summary": {"jobs": 9, "ended_once": 9, "oom_count": 0},
              "estimates": [{"model": "sdxl", "shape": "1024x1024x6", "first_estimate_work_mb": 15000,
                             "measured_first_mb": 18000, "error": 0.2}]}
    write_results_md(path, "NVIDIA H100", render_table("NVIDIA H100", result))
    write_results_md(path, "NVIDIA H100", render_table("NVIDIA H100", {**result, "rounds": 4}))
    text = path.read_text()
    assert text.startswith("# Benchmark results\n\ntext\n") and text.count("### Service rehearsal") == 1
    assert "4 rounds" in text and "| jobs ended exactly once | 9 / 9" in text and "15000 / 18000 (error 0.2)" in text
