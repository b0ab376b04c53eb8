"""The sections of ``bin/gpu-check`` (:mod:`ourvidz_tasks.tools.gpucheck`): SDXL, the out-of-memory
step-down, Wan and Qwen, each timed and measured with :mod:`ourvidz_tasks.tools.gpubench`.

Imports only torch, diffusers, transformers and the package's torch-side
modules (``faults``, ``memplan``, ``models``): never Celery or Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from .gpubench import (
    MB,
    Plan,
    build_real,
    count_syncs,
    free,
    image_check,
    ledger_estimate,
    load_tiny,
    peak_memory,
    sync,
    tiny_folder,
    weights_mb,
)

if TYPE_CHECKING:
    import torch


class SdxlBench:
    """UNet + VAE with random conditioning: ``steps`` guided steps, then the fp32 decode."""

    def __init__(self, plan: Plan, device: torch.device) -> None:
        import torch

        self.plan, self.device = plan, device
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.unet: Any
        self.vae: Any
        if plan.real:
            self.unet = build_real("sdxl_unet.json", self.dtype, device)
            self.vae = build_real("sdxl_vae.json", self.dtype, device)
        else:
            self.unet = load_tiny("sdxl", "unet", "UNet2DConditionModel", self.dtype, device)
            self.vae = load_tiny("sdxl", "vae", "AutoencoderKL", self.dtype, device)
        config: Any = self.unet.config
        self.text_dim = config.cross_attention_dim
        self.pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def step(self, latents: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        import torch

        noise = self.unet(torch.cat([latents] * 2), torch.tensor(500, device=self.device), **cond).sample
        uncond, text = noise.chunk(2)
        return latents - 0.05 * (uncond + 7.0 * (text - uncond))

    def conditioning(self, batch: int) -> dict[str, Any]:
        import torch

        size = self.plan.sdxl_size
        g = torch.Generator(self.device).manual_seed(1)
        hidden = torch.randn(2 * batch, 77, self.text_dim, generator=g, device=self.device, dtype=self.dtype)
        pooled = torch.randn(2 * batch, self.pooled_dim, generator=g, device=self.device, dtype=self.dtype)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2 * batch, device=self.device, dtype=self.dtype)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def run(self, batch: int) -> dict[str, Any]:
        """One job shape: it/s of the guided UNet step, decode time, the image check."""
        import torch

        size, latent = self.plan.sdxl_size, self.plan.sdxl_size // 8
        cond = self.conditioning(batch)
        g = torch.Generator(self.device).manual_seed(2)
        with torch.inference_mode():
            latents = torch.randn(batch, 4, latent, latent, generator=g, device=self.device, dtype=self.dtype)
            latents = self.step(latents, cond)  # warm-up (kernels, allocator)
            sync(self.device)
            syncs = count_syncs(self.device, lambda: self.step(latents, cond))
            started = time.perf_counter()
            for _ in range(self.plan.sdxl_steps):
                latents = self.step(latents, cond)
            sync(self.device)
            unet_s = time.perf_counter() - started
            started = time.perf_counter()
            images = self.decode(latents)
            sync(self.device)
            decode_s = time.perf_counter() - started
        return {"shape": f"{size}x{size}x{batch}", "unet_it_s": round(self.plan.sdxl_steps / unet_s, 3),
                "decode_s": round(decode_s, 3), "host_syncs_per_step": syncs, "output": image_check(images)}

    def job(self, batch: int) -> torch.Tensor:
        """One step and the decode of a batch, untimed (the out-of-memory section)."""
        import torch

        latent = self.plan.sdxl_size // 8
        with torch.inference_mode():
            latents = torch.randn(batch, 4, latent, latent, device=self.device, dtype=self.dtype)
            return self.decode(self.step(latents, self.conditioning(batch)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """As the pipeline does with ``force_upcast``: the VAE in float32 for the decode, then back."""
        import torch

        self.vae.to(dtype=torch.float32)
        try:
            scale = float(getattr(self.vae.config, "scaling_factor", 0.13025))
            return self.vae.decode(latents.float() / scale).sample.clamp(-1, 1)  # type: ignore[no-any-return]
        finally:
            self.vae.to(dtype=self.dtype)


def sdxl_section(plan: Plan, device: torch.device) -> tuple[dict[str, Any], SdxlBench]:
    bench = SdxlBench(plan, device)
    out: dict[str, Any] = {"dtype": str(bench.dtype), "weights_mb": weights_mb(bench.unet, bench.vae), "shapes": []}
    for batch in plan.sdxl_batches:
        with peak_memory(device) as peak:
            shape = bench.run(batch)
        shape.update(peak, ledger_estimate=ledger_estimate(plan, "sdxl", shape["shape"], peak, out["weights_mb"]))
        out["shapes"].append(shape)
    return out, bench


def oom_section(plan: Plan, device: torch.device, bench: SdxlBench, batch1_peak_mb: int | None) -> dict[str, Any]:
    """A batch under a memory cap that fits one image: the workers' step-down path must get it through.

    On CUDA the cap is real (``set_per_process_memory_fraction`` at 1.15x the measured peak of
    one image); elsewhere it is emulated by an attempt hook that raises ``torch.OutOfMemoryError``
    for more than one image, the seam the CPU tests use.
    """
    import torch

    from ourvidz_tasks.runtime.faults import Attempt, Remedy, step_down
    from ourvidz_tasks.runtime.remedies import tile_vae, untile_vae

    batch = max(plan.sdxl_batches)
    hooks: list[Callable[[Attempt], None]] = []
    cap_mb: int | None = None
    if device.type == "cuda" and batch1_peak_mb:
        free(device)
        total = torch.cuda.get_device_properties(device).total_memory
        cap_mb = round(batch1_peak_mb * 1.15)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_mb * MB / total), device)
    else:
        def emulated_cap(attempt: Attempt) -> None:
            if attempt.batch > 1:
                raise torch.OutOfMemoryError("emulated memory cap: one image fits")

        hooks.append(emulated_cap)
    ladder = [Remedy("batch", size) for size in sorted({batch, -(-batch // 2), 1}, reverse=True)]
    tiles: list[tuple[Any, Any] | None] = []
    ladder.append(Remedy("vae_tiling", 1, lambda: tiles.append(tile_vae(bench.vae))))  # the pools' own rung

    def run(remedy: Remedy) -> int:
        size = remedy.batch or batch
        for _ in range(0, batch, size):
            bench.job(size)
        return size

    try:
        _, outcome = step_down(ladder, run, family="sdxl", stage="gpu-check", total=batch, device=device,
                               hooks=hooks, what="gpu-check")
        result: dict[str, Any] = {"step_down": outcome.metadata(), "stepped": bool(outcome.failed)}
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        untile_vae(bench.vae, tiles[0] if tiles else None)
    return {"cap_mb": cap_mb, "emulated": cap_mb is None, "batch": batch, **result}


def wan_section(plan: Plan, device: torch.device) -> dict[str, Any]:
    """Transformer (bf16) guided steps over the clip's latents, then the fp32 VAE decode of all frames."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer: Any
    vae: Any
    if plan.real:
        transformer = build_real("wan_vace_1_3b_transformer.json", dtype, device)
        vae = build_real("wan_vae.json", torch.float32, device)
    else:
        transformer = load_tiny("wan", "transformer", "WanVACETransformer3DModel", dtype, device)
        vae = load_tiny("wan", "vae", "AutoencoderKLWan", torch.float32, device)
    config: Any = transformer.config
    height, width, frames = plan.wan_shape
    latent_frames = (frames - 1) // 4 + 1
    g = torch.Generator(device).manual_seed(3)
    shape = (1, config.in_channels, latent_frames, height // 8, width // 8)
    text = torch.randn(1, 512, config.text_dim, generator=g, device=device, dtype=dtype)
    control = torch.zeros(1, config.vace_in_channels, *shape[2:], device=device, dtype=dtype)
    timestep = torch.tensor([999], device=device)

    def step(latents: torch.Tensor) -> torch.Tensor:
        cond = transformer(latents, timestep, text, control_hidden_states=control).sample
        uncond = transformer(latents, timestep, text * 0, control_hidden_states=control).sample
        return latents - 0.05 * (uncond + 5.0 * (cond - uncond))

    out: dict[str, Any] = {"dtype": str(dtype), "vae_dtype": "torch.float32", "weights_mb": weights_mb(transformer, vae)}
    with peak_memory(device) as peak, torch.inference_mode():
        latents = torch.randn(shape, generator=g, device=device, dtype=dtype)
        syncs = count_syncs(device, lambda: step(latents))
        sync(device)
        started = time.perf_counter()
        for _ in range(plan.wan_steps):
            latents = step(latents)
        sync(device)
        step_s = time.perf_counter() - started
        started = time.perf_counter()
        video = vae.decode(latents.float()).sample.clamp(-1, 1)
        sync(device)
        decode_s = time.perf_counter() - started
    out.update(shape=f"{width}x{height}x{frames}", transformer_it_s=round(plan.wan_steps / step_s, 4),
               decode_s=round(decode_s, 3), frames_decoded=int(video.shape[2]), host_syncs_per_step=syncs,
               output=image_check(video), **peak)
    out["ledger_estimate"] = ledger_estimate(plan, "wan", f"{height}x{width}x{frames}", peak, out["weights_mb"])
    return out


def qwen_section(plan: Plan, device: torch.device) -> dict[str, Any]:
    """Greedy decode of ``qwen_new`` tokens after a ``qwen_prompt``-token prompt, per batch size."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if plan.real:
        model: Any = build_real("qwen2_5_7b.json", dtype, device)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_folder("qwen"), local_files_only=True, dtype=dtype)
        model = model.to(device)
    out: dict[str, Any] = {"dtype": str(dtype), "weights_mb": weights_mb(model), "shapes": []}
    vocab = int(model.config.vocab_size)
    for batch in plan.qwen_batches:
        g = torch.Generator(device).manual_seed(4)
        ids = torch.randint(10, min(vocab, 30000), (batch, plan.qwen_prompt), generator=g, device=device)
        options = {"max_new_tokens": plan.qwen_new, "min_new_tokens": plan.qwen_new, "do_sample": False,
                   "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
        with torch.inference_mode():
            logits = model(ids[:, :8]).logits
            model.generate(ids, **{**options, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            with peak_memory(device) as peak:
                syncs = count_syncs(device, partial(model.generate, ids, **{**options, "max_new_tokens": 4,
                                                                         "min_new_tokens": 4}))
                sync(device)
                started = time.perf_counter()
                generated = model.generate(ids, **options)
                sync(device)
                seconds = time.perf_counter() - started
        new = int(generated.shape[1] - ids.shape[1]) * batch
        tokens = batch * (plan.qwen_prompt + plan.qwen_new)
        out["shapes"].append({
            "batch": batch, "tok_s": round(new / seconds, 2), "tok_s_per_sequence": round(new / seconds / batch, 2),
            "host_syncs_per_step": None if syncs is None else round(syncs / 4, 2),
            "output": {"finite": bool(torch.isfinite(logits.float()).all()), "new_tokens": new},
            **peak, "ledger_estimate": ledger_estimate(plan, "qwen_base", f"tokens:{tokens}", peak, out["weights_mb"]),
        })
    return out
