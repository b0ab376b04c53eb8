"""``bin/gpu-check``: what the three families really do on this machine's GPU, in a few minutes.

Needs only torch, diffusers and transformers (no broker, no Redis, no
weights, no setup step): every model is built with random weights at full
size from the real configs committed in ``models/configs/`` (scaled
initialisation, so half precision stays finite). Sections:

* ``sdxl``: UNet + VAE at 1024² (fp16, VAE upcast to fp32 to decode),
  batch 1 and 6, three guided steps each, then the decode.
* ``wan``: Wan2.1 VACE-1.3B transformer + VAE at 480x832, 81 frames (bf16,
  VAE in fp32), two guided steps, then the decode.
* ``qwen``: Qwen2.5-7B greedy decode at batch 1 and 8 (bf16).
* ``oom``: a real out-of-memory under a memory cap
  (``set_per_process_memory_fraction``), driven through the workers' own
  step-down path (:func:`~ourvidz_tasks.runtime.faults.step_down`).

Each shape reports it/s or tok/s, peak reserved memory beside the
ledger's first estimate for the same shape (:mod:`~ourvidz_tasks.models.memplan`),
a NaN / black-output check and host syncs per step
(``torch.cuda.set_sync_debug_mode``). Every section is written to the JSON
(``bench/results/gpu-<card>.json``) as soon as it ends, so a run cut off
still reports. Without CUDA the same sections run on the tiny models, with
the memory cap emulated through the attempt-hook seam, and it exits 0.
The sections themselves are in :mod:`ourvidz_tasks.tools.gpusections` (their tools in
:mod:`ourvidz_tasks.tools.gpubench`); this module runs them and writes the report. Importing
the package loads nothing else, so none of the broker stack is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[2]


class Report:
    """The JSON file, rewritten after every section (atomic rename)."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**header, "sections": {}}
        self.write()

    def add(self, name: str, result: dict[str, Any]) -> None:
        self.data["sections"][name] = result
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


# -- running -------------------------------------------------------------------------------------


def card_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return "cpu"


def default_out(card: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown"
    folder = ROOT / "bench" / ("results" if card != "cpu" else "out")
    return folder / f"gpu-{slug}.json"


def run(out: Path | None = None, *, device_name: str | None = None,
        sections: tuple[str, ...] = ("sdxl", "oom", "wan", "qwen")) -> dict[str, Any]:
    """Run the sections; returns the report (also written to ``out`` after each section)."""
    import diffusers
    import torch
    import transformers

    from .gpubench import REAL, TINY, free
    from .gpusections import SdxlBench, oom_section, qwen_section, sdxl_section, wan_section

    device = torch.device(device_name or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    plan = REAL if device.type == "cuda" else TINY
    card = card_name(device)
    header: dict[str, Any] = {
        "card": card, "device": str(device), "real_sizes": plan.real,
        "memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        if device.type == "cuda" else None,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "cuda": torch.version.cuda},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    report = Report(out or default_out(card), header)
    bench: SdxlBench | None = None
    batch1_peak: int | None = None
    for name in sections:
        started = time.perf_counter()
        try:
            if name == "sdxl":
                result, bench = sdxl_section(plan, device)
                batch1_peak = result["shapes"][0]["peak_reserved_mb"]
            elif name == "oom":
                bench = bench or SdxlBench(plan, device)
                result = oom_section(plan, device, bench, batch1_peak)
                bench = None
            elif name == "wan":
                result = wan_section(plan, device)
            elif name == "qwen":
                result = qwen_section(plan, device)
            else:
                raise ValueError(f"unknown section {name!r}")
        except Exception as exc:  # a section that fails is reported; the others still run
            result = {"error": f"{type(exc).__name__}: {exc}"[:500], "trace": traceback.format_exc()[-2000:]}
        if name == "oom" or "error" in result:
            bench = None
        result["seconds"] = round(time.perf_counter() - started, 2)
        report.add(name, result)
        free(device)
        print(f"gpu-check: {name} done in {result['seconds']}s" + (f" ({result['error']})" if "error" in result else ""),
              flush=True)
    report.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report.write()
    return report.data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/gpu-check", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, help="the JSON to write (default bench/results/gpu-<card>.json)")
    parser.add_argument("--device", help="cuda:N or cpu (default: the first GPU, else CPU)")
    parser.add_argument("--sections", default="sdxl,oom,wan,qwen", help="comma-separated subset")
    args = parser.parse_args(argv)
    data = run(args.out, device_name=args.device, sections=tuple(s for s in args.sections.split(",") if s))
    failed = [name for name, section in data["sections"].items() if "error" in section]
    print(json.dumps({name: {k: v for k, v in s.items() if k != "trace"} for name, s in data["sections"].items()},
                     indent=1, default=str))
    print(f"gpu-check: {data['card']}: {len(data['sections']) - len(failed)} section(s) ok"
          + (f", failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the workers run
    raise SystemExit(main())
