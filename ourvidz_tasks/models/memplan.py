"""What the real models need on a card, from committed data only (no torch).

Weights come from ``models/configs/sizes.json`` (parameter and buffer bytes
derived on the meta device from the published configs, see
:mod:`ourvidz_tasks.models.sizes`). Working memory per job shape is a first
estimate computed from the same configs: the widest activations that are
alive together during the model call, in the dtype the family runs in. It is
what the ledger reserves before the first measurement; after that the
measured value replaces it (:meth:`~ourvidz_tasks.runtime.ledger.Ledger.estimate`).

Shapes are the keys jobs report (``Generated.shape``): ``WxHxN`` for SDXL
(N images), ``WxHxF`` for WAN (F frames), ``tokens:N`` for chat: what the
chat engine preallocates for a KV cache of N tokens (``OURVIDZ_CHAT_CACHE_TOKENS``,
16384: the cache and the per-step tensors transformers plans beside it,
:func:`chat_cache_bytes`) plus a prefill chunk's MLP. At load the engine's
preallocation is counted with the weights (its ``nbytes``), so only the rest
(``Estimate.work_mb - Estimate.held_mb``) is working memory then.

:func:`estimate_mb` is the one call other tools use (``bin/gpu-check``
compares its measured peaks with it); :func:`plan` is ``ourvidz memory plan``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

from ..contract.names import Family
from .sizes import CONFIGS

MB = 2**20
GB = 2**30
#: per-process CUDA context (driver, cuBLAS/cuDNN handles, kernels) each pool holds beside its tensors
CUDA_CONTEXT_MB = 768
#: kept free on the card for what nobody accounts for (other processes, NCCL, display)
SAFETY_MARGIN_MB = 1024
#: allocator slack on top of weights + working memory (fragmentation; small with expandable segments)
SLACK = 0.05
#: tokens the chat engine prefills in one step (``chat_engine.MAX_BATCH_TOKENS``, kept in step by a test)
CHAT_PREFILL_TOKENS = 512
#: tokens per KV-cache page (``chat_engine.PAGE_SIZE``) and requests decoding together (``OURVIDZ_CHAT_CONCURRENCY``)
CHAT_PAGE_TOKENS = 64
CHAT_CONCURRENCY = 8
#: the pool serving each model
POOL_OF: dict[str, Family] = {"sdxl": "sdxl", "qwen_instruct": "chat", "qwen_base": "chat", "wan": "wan"}
#: the job shapes the plan prints per model (the first is its default, reserved at load)
SHAPES: dict[str, tuple[str, ...]] = {
    "sdxl": ("1024x1024x1", "1024x1024x3", "1024x1024x6", "832x1216x6"),
    "qwen_instruct": ("tokens:16384", "tokens:4096", "tokens:32768"),
    "qwen_base": ("tokens:16384", "tokens:4096"),
    "wan": ("480x832x81", "480x832x17", "832x480x81"),
}


@dataclass(frozen=True)
class Estimate:
    """One model running one job shape: MB of weights, working memory and allocator slack."""

    model: str
    shape: str
    weights_mb: int
    work_mb: int
    slack_mb: int
    #: of ``work_mb``, what the model preallocates at load and counts with its weights (the chat KV cache)
    held_mb: int = 0

    @property
    def total_mb(self) -> int:
        return self.weights_mb + self.work_mb + self.slack_mb

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_mb": self.total_mb}


@cache
def sizes() -> dict[str, Any]:
    """``configs/sizes.json``: the derived parameter counts and bytes."""
    data: dict[str, Any] = json.loads((CONFIGS / "sizes.json").read_text())
    return data


@cache
def config(name: str) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((CONFIGS / name).read_text())
    return raw


def weights_bytes(model: str) -> int:
    """Parameter and buffer bytes of ``model`` as it is held on CUDA."""
    families = sizes()["families"]
    if model not in families:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted(families))}")
    return int(families[model]["weights_bytes"])


def slack_mb(mb: int, slack: float = SLACK) -> int:
    return math.ceil(mb * slack)


def work_bytes(model: str, shape: str) -> int:
    """First estimate of the working memory of one job shape (bytes above the weights)."""
    if model == "sdxl":
        width, height, count = _dims(shape, "sdxl")
        return _sdxl_work(width, height, count)
    if model == "wan":
        width, height, frames = _dims(shape, "wan")
        return _wan_work(width, height, frames)
    if model in ("qwen_instruct", "qwen_base"):
        return _qwen_work(model, _tokens(shape))
    raise ValueError(f"unknown model {model!r}")


def _tokens(shape: str) -> int:
    match = re.fullmatch(r"tokens:(\d+)", shape)
    if not match:
        raise ValueError(f"chat shape must be tokens:N, got {shape!r}")
    return int(match[1])


def estimate(model: str, shape: str | None = None, *, slack: float = SLACK) -> Estimate:
    """Weights + working memory of ``shape`` (default: the model's first shape) + slack, in MB."""
    weights = math.ceil(weights_bytes(model) / MB)
    shape = shape or SHAPES[model][0]
    work = math.ceil(work_bytes(model, shape) / MB)
    held = math.ceil(held_bytes(model, shape) / MB)
    return Estimate(model, shape, weights, work, slack_mb(weights + work, slack), held)


def held_bytes(model: str, shape: str) -> int:
    """Of :func:`work_bytes`, what the loaded model holds from its load on (in its ``nbytes``): the
    chat engine's KV cache and the per-step tensors planned with it; nothing for the diffusers."""
    if model in ("qwen_instruct", "qwen_base"):
        return chat_cache_bytes(config(_qwen_config(model)), _tokens(shape))
    return 0


def estimate_mb(family: str, shape: str | None = None) -> int:
    """What the ledger reserves for ``family`` (``sdxl``, ``qwen_instruct``, ``qwen_base``, ``wan``;
    ``chat`` means ``qwen_instruct``) running ``shape`` before anything was measured."""
    model = "qwen_instruct" if family == "chat" else family
    return estimate(model, shape).total_mb


#: the memory the driver reports for each card (MiB, ``nvidia-smi``'s total): a "48 GB" card is not 49,152 MiB.
#: The ledger's default budget starts from what the card reports at run time; the plan starts from these.
CARDS_MIB: dict[str, int] = {
    "l4": 23034, "a10g": 23028, "rtx-4090": 24564, "l40s": 46068, "l40": 46068, "a40": 46068,
    "rtx-a6000": 49140, "a100-80gb": 81920, "h100-80gb": 81559, "h200": 143771,
}


def card_mib(name: str) -> int:
    """The memory of a named card (:data:`CARDS_MIB`); ValueError naming the known ones."""
    key = name.strip().lower()
    if key not in CARDS_MIB:
        raise ValueError(f"unknown card {name!r}: one of {', '.join(CARDS_MIB)} (or give --card-mib)")
    return CARDS_MIB[key]


def budget_mb(card_mb: int, pools: int = 3, *, context_mb: int = CUDA_CONTEXT_MB,
              margin_mb: int = SAFETY_MARGIN_MB) -> int:
    """The ledger's default budget: the card minus one CUDA context per pool and a safety margin."""
    return card_mb - pools * context_mb - margin_mb


def plan(card_mb: int, *, models: tuple[str, ...] = ("sdxl", "qwen_instruct", "wan"),
         context_mb: int = CUDA_CONTEXT_MB, margin_mb: int = SAFETY_MARGIN_MB) -> dict[str, Any]:
    """Which models can stay resident together on a card of ``card_mb`` MiB and what each job shape needs."""
    pools = len({POOL_OF[m] for m in models})
    budget = budget_mb(card_mb, pools, context_mb=context_mb, margin_mb=margin_mb)
    shapes = {m: [estimate(m, s) for s in SHAPES[m]] for m in models}
    largest = {m: max(e.total_mb for e in shapes[m]) for m in models}
    default = {m: shapes[m][0].total_mb for m in models}
    sets = []
    for size in range(len(models), 0, -1):
        for combo in itertools.combinations(models, size):
            need_default = sum(default[m] for m in combo)
            need_largest = sum(largest[m] for m in combo)
            sets.append({"models": list(combo), "default_mb": need_default, "largest_mb": need_largest,
                         "fits_default": need_default <= budget, "fits_largest": need_largest <= budget})
    return {
        "card_mb": card_mb, "pools": pools, "context_mb": context_mb, "margin_mb": margin_mb, "budget_mb": budget,
        "models": {m: {"params": int(sizes()["families"][m]["params"]), "weights_mb": shapes[m][0].weights_mb}
                   for m in models},
        "shapes": {m: [dict(e.as_dict(), fits_alone=e.total_mb <= budget) for e in shapes[m]] for m in models},
        "resident": sets,
    }


def format_plan(data: dict[str, Any]) -> str:
    """The plan as text for ``ourvidz memory plan``."""
    out = [
        f"card {data['card_mb']} MB: budget {data['budget_mb']} MB = card - {data['pools']} pools x "
        f"{data['context_mb']} MB CUDA context - {data['margin_mb']} MB safety margin",
        "",
        f"{'model':<14}{'params':>10}{'weights MB':>12}",
    ]
    for name, m in data["models"].items():
        out.append(f"{name:<14}{m['params'] / 1e9:>9.2f}B{m['weights_mb']:>12}")
    out += ["", f"{'model':<14}{'shape':<14}{'weights':>9}{'work':>8}{'slack':>7}{'reserve MB':>12}  alone"]
    for name, rows in data["shapes"].items():
        for e in rows:
            out.append(f"{name:<14}{e['shape']:<14}{e['weights_mb']:>9}{e['work_mb']:>8}{e['slack_mb']:>7}"
                       f"{e['total_mb']:>12}  {'fits' if e['fits_alone'] else 'DOES NOT FIT'}")
    out += ["", "resident together (default shape each / largest shape each):"]
    for s in data["resident"]:
        verdict = ("yes" if s["fits_largest"] else "with default shapes only") if s["fits_default"] else "no"
        out.append(f"  {' + '.join(s['models']):<32}{s['default_mb']:>8} / {s['largest_mb']:<8} MB  {verdict}")
    return "\n".join(out)


# -- working memory, from the configs ---------------------------------------------------


def _dims(shape: str, model: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", shape)
    if not match:
        raise ValueError(f"{model} shape must be WxHxN, got {shape!r}")
    return int(match[1]), int(match[2]), int(match[3])


#: full-resolution float32 maps of the SDXL VAE decoder's second-widest level alive at its peak
VAE_MAPS = 3.5


def _sdxl_work(width: int, height: int, count: int) -> int:
    """UNet step or VAE decode, whichever is larger (they run one after the other).

    UNet: classifier-free guidance doubles the batch; at the latent resolution
    the skip connections and the working tensors of one block come to about 12
    maps of the first level's width (fp16). VAE: the pipeline decodes the whole
    batch at once in float32 (``force_upcast``); at its last upsampling the
    input map, the upsampled one and the convolution's output are alive together
    with the resnet's intermediate: about 3.5 full-resolution maps of the
    decoder's second-widest level (2.5 was counted before: 1024² batch 6 came to
    15.4 GB against about 20 GB; check it on a card, ``bin/gpu-check``).
    """
    unet, vae = config("sdxl_unet.json"), config("sdxl_vae.json")
    latent = (width // 8) * (height // 8)
    unet_bytes = 2 * count * latent * unet["block_out_channels"][0] * 2 * 12
    vae_bytes = int(count * width * height * sorted(vae["block_out_channels"])[1] * 4 * VAE_MAPS)
    latents = 2 * count * latent * unet["in_channels"] * 4
    text = 2 * count * 77 * unet["cross_attention_dim"] * 2
    return max(unet_bytes, vae_bytes) + latents + text


def _qwen_config(model: str) -> str:
    return "qwen2_5_7b_instruct.json" if model == "qwen_instruct" else "qwen2_5_7b.json"


def _qwen_work(model: str, tokens: int) -> int:
    """What the engine preallocates for ``tokens`` (:func:`chat_cache_bytes`) plus one prefill
    chunk's MLP activations (bf16), which transformers' plan leaves out."""
    cfg = config(_qwen_config(model))
    prefill = min(tokens, CHAT_PREFILL_TOKENS) * 3 * cfg["intermediate_size"] * 2
    return chat_cache_bytes(cfg, tokens) + prefill


def chat_cache_bytes(cfg: dict[str, Any], tokens: int, *, running: int = CHAT_CONCURRENCY,
                     batch_tokens: int = CHAT_PREFILL_TOKENS, dtype_bytes: int = 2) -> int:
    """What the chat engine preallocates for a KV cache of ``tokens`` (whole pages) on a decoder config.

    transformers 5's own plan (``PagedAttentionMemoryHandler.compute_memory_footprint``, SDPA
    attention, a model that slices its logits as Qwen2 does): the cache and its two trash pages,
    the old keys and values read back per cached token, one step's activations and index tensors
    per batch token, the attention mask, and one float32 logits row per running request.
    """
    layers, heads, hidden = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    cached = -(-tokens // CHAT_PAGE_TOKENS) * CHAT_PAGE_TOKENS
    kv_token = layers * 2 * kv_heads * head_dim * dtype_bytes
    peak_heads = 2 * heads + kv_heads  # SDPA repeats K and V to every query head, V kept beside
    cache = (cached + 2 * CHAT_PAGE_TOKENS) * kv_token + cached * (peak_heads * head_dim * dtype_bytes + 8)
    attention = dtype_bytes * (hidden + heads * head_dim + 2 * kv_heads * head_dim + peak_heads * head_dim)
    step = batch_tokens * (attention + 7 * 4 + 4 + 8 + 8)
    mask = batch_tokens * (cached + batch_tokens) * dtype_bytes
    logits = running * (hidden * dtype_bytes + cfg["vocab_size"] * 4)
    return cache + step + mask + logits


def _wan_work(width: int, height: int, frames: int) -> int:
    """Transformer call or VAE decode, whichever is larger.

    Transformer (bf16; conditional and unconditional run one after the other):
    the hidden states plus one VACE hint per VACE layer are alive together,
    and one block's FFN. VAE (float32, decoded chunk by chunk): about three
    maps of the decoder's full-resolution width over four frames, plus the
    decoded video.
    """
    tcfg, vcfg = config("wan_vace_1_3b_transformer.json"), config("wan_vae.json")
    dim = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    p_t, p_h, p_w = tcfg["patch_size"]
    latent_frames = (frames - 1) // 4 + 1
    tokens = (latent_frames // p_t) * (height // (8 * p_h)) * (width // (8 * p_w))
    hints = len(tcfg["vace_layers"])
    transformer = tokens * dim * 2 * (hints + 6) + tokens * tcfg["ffn_dim"] * 2 * 2
    widest = vcfg["base_dim"] * sorted(vcfg["dim_mult"])[1]
    vae = 3 * 4 * width * height * widest * 4 + frames * 3 * width * height * 4
    return max(transformer, vae)
