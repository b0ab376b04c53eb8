"""Real model sizes: published configs counted on the meta device, committed as data, planned per card."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import redis

from ourvidz_tasks.models import memplan, sizes
from ourvidz_tasks.runtime.estimates import MeasuredSizes, first_estimate

#: published parameter counts (model cards, papers) and how close the derived count must be
PUBLISHED = {
    "sdxl_unet": (2.57e9, 0.01),
    "qwen2_5_7b": (7.62e9, 0.01),
    "wan_t2v_transformer": (1.42e9, 0.01),
    "wan_vace_transformer": (2.15e9, 0.01),
    "umt5_xxl_encoder": (5.68e9, 0.01),
    "clip_l_text": (123e6, 0.01),
    "openclip_bigg_text": (695e6, 0.01),
    "sdxl_vae": (83.7e6, 0.01),
}


def _committed_counts(data: dict) -> dict[str, int]:
    fam = data["families"]
    part = {(f, c["name"]): c["params"] for f, v in fam.items() for c in v["components"]}
    return {
        "sdxl_unet": part[("sdxl", "unet")],
        "qwen2_5_7b": fam["qwen_instruct"]["params"],
        "wan_t2v_transformer": data["extra"]["wan_t2v_transformer"]["params"],
        "wan_vace_transformer": part[("wan", "transformer")],
        "umt5_xxl_encoder": part[("wan", "text_encoder")],
        "clip_l_text": part[("sdxl", "text_encoder")],
        "openclip_bigg_text": part[("sdxl", "text_encoder_2")],
        "sdxl_vae": part[("sdxl", "vae")],
    }


def test_committed_counts_match_published() -> None:
    counts = _committed_counts(memplan.sizes())
    for name, (published, tolerance) in PUBLISHED.items():
        assert abs(counts[name] - published) / published < tolerance, (name, counts[name], published)
    fam = memplan.sizes()["families"]
    assert fam["qwen_base"]["params"] == fam["qwen_instruct"]["params"]
    # half precision weights: two bytes a parameter (plus small buffers); the Wan VAE stays float32
    unet = fam["sdxl"]["components"][0]
    assert unet["weights_bytes"] == 2 * unet["params"] + 2 * unet["buffers"]
    wan_vae = next(c for c in fam["wan"]["components"] if c["name"] == "vae")
    assert wan_vae["dtype"] == "float32" and wan_vae["weights_bytes"] == 4 * wan_vae["params"]


@pytest.mark.slow
def test_meta_derivation_reproduces_committed_data() -> None:
    """Building every config on the meta device gives exactly the committed counts."""
    derived = sizes.derive()
    committed = memplan.sizes()
    assert _committed_counts(derived) == _committed_counts(committed)
    for family, value in derived["families"].items():
        assert value["weights_bytes"] == committed["families"][family]["weights_bytes"], family


def test_estimates_follow_shapes() -> None:
    one, six = memplan.estimate("sdxl", "1024x1024x1"), memplan.estimate("sdxl", "1024x1024x6")
    assert one.weights_mb == six.weights_mb and six.work_mb > 5 * one.work_mb
    assert memplan.estimate_mb("wan", "480x832x81") > memplan.estimate_mb("wan", "480x832x17")
    assert memplan.estimate_mb("chat", "tokens:32768") > memplan.estimate_mb("chat", "tokens:1024")
    # the 7B chat model in bf16 is ~14.5 GB of weights: more than the 15 GB first estimate left room for
    assert memplan.estimate("qwen_instruct").weights_mb > 14000
    for bad in ("1024x1024", "tokens:x", ""):
        with pytest.raises(ValueError):
            memplan.work_bytes("sdxl" if "x" in bad else "qwen_instruct", bad or "nope")
    with pytest.raises(ValueError, match="unknown model"):
        memplan.estimate_mb("flux")


def test_chat_shape_follows_the_engine() -> None:
    from ourvidz_tasks.contract.settings import Settings
    from ourvidz_tasks.models import chat_engine

    assert memplan.CHAT_PREFILL_TOKENS == chat_engine.MAX_BATCH_TOKENS
    assert memplan.SHAPES["qwen_instruct"][0] == f"tokens:{Settings.model_fields['chat_cache_tokens'].default}"


def test_chat_constants_follow_the_engine_and_settings() -> None:
    from ourvidz_tasks.contract.settings import Settings
    from ourvidz_tasks.models import chat_engine

    assert memplan.CHAT_PAGE_TOKENS == chat_engine.PAGE_SIZE
    assert Settings.model_fields["chat_concurrency"].default == memplan.CHAT_CONCURRENCY


def test_the_chat_kv_cache_is_reserved_once(store: redis.Redis) -> None:
    """Issue 25.6: after a load the engine's preallocation is in the measured weights (``nbytes``), so the
    working memory of the default shape no longer adds it again: the reservation stays the first estimate."""
    first = first_estimate("qwen_instruct", slack=memplan.SLACK)
    plan = memplan.estimate("qwen_instruct")
    assert plan.held_mb > 1000 and first["default_work_mb"] == plan.work_mb - plan.held_mb < 200
    # 16384 tokens of Qwen2.5-7B KV cache (28 layers x 4 KV heads x 128 x K,V x bf16 = 56 KiB a token) is 896 MiB;
    # with the SDPA read-back, one step and the mask transformers plans about 1.18 GB; no 512 full logits rows
    assert 1150 < plan.held_mb < 1200
    sizes_key = f"ourvidz:test:sizes:{uuid.uuid4().hex[:8]}"
    measured = MeasuredSizes(store, sizes_key, slack=memplan.SLACK)
    try:
        measured.record_weights("qwen_instruct", plan.weights_mb + plan.held_mb)  # what ChatEngine.nbytes() says
        after_load = measured.estimate("qwen_instruct", first["default_mb"], default_work_mb=first["default_work_mb"])
        assert abs(after_load - first["default_mb"]) <= 2, (after_load, first)
    finally:
        store.delete(sizes_key)


def test_a_chat_pool_reserves_the_cache_it_is_configured_to_allocate() -> None:
    small, default = first_estimate("qwen_instruct", shape="tokens:4096"), first_estimate("qwen_instruct")
    assert default == first_estimate("qwen_instruct", shape="tokens:16384")
    # 12288 tokens fewer: 12288 x (56 KiB of KV + 15 KiB read back + 2 B x 512 of mask) about 870 MB less
    assert 800 < default["default_mb"] - small["default_mb"] < 950


def test_budget_leaves_contexts_and_margin() -> None:
    assert memplan.budget_mb(49152, 3) == 49152 - 3 * memplan.CUDA_CONTEXT_MB - memplan.SAFETY_MARGIN_MB


def test_plan_80_keeps_all_three_resident_48_does_not() -> None:
    p80, p48 = memplan.plan(memplan.card_mib("h100-80gb")), memplan.plan(memplan.card_mib("l40s"))
    all3 = ["sdxl", "qwen_instruct", "wan"]
    assert next(s for s in p80["resident"] if s["models"] == all3)["fits_default"]
    assert not next(s for s in p48["resident"] if s["models"] == all3)["fits_default"]
    assert all(s["fits_default"] for s in p48["resident"] if len(s["models"]) < 3)


def test_memory_plan_cli_runs_without_torch(tmp_path) -> None:
    """``ourvidz memory plan`` reads committed data only: it works where torch can't be imported."""
    blocker = tmp_path / "torch.py"
    blocker.write_text("raise ImportError('no torch here')\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from ourvidz_tasks.tools.cli import main; "
            "sys.exit(main(['memory', 'plan'] + sys.argv[2:]))")
    text = subprocess.run([sys.executable, "-c", code, str(tmp_path), "--card", "l40s"], capture_output=True,
                          text=True, check=True, timeout=120).stdout
    assert "budget" in text and "sdxl + qwen_instruct + wan" in text and "1024x1024x6" in text
    assert "card 46068 MB" in text  # what an L40S reports, not 48 x 1024
    raw = subprocess.run([sys.executable, "-c", code, str(tmp_path), "--card-mib", "81559", "--json"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    data = json.loads(raw)
    assert data["card_mb"] == 81559 and data["budget_mb"] < data["card_mb"]
    nominal = subprocess.run([sys.executable, "-c", code, str(tmp_path), "--card-gb", "48", "--json"],
                             capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(nominal.stdout)["card_mb"] == 49152 and "--card-mib" in nominal.stderr  # told it is nominal


def test_memory_plan_needs_a_card_size(capsys: pytest.CaptureFixture[str]) -> None:
    from ourvidz_tasks.tools.cli import main

    for argv in (["memory", "plan"], ["memory", "plan", "--card-gb", "0"], ["memory", "plan", "--card", "gtx"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "--card" in capsys.readouterr().err
