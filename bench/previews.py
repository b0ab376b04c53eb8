"""What live previews cost (issue 28): FLOPs at real size, CPU time against the full VAE decode, step time in the pool.

Three measurements:

- **FLOPs at real size**, counted by ``torch.utils.flop_counter`` on the meta device (no
  weights, no compute) from the published configs: one SDXL UNet step at 1024² (guidance:
  batch 2) and one WAN 1.3B transformer step at 480x832x81 (two calls), against one preview
  decode as the pools run it (TAESD's decoder at 32x32 latents, 256 px; TAEHV's decoder, no temporal
  upsampling, 21 latent frames at 18x32). What a real card spends is proportional to these.
- **CPU time, real-size random weights**: TAESD's decoder against SDXL's full VAE decode of
  the same 256² latents (the preview's ratio to the decode every job already does).
- **Step time** (tiny models, 2 threads, in this process, on and off interleaved 4 times: this
  machine is shared): seconds per step of one 1024² job with previews on (the defaults: every
  20% of the steps; decode on the step, encode + upload + callback to a real sink on the
  delivery's preview thread) and off. The tiny UNet is slimmed far more than the tiny decoder
  (which still decodes 256 px), so the second row takes the measured decodes out: what is
  left is the machinery (hook, encode, upload thread, callbacks) beside the denoising loop.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from figures import figure
from harness import ROOT, median_seconds, summary, write

CONFIGS = ROOT / "ourvidz_tasks" / "models" / "configs"
SIZE, STEPS = 1024, 15
#: what the issue allows: a preview's cost as a share of a real card's step time
MAX_SHARE = 3.0


def config(name: str) -> dict[str, Any]:
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


def flops() -> dict[str, float]:
    """TFLOPs of a real-size step and of a preview decode, per family (meta device: shapes only)."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel, WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    from ourvidz_tasks.models.taehv import video_decoder

    def count(call: Any) -> float:
        with FlopCounterMode(display=False) as mode:
            call()
        return mode.get_total_flops() / 1e12

    meta = torch.device("meta")
    with meta:
        unet: Any = UNet2DConditionModel.from_config(config("sdxl_unet.json"))
        vae: Any = AutoencoderKL.from_config(config("sdxl_vae.json"))
        taesd: Any = AutoencoderTiny()  # its defaults are taesdxl's config
        wan: Any = WanTransformer3DModel.from_config(config("wan_t2v_1_3b_transformer.json"))
        taehv = video_decoder()

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=meta)

    with torch.inference_mode():
        sdxl_step = count(lambda: unet(zeros(2, 4, 128, 128), torch.tensor([500.0, 500.0], device=meta),
                                       encoder_hidden_states=zeros(2, 77, 2048),
                                       added_cond_kwargs={"text_embeds": zeros(2, 1280), "time_ids": zeros(2, 6)}))
        sdxl_vae = count(lambda: vae.decode(zeros(1, 4, 128, 128)))
        sdxl_preview = count(lambda: taesd.decoder(zeros(1, 4, 32, 32)))
        wan_step = 2 * count(lambda: wan(zeros(1, 16, 21, 60, 104), torch.tensor([500], device=meta), zeros(1, 512, 4096)))
        wan_preview = count(lambda: taehv(zeros(21, 16, 18, 32)))
    return {"sdxl_step": sdxl_step, "sdxl_vae": sdxl_vae, "sdxl_preview": sdxl_preview,
            "wan_step": wan_step, "wan_preview": wan_preview}


def cpu_decodes() -> dict[str, float]:
    """Seconds of TAESD's decoder and of SDXL's full VAE decode, real-size random weights, 256² latents."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.set_num_threads(2)
    torch.manual_seed(0)
    vae: Any = AutoencoderKL.from_config(config("sdxl_vae.json")).eval()
    taesd: Any = AutoencoderTiny().eval()
    latents = torch.randn(1, 4, 32, 32)
    with torch.inference_mode():
        taesd.decoder(latents)  # warm
        preview = median_seconds(lambda: taesd.decoder(latents), 5)
        full = median_seconds(lambda: vae.decode(latents), 1)
    return {"preview_s": preview, "vae_s": full}


def step_times() -> dict[str, Any]:
    """Seconds per step of the same tiny 1024² job with previews on and off, interleaved in this process.

    Previews on is what a pool runs: the latents hook decoding on the step, a
    :class:`~ourvidz_tasks.services.previews.PreviewStream` encoding and uploading to a real sink
    on the delivery's preview thread, and the ``processing`` callbacks naming them.
    """
    import tempfile
    from pathlib import Path

    import redis
    import torch

    from devtools.sink import Sink
    from ourvidz_tasks.contract.settings import Settings
    from ourvidz_tasks.models.previews import decode_image, latents_hook
    from ourvidz_tasks.models.sdxl import load_sdxl, run_sdxl
    from ourvidz_tasks.services.delivery import Delivery
    from ourvidz_tasks.services.previews import PreviewStream
    from tests.support.env import BROKER, KEY, SECRET

    torch.set_num_threads(2)
    sink = Sink(Path(tempfile.mkdtemp(prefix="ourvidz-bench-")), KEY, SECRET).start()
    settings = Settings(model_source="tiny", tiny_cache=ROOT / ".cache" / "tiny", supabase_url=sink.url,
                        supabase_service_key=KEY, job_callback_secret=SECRET)
    delivery = Delivery(settings, "bench", redis.Redis.from_url(BROKER))
    model = load_sdxl(settings, torch.device("cpu"))
    decoder = model.preview
    assert decoder is not None
    times: dict[str, list[float]] = {"on": [], "off": []}
    shown: list[int] = []
    decodes: list[float] = []

    def timed_decode(latents: torch.Tensor) -> Any:
        started = time.perf_counter()
        pixels = decode_image(decoder, latents)
        decodes.append(time.perf_counter() - started)
        return pixels

    def run(previews: bool) -> None:
        stream = PreviewStream(delivery, settings, "bench", uuid.uuid4().hex, 1, lambda: 0)
        hook = latents_hook(stream, timed_decode) if previews else None
        started = time.perf_counter()
        run_sdxl(model, prompt="a lighthouse at dawn", negative_prompt=None, width=SIZE, height=SIZE, steps=STEPS,
                 guidance_scale=7.5, seeds=[1], on_latents=hook)
        times["on" if previews else "off"].append((time.perf_counter() - started) / STEPS)
        stream.close()
        if previews:
            shown.append(stream.sent)

    try:
        run(True)  # warm caches
        run(False)
        times = {"on": [], "off": []}
        decodes.clear()
        for _ in range(4):
            run(True)
            run(False)
    finally:
        delivery.close()
        sink.stop()
    return {"on": summary(times["on"]), "off": summary(times["off"]), "previews": max(shown),
            "decode_s": summary(decodes)}


def main() -> None:
    started = time.perf_counter()
    real = flops()
    cpu = cpu_decodes()
    steps = step_times()
    decode = steps["decode_s"]["median"]
    sdxl_share = 100 * real["sdxl_preview"] / real["sdxl_step"]
    wan_share = 100 * real["wan_preview"] / real["wan_step"]
    # the fastest of the interleaved runs: on a shared machine the slower ones measure the neighbours
    on, off = steps["on"]["min"], steps["off"]["min"]
    machinery = on - steps["previews"] * decode / STEPS
    print(f"FLOPs: SDXL step {real['sdxl_step']:.2f} T, VAE decode {real['sdxl_vae']:.2f} T, preview "
          f"{real['sdxl_preview']:.3f} T ({sdxl_share:.2f} % of a step); WAN step {real['wan_step']:.1f} T, "
          f"preview {real['wan_preview']:.3f} T ({wan_share:.3f} %)")
    print(f"CPU: preview decode {cpu['preview_s'] * 1000:.0f} ms, full VAE decode {cpu['vae_s']:.2f} s "
          f"(256² latents, real-size random weights)")
    print(f"pool step (tiny, 1024², {STEPS} steps): previews on {on * 1000:.1f} ms "
          f"({steps['previews']:.0f} previews, tiny decode {decode * 1000:.0f} ms each), off {off * 1000:.1f} ms; "
          f"{time.perf_counter() - started:.0f} s")
    figures = [
        figure("previews: SDXL preview decode, share of one real step (FLOPs, 1024²)", sdxl_share, "%",
               max_value=MAX_SHARE, note=f"TAESD decoder at 32x32 latents {real['sdxl_preview']:.3f} TFLOP; "
               f"UNet step with guidance {real['sdxl_step']:.1f} TFLOP"),
        figure("previews: WAN preview decode, share of one real step (FLOPs, 480x832x81)", wan_share, "%",
               max_value=MAX_SHARE, note=f"TAEHV decoder {real['wan_preview']:.3f} TFLOP; "
               f"transformer step with guidance {real['wan_step']:.0f} TFLOP"),
        figure("previews: SDXL preview decode vs the full VAE decode (CPU, real-size weights)", cpu["preview_s"], "s",
               reference=cpu["vae_s"], against="SDXL's VAE decode of the same latents", max_ratio=0.1),
        figure(f"previews: SDXL step time, previews on ({steps['previews']:.0f} per job)", on * 1000,
               "ms", reference=off * 1000, against="previews off, same job",
               note=f"fastest of 4 interleaved runs each (medians {steps['on']['median'] * 1000:.0f} / "
               f"{steps['off']['median'] * 1000:.0f} ms); tiny models on CPU: see the FLOPs rows for a real card"),
        figure("previews: SDXL step time, previews on, less the decode itself", machinery * 1000, "ms",
               reference=off * 1000, against="previews off, same job", max_ratio=1.03,
               note=f"tiny decode {decode * 1000:.0f} ms x previews / steps taken out: hook, encode, upload, callbacks"),
    ]
    write("previews", {"flops_t": real, "cpu": cpu, "steps": steps, "size": SIZE, "step_count": STEPS}, figures)


if __name__ == "__main__":
    main()
