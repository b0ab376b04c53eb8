"""The Qwen loaders and chat generation, on real tiny models built offline."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import torch

from ourvidz_tasks.contract.errors import ConfigError, InvalidJob, ModelLoadError
from ourvidz_tasks.contract.settings import Settings, load_settings
from ourvidz_tasks.models.qwen import (
    IM_END,
    QwenModel,
    QwenName,
    build_tiny,
    generate_chat,
    load_qwen,
    render_prompt,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

CPU = torch.device("cpu")
NAMES: list[QwenName] = ["qwen_instruct", "qwen_base"]
#: tokens/s a tiny Qwen makes at least on one busy CPU core (measured 35-57 on 2 shared cores)
MIN_TINY_TOKENS_PER_S = 5
MESSAGES = [
    {"role": "system", "content": "You enhance prompts."},
    {"role": "user", "content": "A cat on a beach at sunset, golden light"},
]


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(model_source="tiny", tiny_cache=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def models(tiny_settings: Settings) -> Iterator[dict[str, QwenModel]]:
    loaded: dict[str, QwenModel] = {name: load_qwen(tiny_settings, name, CPU) for name in NAMES}
    yield loaded
    for model in loaded.values():
        model.unload()


# -- build and load ------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_tiny_builds_and_loads_offline(name: QwenName, models: dict[str, QwenModel], tiny_settings: Settings) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

    folder = tiny_settings.tiny_cache / name
    for file in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / file).is_file(), file
    # The folder is an ordinary transformers checkpoint.
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.config.vocab_size == len(tokenizer) <= 4096
    assert {"<|endoftext|>", "<|im_start|>", IM_END} <= set(tokenizer.all_special_tokens)
    assert tokenizer.eos_token == (IM_END if name == "qwen_instruct" else "<|endoftext|>")

    loaded = models[name]
    assert isinstance(loaded.model, Qwen2ForCausalLM)
    assert loaded.name == name and loaded.device == CPU
    assert loaded.source == f"tiny:{folder}"
    assert loaded.model.dtype == torch.float32
    assert not loaded.model.training
    assert loaded.nbytes() > 0


def test_tiny_build_is_reproducible(tmp_path: Path, tiny_settings: Settings, models: dict[str, QwenModel]) -> None:
    build_tiny(tmp_path / "again", "qwen_instruct")
    for file in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "again" / file).read_bytes() == (tiny_settings.tiny_cache / "qwen_instruct" / file).read_bytes()
    # The two models are different (seed 0 and seed 1).
    a = models["qwen_instruct"].model.state_dict()["model.embed_tokens.weight"]
    b = models["qwen_base"].model.state_dict()["model.embed_tokens.weight"]
    assert not torch.equal(a, b)


def test_tokenizer_handles_real_text(models: dict[str, QwenModel]) -> None:
    tokenizer = models["qwen_instruct"].tokenizer
    text = "A portrait of a woman, soft light — naïve café 🐱 日本語\n\tend"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned
    assert tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == tokenizer.convert_tokens_to_ids(
        "<|im_start|>"
    )


# -- rendering -----------------------------------------------------------------


def test_instruct_renders_chatml(models: dict[str, QwenModel]) -> None:
    assert render_prompt(models["qwen_instruct"], MESSAGES) == (
        "<|im_start|>system\nYou enhance prompts.<|im_end|>\n"
        "<|im_start|>user\nA cat on a beach at sunset, golden light<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # No system prompt is invented when the caller sends none.
    assert render_prompt(models["qwen_instruct"], MESSAGES[1:]) == (
        "<|im_start|>user\nA cat on a beach at sunset, golden light<|im_end|>\n<|im_start|>assistant\n"
    )


def test_base_renders_the_same_turns(models: dict[str, QwenModel]) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    assert render_prompt(models["qwen_base"], messages) == render_prompt(models["qwen_instruct"], messages)
    assert render_prompt(models["qwen_base"], MESSAGES[1:]).startswith("<|im_start|>user\n")


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "robot", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 3}]],
)
def test_bad_messages_are_invalid_jobs(messages: list[dict[str, str]], models: dict[str, QwenModel]) -> None:
    with pytest.raises(InvalidJob, match="messages"):
        render_prompt(models["qwen_base"], messages)


# -- generation ----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_generate_returns_text_and_counts(name: QwenName, models: dict[str, QwenModel]) -> None:
    from transformers import GenerationMixin

    model = models[name]
    out = generate_chat(model, MESSAGES, max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    prompt_ids = model.tokenizer(render_prompt(model, MESSAGES), add_special_tokens=False)["input_ids"]
    assert out.prompt_tokens == len(prompt_ids)
    assert 1 <= out.completion_tokens <= 12
    assert isinstance(out.response, str) and out.response
    assert out.finish_reason in ("stop", "length")
    assert out.generation_time > 0
    # The counts are those of model.generate itself.
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        greedy = cast(GenerationMixin, model.model).generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    out = generate_chat(model, MESSAGES, max_tokens=5, temperature=0, top_p=1.0)
    assert out.completion_tokens == greedy.shape[1] - len(prompt_ids)
    assert out.response == model.tokenizer.decode(greedy[0, len(prompt_ids) :], skip_special_tokens=True)


@pytest.mark.parametrize("name", NAMES)
def test_max_tokens_stops_at_length(name: QwenName, models: dict[str, QwenModel]) -> None:
    out = generate_chat(models[name], MESSAGES, max_tokens=3, temperature=0, top_p=1.0)
    assert out.completion_tokens == 3
    assert out.finish_reason == "length"
    out = generate_chat(models[name], MESSAGES, max_tokens=3, temperature=1.0, top_p=1.0, seed=3)
    assert out.completion_tokens <= 3


def test_end_token_gives_stop(models: dict[str, QwenModel]) -> None:
    model = models["qwen_instruct"]
    first = model.tokenizer(
        generate_chat(model, MESSAGES, max_tokens=1, temperature=0, top_p=1.0).response, add_special_tokens=False
    )["input_ids"][0]
    # A copy whose end token is the one greedy decoding makes first.
    inner = model.model.__class__(model.model.config)
    inner.load_state_dict(model.model.state_dict())
    inner.eval()
    inner.generation_config.eos_token_id = [first]
    copy = dataclasses.replace(model, model=inner)
    out = generate_chat(copy, MESSAGES, max_tokens=1, temperature=0, top_p=1.0)
    assert (out.completion_tokens, out.finish_reason) == (1, "stop")
    out = generate_chat(copy, MESSAGES, max_tokens=8, temperature=0, top_p=1.0)
    assert (out.completion_tokens, out.finish_reason) == (1, "stop")


@pytest.mark.parametrize("name", NAMES)
def test_seed_makes_sampling_reproducible(name: QwenName, models: dict[str, QwenModel]) -> None:
    model = models[name]
    before = torch.get_rng_state()
    first = generate_chat(model, MESSAGES, max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    again = generate_chat(model, MESSAGES, max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    other = generate_chat(model, MESSAGES, max_tokens=16, temperature=1.0, top_p=0.95, seed=4321)
    assert first.response == again.response
    assert first.response != other.response
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is left alone


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_bad_arguments_are_invalid_jobs(kwargs: dict[str, object], field: str, models: dict[str, QwenModel]) -> None:
    args: dict[str, object] = {"max_tokens": 4, "temperature": 0.5, "top_p": 0.9, **kwargs}
    with pytest.raises(InvalidJob, match=field):
        generate_chat(models["qwen_base"], MESSAGES, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_tokens_per_second_on_cpu(name: QwenName, models: dict[str, QwenModel]) -> None:
    model = models[name]
    generate_chat(model, MESSAGES, max_tokens=4, temperature=0, top_p=1.0)  # warm up
    started = time.perf_counter()
    out = generate_chat(model, MESSAGES, max_tokens=64, temperature=0.7, top_p=0.9, seed=0)
    wall = time.perf_counter() - started
    rate = out.completion_tokens / out.generation_time
    print(f"\n{name} tiny on CPU: {out.completion_tokens} tokens in {out.generation_time:.3f}s = {rate:.0f} tokens/s")
    # the rate's parts are real: 64 new tokens made (seeded), timed around generation only, within the call
    assert out.completion_tokens == 64 and out.finish_reason == "length"
    assert 0.5 * wall <= out.generation_time <= wall, (out.generation_time, wall)
    assert rate >= MIN_TINY_TOKENS_PER_S, f"{rate:.1f} tokens/s"


# -- errors and unloading -------------------------------------------------------


@pytest.mark.parametrize(("name", "env"), [("qwen_instruct", "OURVIDZ_QWEN_INSTRUCT_MODEL"), ("qwen_base", "OURVIDZ_QWEN_BASE_MODEL")])
def test_missing_local_path_is_config_error(name: QwenName, env: str, tmp_path: Path) -> None:
    unset = load_settings(model_source="local", qwen_instruct_model=None, qwen_base_model=None)
    with pytest.raises(ConfigError, match=env):
        load_qwen(unset, name, CPU)
    gone = tmp_path / "nothing"
    absent = load_settings(model_source="local", qwen_instruct_model=gone, qwen_base_model=gone)
    with pytest.raises(ConfigError, match=env):
        load_qwen(absent, name, CPU)


@pytest.mark.parametrize("damage", ["config", "weights", "empty"])
def test_corrupt_folder_is_model_load_error(damage: str, tmp_path: Path, tiny_settings: Settings, models: dict[str, QwenModel]) -> None:
    folder = tmp_path / "qwen"
    shutil.copytree(tiny_settings.tiny_cache / "qwen_base", folder)
    if damage == "config":
        (folder / "config.json").write_text("{not json")
    elif damage == "weights":
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    else:
        for file in folder.iterdir():
            file.unlink()
    settings = load_settings(model_source="local", qwen_base_model=folder)
    with pytest.raises(ModelLoadError, match="qwen_base") as info:
        load_qwen(settings, "qwen_base", CPU)
    assert len(info.value.message) < 400


def test_local_source_loads_the_same_folder(tiny_settings: Settings, models: dict[str, QwenModel]) -> None:
    folder = tiny_settings.tiny_cache / "qwen_instruct"
    local = load_qwen(load_settings(model_source="local", qwen_instruct_model=folder), "qwen_instruct", CPU)
    assert local.source == f"local:{folder}"
    a = generate_chat(local, MESSAGES, max_tokens=6, temperature=0.9, top_p=0.9, seed=5)
    b = generate_chat(models["qwen_instruct"], MESSAGES, max_tokens=6, temperature=0.9, top_p=0.9, seed=5)
    assert a == dataclasses.replace(b, generation_time=a.generation_time)
    size = local.nbytes()
    assert local.unload() == size > 0
    assert local.nbytes() == 0
    assert local.unload() == 0
    with pytest.raises(ModelLoadError, match="unloaded"):
        generate_chat(local, MESSAGES, max_tokens=2, temperature=0, top_p=1.0)
