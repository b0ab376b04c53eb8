"""Issue 25.2: an unload gives the process's memory back, measured by the pool's own probe, for every family.

Each family loads its tiny model, runs one call, and unloads while the model object is still referenced
(as the slot holds it during ``unload``): the probe (on CPU the resident memory, freed heap trimmed first)
must be back near what the process held before the load, after two loads and unloads that leave the
libraries' one-time memory in place (the process's idle context). On CPU memory goes back when its last
reference goes, as it goes back to the card when ``empty_cache`` runs after that: so no weight may stay
referenced, and the chat model is made wide enough (about 60 MB) for the probe to see it.
"""

from __future__ import annotations

import gc
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ourvidz_tasks.contract.settings import Settings, load_settings
from ourvidz_tasks.models.chat_common import Sampling
from ourvidz_tasks.models.chat_engine import ChatEngine
from ourvidz_tasks.models.qwen import load_qwen
from ourvidz_tasks.models.sdxl import load_sdxl, run_sdxl
from ourvidz_tasks.models.wan import load_wan, run_wan
from ourvidz_tasks.runtime.memprobe import MB, CpuProbe

from .support.env import TINY_CACHE

pytestmark = pytest.mark.slow  # four loads per family, some ten seconds each

CPU = torch.device("cpu")
#: large enough that a model still held shows far above the probe's noise (a few MB)
CHAT_CACHE_TOKENS = 32768


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Settings]:
    settings = load_settings(model_source="tiny", tiny_cache=TINY_CACHE, wan_kind="auto")
    load_qwen(settings, "qwen_instruct", CPU).unload()  # the tiny folder, built once
    wide = load_settings(model_source="local", qwen_instruct_model=_wide_qwen(tmp_path_factory.mktemp("wide")))
    return {"chat": wide, "sdxl": settings, "wan": settings}


def _wide_qwen(folder: Path) -> Path:
    """The tiny instruct model's tokenizer with a wider random Qwen2 (about 60 MB of float32 weights)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shutil.copytree(TINY_CACHE / "qwen_instruct", folder, dirs_exist_ok=True)
    config = Qwen2Config.from_pretrained(folder)
    config.update({"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "layer_types": ["full_attention"] * 4})
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def _chat(settings: Settings) -> Any:
    engine = ChatEngine(load_qwen(settings, "qwen_instruct", CPU), max_running=4, cache_tokens=CHAT_CACHE_TOKENS)
    engine.generate([{"role": "user", "content": "Describe a dog"}], Sampling(8, 0.0, 1.0))
    return engine


def _sdxl(settings: Settings) -> Any:
    model = load_sdxl(settings, CPU)
    run_sdxl(model, prompt="a red cat", negative_prompt=None, width=256, height=256, steps=2, guidance_scale=5.0,
             seeds=[1, 2])
    return model


def _wan(settings: Settings) -> Any:
    model = load_wan(settings, CPU)
    run_wan(model, prompt="a cat on a beach", negative_prompt=None, width=64, height=64, num_frames=5, steps=2,
            guidance_scale=5.0, seed=7)
    return model


FAMILIES: dict[str, Callable[[Settings], Any]] = {"chat": _chat, "sdxl": _sdxl, "wan": _wan}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_unload_gives_the_memory_back(tiny: dict[str, Settings], family: str) -> None:
    probe = CpuProbe()
    if not probe.exact:
        pytest.skip("no /proc/self/clear_refs: the CPU probe is a lower bound here")
    load = FAMILIES[family]
    for _ in range(2):  # libraries' one-time memory (kernels, thread pools, imports): the idle context after
        load(tiny[family]).unload()
        gc.collect()
    idle = probe.held()
    model = load(tiny[family])
    loaded = probe.held()
    modules = [weakref.ref(m) for m in _modules(model)]
    model.unload()  # the object is still referenced here, as by the slot while it unloads
    after = probe.held()
    held_by_model = loaded - idle
    if family == "chat":
        assert held_by_model > 40 * MB, held_by_model  # the probe sees the model at all
    left = after - idle
    assert left < max(4 * MB, held_by_model // 10), \
        f"{family}: {left / MB:.1f} MB of {held_by_model / MB:.1f} MB still held after unload"
    assert modules and not [m for m in modules if m() is not None], f"{family}: a module outlived its unload"


def _modules(model: Any) -> list[torch.nn.Module]:
    """The top-level torch modules a loaded model holds (pipeline components, the chat model)."""
    if isinstance(model, ChatEngine):
        return [model.qwen.model]
    pipe = getattr(model, "t2i", None) or model.pipe
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
