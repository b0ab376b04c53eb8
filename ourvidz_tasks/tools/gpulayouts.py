"""Random weights in the on-disk layouts the loaders read, for ``bin/gpu-check --service``.

Three folders under one root, each written once (to a temporary folder renamed into place, as
:func:`ourvidz_tasks.models.build_once` does) and reused by later runs:

* ``sdxl/sdxl.safetensors`` + ``sdxl/config/``: the single-file checkpoint in the original
  (ldm/sgm) key layout and its diffusers config folder (``model_index.json``, component configs,
  CLIP tokenizers, scheduler), read as ``OURVIDZ_SDXL_MODEL`` + ``OURVIDZ_SDXL_CONFIG``;
* ``wan/``: the Wan2.1 VACE diffusers folder with its UMT5 encoder (``OURVIDZ_WAN_MODEL``);
* ``qwen_instruct/``: a Qwen2.5 folder with a tokenizer and chat template whose ids fit the real
  vocabulary (``OURVIDZ_QWEN_INSTRUCT_MODEL``).

At full size every module is built from the committed published configs (``models/configs/``) in
the dtype the pools hold it in on a card, so the disk it takes is the parameter counts times those
dtypes' bytes (:func:`disk_needed`); the tokenizers are the tiny models' (their ids fit the real
vocabularies). At tiny size the folders are the tiny models (:mod:`ourvidz_tasks.models.tiny`)
in the same layouts.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .gpubench import build_real, tiny_folder

if TYPE_CHECKING:
    import torch

GIB = 2**30
#: what a tiny set takes on disk, counted generously (configs, tokenizers, a few MB of weights)
TINY_BYTES = 64 * 2**20
#: kept free beyond the weights: configs, tokenizers, the filesystem's own
SPARE_BYTES = GIB
#: the folder of each model set, and the ledger family whose published sizes it holds
FOLDERS = {"sdxl": "sdxl", "wan": "wan", "qwen_instruct": "qwen_instruct"}


def disk_needed(real: bool = True) -> dict[str, int]:
    """Bytes each folder takes: parameter counts (``models/configs/sizes.json``, derived from the
    published configs) times the bytes of the dtype each component is written in."""
    from ourvidz_tasks.models.memplan import sizes
    from ourvidz_tasks.models.sizes import DTYPE_BYTES

    if not real:
        return dict.fromkeys(FOLDERS, TINY_BYTES)
    families = sizes()["families"]
    return {name: sum(int(c["params"]) * DTYPE_BYTES[c["dtype"]] for c in families[family]["components"])
            for name, family in FOLDERS.items()}


def missing(root: Path) -> list[str]:
    """The folders not written completely yet."""
    return [name for name in FOLDERS if not (root / name / ".complete").exists()]


def check_space(root: Path, real: bool, free_bytes: int | None = None) -> int:
    """The bytes the folders still to write need; SystemExit with what to do when ``root``'s disk
    has less free (``free_bytes``: the free space, else measured)."""
    sizes = disk_needed(real)
    todo = missing(root)
    need = sum(sizes[name] for name in todo)
    if not todo:
        return 0
    existing = root
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free if free_bytes is None else free_bytes
    if free < need + SPARE_BYTES:
        parts = ", ".join(f"{name} {sizes[name] / GIB:.1f}" for name in todo)
        raise SystemExit(
            f"gpu-check service: the {'full-size' if real else 'tiny'} models need {need / GIB:.1f} GiB "
            f"({parts}) plus {SPARE_BYTES / GIB:.0f} GiB spare, but {existing} has {free / GIB:.1f} GiB free; "
            "pass --models-dir on a disk with room (written once, reused by later runs)")
    return need


def write_models(root: Path, real: bool, device: torch.device) -> dict[str, str]:
    """Write what is missing under ``root``; the worker environment that reads it."""
    from ourvidz_tasks.models import build_once, release_memory

    writers = {"sdxl": _sdxl_full if real else _sdxl_tiny, "wan": _wan_full if real else _wan_tiny,
               "qwen_instruct": _qwen_full if real else _qwen_tiny}
    for name in missing(root):
        print(f"gpu-check service: writing {name} ({'full size' if real else 'tiny'}) under {root}", flush=True)
        build_once(root / name, lambda dest, write=writers[name]: write(dest, device))  # type: ignore[misc]
        release_memory(device)
    return {
        "OURVIDZ_MODEL_SOURCE": "local",
        "OURVIDZ_SDXL_MODEL": str(root / "sdxl" / "sdxl.safetensors"),
        "OURVIDZ_SDXL_CONFIG": str(root / "sdxl" / "config"),
        "OURVIDZ_WAN_MODEL": str(root / "wan"),
        "OURVIDZ_QWEN_INSTRUCT_MODEL": str(root / "qwen_instruct"),
    }


# -- SDXL: the single-file checkpoint and its config folder ---------------------------------------


def _sdxl_tiny(dest: Path, device: torch.device) -> None:
    from safetensors.torch import save_file

    from .sdxl_layout import to_original_layout

    source = tiny_folder("sdxl")
    shutil.copytree(source, dest / "config", ignore=shutil.ignore_patterns("*.safetensors", ".complete"))
    save_file(to_original_layout(source), str(dest / "sdxl.safetensors"))


def _sdxl_full(dest: Path, device: torch.device) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    from ourvidz_tasks.models.tiny.sdxl import SCHEDULER_CONFIG, write_tiny_tokenizer

    from .sdxl_layout import original_layout

    config = dest / "config"
    parts: dict[str, Any] = {name: build_real(f"sdxl_{name}.json", torch.float16, device)
                             for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    write_tiny_tokenizer(config / "tokenizer", pad_token="<|endoftext|>")
    write_tiny_tokenizer(config / "tokenizer_2", pad_token="!")  # as SDXL's tokenizer_2
    scheduler: Any = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    pipe: Any = StableDiffusionXLPipeline(
        **parts, scheduler=scheduler, tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(config / "tokenizer_2"), force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    pipe.save_config(config)  # model_index.json
    for name in ("unet", "vae"):
        parts[name].save_config(config / name)
    for name in ("text_encoder", "text_encoder_2"):
        parts[name].config.save_pretrained(config / name)
    scheduler.save_config(config / "scheduler")
    configs = {name: dict(parts[name].config) for name in ("unet", "vae")}
    state = {name: {k: v.to("cpu") for k, v in module.state_dict().items()} for name, module in parts.items()}
    del parts, pipe
    save_file(original_layout(state["unet"], configs["unet"], state["vae"], configs["vae"],
                              state["text_encoder"], state["text_encoder_2"]), str(dest / "sdxl.safetensors"))


# -- Wan VACE: the diffusers folder with its UMT5 encoder -----------------------------------------


def _wan_tiny(dest: Path, device: torch.device) -> None:
    shutil.copytree(tiny_folder("wan"), dest, ignore=shutil.ignore_patterns(".complete"), dirs_exist_ok=True)


def _wan_full(dest: Path, device: torch.device) -> None:
    import torch
    from diffusers import UniPCMultistepScheduler, WanVACEPipeline

    from ourvidz_tasks.models.diffusion import quiet_progress
    from ourvidz_tasks.models.tiny.wan import tiny_tokenizer

    pipe: Any = WanVACEPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=build_real("umt5_xxl_encoder.json", torch.bfloat16, device),
        vae=build_real("wan_vae.json", torch.float32, device),
        transformer=build_real("wan_vace_1_3b_transformer.json", torch.bfloat16, device),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                          num_train_timesteps=1000),
    )
    with quiet_progress():
        pipe.save_pretrained(str(dest), safe_serialization=True)


# -- Qwen2.5 instruct: the transformers folder with a chat template --------------------------------


def _qwen_tiny(dest: Path, device: torch.device) -> None:
    from ourvidz_tasks.models.tiny.qwen import build_tiny

    build_tiny(dest, "qwen_instruct")


def _qwen_full(dest: Path, device: torch.device) -> None:
    import torch
    from transformers import GenerationConfig

    from ourvidz_tasks.models.chat_common import ENDOFTEXT, IM_END
    from ourvidz_tasks.models.tiny.qwen import build_tokenizer, token_id

    tokenizer = build_tokenizer(eos=IM_END)
    tokenizer.save_pretrained(dest)
    endoftext, im_end = token_id(tokenizer, ENDOFTEXT), token_id(tokenizer, IM_END)
    model: Any = build_real("qwen2_5_7b_instruct.json", torch.bfloat16, device,
                            {"bos_token_id": endoftext, "eos_token_id": im_end, "pad_token_id": endoftext})
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer ids reach {len(tokenizer)}, past the model's {model.config.vocab_size}")
    model.save_pretrained(dest, safe_serialization=True)
    GenerationConfig(bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
                     ).save_pretrained(dest)

