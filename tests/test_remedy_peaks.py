"""Issue 25.4: every rung of each family's out-of-memory ladder lowers the peak it steps down from.

The real ladders (:func:`~ourvidz_tasks.runtime.remedies.sdxl_ladder`, :func:`~.wan_ladder`) run
through :func:`~ourvidz_tasks.runtime.faults.step_down` with the tiny models: each rung runs the real
model call under the pool's own probe (on CPU the resident-memory high-water mark), and only then is
told it ran out of memory, so the next rung runs too. The frames are large enough for the VAE tiles to
matter (SDXL: 768² against 512 px tiles; WAN: 384² against its 256 px tiles).

Each ladder climbs in a fresh process, as a pool's is, after one warm-up call, with glibc mapping
every block of 128 KiB or more on its own (:func:`map_large_blocks`): resident memory then follows the
tensors alive, not the heap's history. Measured so, twice: SDXL 327/220/114 MB for batches of 3/2/1,
57 tiled, 54-55 offloaded; WAN 343 full, 176-177 tiled, 177 and 176-178 for the weight-moving rungs.
(In the test process, after many tests, one run measured WAN's tiling rung 4.6% under full.)

On CPU the rungs that move weights off the card (the text encoder after encoding, model CPU offload)
have no card to free: their peak is checked not to grow; what they free on a GPU is ``bin/gpu-check``'s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from typing import Any

import pytest
import torch

from ourvidz_tasks.contract.errors import OutOfMemory
from ourvidz_tasks.contract.settings import Settings, load_settings
from ourvidz_tasks.models.sdxl import load_sdxl, run_sdxl
from ourvidz_tasks.models.wan import load_wan, run_wan
from ourvidz_tasks.runtime.faults import Remedy, step_down
from ourvidz_tasks.runtime.memprobe import MB, CpuProbe
from ourvidz_tasks.runtime.remedies import DiffusionRemedies, sdxl_ladder, wan_ladder

from .support.env import TINY_CACHE

CPU = torch.device("cpu")
#: a rung that moves weights changes nothing on CPU: it may measure this much above the rung before
#: (the high-water mark of a process on a loaded 2-core machine: one full-suite run measured WAN's text
#: encoder rung 17% above the tiling rung before it; the rungs that must lower the peak lower it by more)
NOISE = 0.25
#: mallopt's parameter for the size from which blocks are mapped on their own
M_MMAP_THRESHOLD = -3


def tiny_settings() -> Settings:
    return load_settings(model_source="tiny", tiny_cache=TINY_CACHE, wan_kind="auto")


@pytest.fixture(scope="module")
def tiny() -> Settings:
    return tiny_settings()


@pytest.fixture
def exact_probe() -> None:
    if not CpuProbe().exact:
        pytest.skip("no /proc/self/clear_refs: the CPU probe is a lower bound here")


def in_a_fresh_process(peaks: Callable[[], list[tuple[str, int]]]) -> list[tuple[str, int]]:
    """``peaks()`` run in a new (spawned) Python process: a pool's heap, not this test process's."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=map_large_blocks) as pool:
        return pool.submit(peaks).result(timeout=600)


def map_large_blocks() -> None:
    """glibc gives every block of 128 KiB or more its own mapping, returned when freed: resident memory
    then follows the tensors alive. (By default glibc raises that threshold up to 32 MiB after a large
    free, and blocks below it stay in the heap once freed, so a rung's peak also counted the heap's holes:
    one run measured SDXL's batch of one 4.5% under the batch of two; most runs 14-29%.)"""
    libc = ctypes.util.find_library("c")
    if libc is None or not ctypes.CDLL(libc).mallopt(M_MMAP_THRESHOLD, 128 * 1024):
        raise OSError("mallopt(M_MMAP_THRESHOLD) unavailable or refused: the peaks would count the heap's holes")


def climb(ladder: list[Remedy], call: Callable[[Remedy], object], probe: CpuProbe, family: str,
          total: int) -> list[tuple[str, int]]:
    """Every rung of ``ladder``, each measured, each told it ran out of memory after its call but the last."""
    peaks: list[tuple[str, int]] = []
    call(ladder[0])  # warm-up: what the first call builds once is no rung's

    def run(remedy: Remedy) -> object:
        with probe.measure() as measured:
            value = call(remedy)
        peaks.append((f"{remedy.name}:{remedy.batch or total}", measured.bytes + measured.resident))
        if len(peaks) < len(ladder):
            raise torch.OutOfMemoryError("over the test's cap (raised after the rung's real call)")
        return value

    _, outcome = step_down(ladder, run, family=family, stage="test", total=total, device=CPU)
    assert outcome.remedy == ladder[-1].name and len(peaks) == len(ladder)
    return peaks


def check(peaks: list[tuple[str, int]], moves_weights: set[str]) -> None:
    table = ", ".join(f"{name} {peak / MB:.0f} MB" for name, peak in peaks)
    for (before, high), (rung, low) in pairwise(peaks):
        if rung.split(":")[0] in moves_weights:
            assert low <= high * (1 + NOISE) + 8 * MB, f"{rung} grew the peak of {before}: {table}"
        else:
            assert low < high * 0.95, f"{rung} did not lower the peak of {before}: {table}"


def sdxl_peaks() -> list[tuple[str, int]]:
    model = load_sdxl(tiny_settings(), CPU)
    seeds = [1, 2, 3]
    remedies = DiffusionRemedies(model.t2i, CPU, model.unload)

    def call(remedy: Remedy) -> list[Any]:
        size = remedy.batch or len(seeds)
        return [image for start in range(0, len(seeds), size)
                for image in run_sdxl(model, prompt="a red cat", negative_prompt=None, width=768, height=768,
                                      steps=1, guidance_scale=5.0, seeds=seeds[start:start + size])]

    try:
        ladder = sdxl_ladder(remedies, len(seeds))
        assert [r.name for r in ladder] == ["batch", "batch", "batch", "vae_tiling", "cpu_offload"]
        return climb(ladder, call, CpuProbe(), "sdxl", len(seeds))
    finally:
        remedies.restore()
        model.unload()


@pytest.mark.slow
def test_each_sdxl_rung_lowers_the_peak(exact_probe: None) -> None:
    check(in_a_fresh_process(sdxl_peaks), {"cpu_offload"})


def test_sdxl_tiles_at_1024_and_restores_its_tiles(tiny: Settings) -> None:
    model = load_sdxl(tiny, CPU)
    try:
        pipe: Any = model.t2i  # diffusers registers components dynamically
        vae = pipe.vae
        before = (vae.tile_sample_min_size, vae.tile_latent_min_size)
        assert before[0] >= 1024  # diffusers would start tiling only above 1024 px
        remedies = DiffusionRemedies(model.t2i, CPU, model.unload)
        remedies.vae_tiling()
        assert vae.use_tiling and vae.tile_sample_min_size == 512 and vae.tile_latent_min_size == 64
        remedies.restore()
        assert not vae.use_tiling and (vae.tile_sample_min_size, vae.tile_latent_min_size) == before
    finally:
        model.unload()


def wan_peaks() -> list[tuple[str, int]]:
    model = load_wan(tiny_settings(), CPU)
    remedies = DiffusionRemedies(model.pipe, CPU, model.unload)

    def call(remedy: Remedy) -> Any:
        return run_wan(model, prompt="a cat on a beach", negative_prompt=None, width=384, height=384, num_frames=5,
                       steps=1, guidance_scale=5.0, seed=7)

    try:
        ladder = wan_ladder(remedies)
        assert [r.name for r in ladder] == ["full", "vae_tiling", "text_encoder_offload", "cpu_offload"]
        return climb(ladder, call, CpuProbe(), "wan", 1)
    finally:
        remedies.restore()
        model.unload()


@pytest.mark.slow
def test_each_wan_rung_lowers_the_peak(exact_probe: None) -> None:
    check(in_a_fresh_process(wan_peaks), {"text_encoder_offload", "cpu_offload"})


def test_the_last_rung_out_of_memory_is_the_jobs(tiny: Settings) -> None:
    with pytest.raises(OutOfMemory):
        step_down([Remedy("only")], lambda _r: (_ for _ in ()).throw(torch.OutOfMemoryError("x")),
                  family="sdxl", stage="test", total=1, device=CPU)
