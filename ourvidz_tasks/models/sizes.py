"""Real model sizes from their published configs, derived on the meta device (no weights, no download).

``configs/*.json`` are the published ``config.json`` files of the models the
pools serve on a real card (SDXL base 1.0, Qwen2.5-7B, Wan2.1 VACE-1.3B); each
is built here on torch's ``meta`` device, so counting a 7B model takes no
memory and no network. :func:`derive` counts parameters and buffers and their
bytes in the dtype each component runs in on CUDA; ``python -m
ourvidz_tasks.models.sizes`` writes the result to ``configs/sizes.json``,
which :mod:`ourvidz_tasks.models.memplan` reads without torch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CONFIGS = Path(__file__).with_name("configs")
SIZES_FILE = CONFIGS / "sizes.json"

#: dtype of each family on CUDA (``compute_dtype``); ``vae_dtype``: the Wan VAE runs in float32
#: (``models/wan.py``) and the SDXL VAE upcasts to float32 to decode (``force_upcast``)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Component:
    """One module of a family: its config file and the dtype its weights are held in on CUDA."""

    name: str
    config: str
    dtype: str


#: the models each ledger name loads (worker.py's model names), as on a real card
FAMILIES: dict[str, tuple[Component, ...]] = {
    "sdxl": (
        Component("unet", "sdxl_unet.json", "float16"),
        Component("vae", "sdxl_vae.json", "float16"),
        Component("text_encoder", "sdxl_text_encoder.json", "float16"),
        Component("text_encoder_2", "sdxl_text_encoder_2.json", "float16"),
    ),
    "qwen_instruct": (Component("model", "qwen2_5_7b_instruct.json", "bfloat16"),),
    "qwen_base": (Component("model", "qwen2_5_7b.json", "bfloat16"),),
    "wan": (
        Component("transformer", "wan_vace_1_3b_transformer.json", "bfloat16"),
        Component("vae", "wan_vae.json", "float32"),
        Component("text_encoder", "umt5_xxl_encoder.json", "bfloat16"),
    ),
}

#: counted too, for the published-count check (the T2V transformer VACE builds on)
EXTRA: dict[str, Component] = {
    "wan_t2v_transformer": Component("transformer", "wan_t2v_1_3b_transformer.json", "bfloat16"),
}


def read_config(name: str) -> dict[str, Any]:
    """A committed config without its bookkeeping keys (``_class_name``, ``_source``)."""
    raw = json.loads((CONFIGS / name).read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def class_of(name: str) -> str:
    return str(json.loads((CONFIGS / name).read_text())["_class_name"])


def build_meta(config: str) -> torch.nn.Module:
    """The module a config describes, on the meta device (shapes only, no storage)."""
    import torch

    cls_name, cfg = class_of(config), read_config(config)
    with torch.device("meta"):
        if cls_name in ("UNet2DConditionModel", "AutoencoderKL", "AutoencoderKLWan",
                        "WanTransformer3DModel", "WanVACETransformer3DModel"):
            import diffusers

            cls = getattr(diffusers, cls_name)
            return cls.from_config(cfg)  # type: ignore[no-any-return]
        import transformers

        model_cls = getattr(transformers, cls_name)
        config_cls = getattr(transformers, model_cls.config_class.__name__)
        return model_cls(config_cls.from_dict(cfg))  # type: ignore[no-any-return]


def count(module: torch.nn.Module) -> dict[str, int]:
    """``params``, ``buffers`` (elements) and ``persistent_buffers``; shared tensors once."""
    seen: set[int] = set()
    params = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    buffers = sum(b.numel() for b in module.buffers() if id(b) not in seen)
    return {"params": params, "buffers": buffers}


def derive_component(component: Component) -> dict[str, Any]:
    """Counts and bytes of one component in each dtype (integer buffers keep their size)."""
    module = build_meta(component.config)
    counts = count(module)
    float_buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    other_buffer_bytes = sum(b.numel() * b.element_size() for b in module.buffers() if not b.is_floating_point())
    bytes_per = {name: counts["params"] * size + float_buffers * size + other_buffer_bytes
                 for name, size in DTYPE_BYTES.items()}
    del module
    return {"name": component.name, "config": component.config, "class": class_of(component.config),
            "dtype": component.dtype, **counts, "bytes": bytes_per,
            "weights_bytes": bytes_per[component.dtype]}


def derive() -> dict[str, Any]:
    """Every family's components, counted on the meta device."""
    import diffusers
    import torch
    import transformers

    families: dict[str, Any] = {}
    for family, components in FAMILIES.items():
        parts = [derive_component(c) for c in components]
        families[family] = {
            "components": parts,
            "params": sum(p["params"] for p in parts),
            "weights_bytes": sum(p["weights_bytes"] for p in parts),
        }
    extra = {name: derive_component(c) for name, c in EXTRA.items()}
    return {"derived_with": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                             "transformers": transformers.__version__},
            "families": families, "extra": extra}


def main(argv: list[str] | None = None) -> int:
    """Write ``configs/sizes.json`` (or print it with ``--print``)."""
    args = sys.argv[1:] if argv is None else argv
    data = derive()
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if "--print" in args:
        sys.stdout.write(text)
    else:
        SIZES_FILE.write_text(text)
        print(f"wrote {SIZES_FILE}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
