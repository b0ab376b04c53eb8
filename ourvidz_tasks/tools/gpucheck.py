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
* ``service`` (``--service``; not in the default set): the service itself, rehearsed
  (:mod:`ourvidz_tasks.tools.gpuservice`): random weights in the loaders' on-disk layouts,
  Redis, the local sink and the real ``bin/worker sdxl|chat|wan`` on this device under a
  mixed workload; it needs the worker stack and a checkout (``devtools/sink.py``).

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[2]


class Report:
    """The JSON file, rewritten after every section (atomic rename); the sections an earlier run
    on the same card wrote are kept (``bin/gpu-check`` then ``bin/gpu-check --service``)."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        kept: dict[str, Any] = {}
        try:
            earlier = json.loads(path.read_text())
            if earlier.get("card") == header.get("card"):
                kept = dict(earlier.get("sections") or {})
        except (OSError, ValueError, AttributeError):
            pass
        self.data: dict[str, Any] = {**header, "sections": kept}
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


@dataclass(frozen=True)
class ServiceOptions:
    """The service section's: where the models go, for how long, at which size, where its table goes."""

    models_dir: Path | None = None
    minutes: float | None = None
    size: str | None = None  # "full" or "tiny"; default: full on CUDA, tiny on CPU
    results_md: Path | None = None
    work_dir: Path | None = None


def run(out: Path | None = None, *, device_name: str | None = None,
        sections: tuple[str, ...] = ("sdxl", "oom", "wan", "qwen"),
        service: ServiceOptions | None = None) -> dict[str, Any]:
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
            elif name == "service":
                result = service_section(device, card, service or ServiceOptions())
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


def service_section(device: torch.device, card: str, options: ServiceOptions) -> dict[str, Any]:
    """The service rehearsal (:mod:`ourvidz_tasks.tools.gpuservice`); on a card its table also goes
    into ``bench/RESULTS.md`` (elsewhere only into ``options.results_md`` when given)."""
    import tempfile

    from .gpuservice import render_table, run_service, write_results_md

    real = (options.size or ("full" if device.type == "cuda" else "tiny")) == "full"
    size = "full" if real else "tiny"
    models_dir = options.models_dir or Path(os.environ.get("OURVIDZ_GPUCHECK_MODELS")
                                            or Path.home() / ".cache" / "ourvidz-gpucheck")
    minutes = options.minutes if options.minutes is not None else (8.0 if real else 1.0)
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="ourvidz-gpucheck-service-"))
    print(f"gpu-check service: {size} models under {models_dir / size}, {minutes:g} min of workload, "
          f"logs in {work}", flush=True)
    result = run_service(device, models_dir=models_dir / size, seconds=minutes * 60, real=real, work=work)
    result["logs"] = str(work)
    s = result.get("summary") or {}
    wrong = {k: s.get(k) for k in ("not_ended", "ended_more_than_once", "oom_count", "failed") if s.get(k)}
    if wrong or not s.get("jobs"):
        result["error"] = f"service rehearsal: {wrong or 'no job ran'} (logs in {work})"
    target = options.results_md or (ROOT / "bench" / "RESULTS.md" if device.type == "cuda" else None)
    if target is not None:
        write_results_md(target, card, render_table(card, result))
        result["results_md"] = str(target)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/gpu-check", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, help="the JSON to write (default bench/results/gpu-<card>.json)")
    parser.add_argument("--device", help="cuda:N or cpu (default: the first GPU, else CPU)")
    parser.add_argument("--sections", default="sdxl,oom,wan,qwen", help="comma-separated subset (or 'service')")
    parser.add_argument("--service", action="store_true",
                        help="run only the service rehearsal (the 'service' section)")
    parser.add_argument("--models-dir", type=Path,
                        help="where the service's model folders are written once and reused "
                             "(default $OURVIDZ_GPUCHECK_MODELS, else ~/.cache/ourvidz-gpucheck)")
    parser.add_argument("--minutes", type=float, help="service workload time (default 8 on a card, 1 tiny)")
    parser.add_argument("--size", choices=("full", "tiny"), help="service model size (default: full on CUDA)")
    parser.add_argument("--results-md", type=Path,
                        help="the Markdown file the service's table goes into (default bench/RESULTS.md on a card)")
    parser.add_argument("--work-dir", type=Path, help="the service's logs and sink objects (default: a temp folder)")
    args = parser.parse_args(argv)
    sections = ("service",) if args.service else tuple(s for s in args.sections.split(",") if s)
    options = ServiceOptions(args.models_dir, args.minutes, args.size, args.results_md, args.work_dir)
    data = run(args.out, device_name=args.device, sections=sections, service=options)
    failed = [name for name, section in data["sections"].items() if name in sections and "error" in section]
    shown = {name: {k: v for k, v in s.items() if k not in ("trace", "jobs", "memory")}
             for name, s in data["sections"].items() if name in sections}
    print(json.dumps(shown, indent=1, default=str))
    print(f"gpu-check: {data['card']}: {len(sections) - len(failed)} section(s) ok"
          + (f", failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the workers run
    raise SystemExit(main())
