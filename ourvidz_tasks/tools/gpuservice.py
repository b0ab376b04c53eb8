"""``bin/gpu-check --service``: a rehearsal of the service itself on one device.

Writes random weights in the on-disk layouts the loaders read (:mod:`.gpulayouts`; full size on a
card, tiny on CPU), starts a private ``redis-server``, the local Supabase-compatible sink
(``devtools/sink.py``) and the real ``bin/worker sdxl``, ``bin/worker chat`` and ``bin/worker wan``
on one device, runs a seeded mixed workload (:mod:`.gpuworkload`) for at most the given time, and
records per-job latency, each pool's memory at every sample beside what the ledger holds for it,
OOMs (target 0), step-downs and the ledger's first estimate of each shape against the measured
working memory. The section's result goes into ``bin/gpu-check``'s JSON; :func:`render_table` is its
table for ``bench/RESULTS.md`` (:func:`write_results_md`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .gpulayouts import GIB, check_space, disk_needed, write_models
from .gpuworkload import REAL, TINY, MemoryReader, Sampler, Workload

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("sdxl", "chat", "wan")
HOST = "gpucheck"
#: what the operator may set for the rehearsal (memory knobs); every other OURVIDZ_ variable is the rehearsal's
PASSED = ("OURVIDZ_VRAM_BUDGET_MB", "OURVIDZ_MEMORY_CAP", "OURVIDZ_MEMORY_SLACK", "OURVIDZ_MEMORY_MARGIN_MB",
          "OURVIDZ_CUDA_CONTEXT_MB", "OURVIDZ_CHAT_CACHE_TOKENS", "OURVIDZ_TORCH_THREADS")
#: the ledger's budget on CPU (accounting only: the workers' first estimates are the real models')
CPU_BUDGET_MB = 65536


class Proc:
    """A child in its own session, its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as handle:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, ready: str, timeout: float) -> float:
        """Seconds until ``ready`` is in the log; RuntimeError when it exits or is late."""
        started = time.monotonic()
        while ready not in self.text():
            if self.proc.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"{self.name} not ready (exit {self.proc.poll()}): {self.text()[-1500:]}")
            time.sleep(0.2)
        return round(time.monotonic() - started, 1)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(base: dict[str, str], device: torch.device, models: dict[str, str], broker: str,
                sink_url: str) -> dict[str, str]:
    """The workers' (and the publisher's) environment: the operator's, less every OURVIDZ_ setting but
    the memory knobs of :data:`PASSED`, plus the rehearsal's own."""
    env = {k: v for k, v in base.items() if not k.startswith(("OURVIDZ_", "SUPABASE_", "JOB_CALLBACK"))
           or k in PASSED}
    env.update(models)
    env.update({
        "OURVIDZ_BROKER_URL": broker, "SUPABASE_URL": sink_url, "SUPABASE_SERVICE_KEY": "gpucheck-key",
        "JOB_CALLBACK_SECRET": "gpucheck-secret", "OURVIDZ_DEVICE": str(device), "OURVIDZ_HOSTNAME": HOST,
        "OURVIDZ_FETCH_ALLOW": "127.0.0.1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH", "")) if p),
    })
    if device.type == "cpu":
        env.setdefault("OURVIDZ_VRAM_BUDGET_MB", str(CPU_BUDGET_MB))
        env.setdefault("OURVIDZ_TORCH_THREADS", "1")
    return env


def run_service(device: torch.device, *, models_dir: Path, seconds: float, real: bool, work: Path,
                interval: float = 0.25, seed: int = 25) -> dict[str, Any]:
    """The rehearsal; its result (the JSON section). ``work``: logs and the sink's objects."""
    from ourvidz_tasks.contract.devices import canonical_device, node_name

    full = disk_needed(True)
    out: dict[str, Any] = {
        "size": "full" if real else "tiny", "models_dir": str(models_dir),
        "disk_needed_full_gib": {k: round(v / GIB, 2) for k, v in full.items()},
        "disk_needed_full_gib_total": round(sum(full.values()) / GIB, 2),
    }
    check_space(models_dir, real)
    if shutil.which("redis-server") is None:
        raise SystemExit("gpu-check service: needs redis-server (apt-get install redis-server); nothing was started")
    started = time.monotonic()
    models = write_models(models_dir, real, device)
    out["write_s"] = round(time.monotonic() - started, 1)
    procs: list[Proc] = []
    try:
        port = free_port()
        procs.append(Proc("redis-server", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                           "--appendonly", "no"], dict(os.environ), work / "redis.log"))
        procs[-1].wait_for("Ready to accept connections", 30)
        broker, sink_port = f"redis://127.0.0.1:{port}/0", free_port()
        env = service_env(dict(os.environ), device, models, broker, f"http://127.0.0.1:{sink_port}")
        os.environ.update({k: env[k] for k in ("OURVIDZ_BROKER_URL", "SUPABASE_URL", "SUPABASE_SERVICE_KEY",
                                                "JOB_CALLBACK_SECRET")})  # the publisher here
        procs.append(Proc("sink", [sys.executable, "-m", "devtools.sink", "--root", str(work / "storage"),
                                   "--port", str(sink_port)], env, work / "sink.log"))
        procs[-1].wait_for("sink listening", 30)
        workers = {family: Proc(f"worker {family}", [str(ROOT / "bin" / "worker"), family], env,
                                work / f"{family}.log") for family in FAMILIES}
        procs += workers.values()
        out["ready_s"] = {family: proc.wait_for(f"{node_name(family, HOST, str(device))} ready.",
                                                1200 if real else 600) for family, proc in workers.items()}
        out.update(_rehearse(device, workers, env, seconds, real, work, interval, seed, canonical_device(str(device))))
    finally:
        out["exit_codes"] = {proc.name: proc.stop() for proc in reversed(procs)}
    out["oom_log_lines"] = sum(_oom_lines(proc.text()) for proc in procs if proc.name.startswith("worker"))
    return out


def _rehearse(device: torch.device, workers: dict[str, Proc], env: dict[str, str], seconds: float, real: bool,
              work: Path, interval: float, seed: int, device_key: str) -> dict[str, Any]:
    import redis

    from ourvidz_tasks.runtime.ledger import Ledger
    from ourvidz_tasks.runtime.memprobe import default_budget

    store = redis.Redis.from_url(env["OURVIDZ_BROKER_URL"])
    budget = int(env.get("OURVIDZ_VRAM_BUDGET_MB") or default_budget(
        device, context_mb=int(env.get("OURVIDZ_CUDA_CONTEXT_MB", 768)),
        margin_mb=int(env.get("OURVIDZ_MEMORY_MARGIN_MB", 1024))).budget_mb)
    ledger = Ledger(store, HOST, device_key, budget)  # read here: holders, sizes, counters
    reader = MemoryReader((device.index or 0) if device.type == "cuda" else None)
    sampler = Sampler(reader, {f: p.proc.pid for f, p in workers.items()}, ledger.holders, interval)
    sampler.start()
    workload = Workload(REAL if real else TINY, env["SUPABASE_URL"], work / "storage", seed)
    started = time.monotonic()
    try:
        rounds = workload.run(seconds)
    finally:
        samples = sampler.stop()
    jobs = workload.outcome()
    status = ledger.status()
    return {
        "workload_s": round(time.monotonic() - started, 1), "rounds": rounds, "memory_source": reader.source,
        "jobs": jobs, "summary": summarize(jobs),
        "memory": {"interval_s": interval, "sample_errors": sampler.errors,
                   "pools": pool_memory(samples, device), "samples": samples},
        "estimates": estimate_errors(ledger, float(env.get("OURVIDZ_MEMORY_SLACK", 0.05)),
                                     int(env.get("OURVIDZ_CHAT_CACHE_TOKENS", 16384))),
        "ledger": {"budget_mb": status["budget_mb"], "switches_last_hour": status["switches_last_hour"],
                   "counters": status["counters"]},
        "workers_alive_at_end": {f: p.proc.poll() is None for f, p in workers.items()},
    }


def summarize(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts (ended once, OOMs, step-downs) and latency per kind."""
    kinds: dict[str, list[float]] = {}
    for job in jobs:
        if job["latency_s"] is not None:
            kinds.setdefault(job["kind"], []).append(job["latency_s"])
    return {
        "jobs": len(jobs), "ended_once": sum(j["terminal_callbacks"] == 1 for j in jobs),
        "not_ended": sum(j["terminal_callbacks"] == 0 for j in jobs),
        "ended_more_than_once": sum(j["terminal_callbacks"] > 1 for j in jobs),
        "completed": sum(j["status"] == "completed" for j in jobs),
        "failed": sum(j["status"] == "failed" for j in jobs),
        "oom_count": sum(j["error_code"] in ("OOM_ERROR", "OutOfMemory") for j in jobs),
        "step_downs": sum(bool(j["step_down"]) for j in jobs),
        "latency_s": {kind: {"n": len(v), "p50": round(statistics.median(v), 3), "max": round(max(v), 3)}
                      for kind, v in sorted(kinds.items())},
    }


def pool_memory(samples: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Per pool: the largest used and held, and used beyond held + the process's context allowance.

    The allowance on CUDA is the budget's per-pool context (``OURVIDZ_CUDA_CONTEXT_MB``: NVML counts
    the context, the ledger does not); on CPU the process's own idle memory, measured at the last
    sample (the pool idle, its one-time allocations made): resident memory less what it then held.
    """
    from ourvidz_tasks.contract.settings import load_settings

    out: dict[str, Any] = {}
    for pool in FAMILIES:
        series = [(s["pools"][pool]["used_mb"], s["pools"][pool]["held_mb"]) for s in samples
                  if s["pools"].get(pool, {}).get("used_mb") is not None]
        if not series:
            out[pool] = {"samples": 0}
            continue
        if device.type == "cuda":
            context = float(load_settings().cuda_context_mb)
        else:
            context = max(0.0, series[-1][0] - series[-1][1])
        over = [used - held - context for used, held in series]
        out[pool] = {"samples": len(series), "used_max_mb": max(u for u, _ in series),
                     "held_max_mb": max(h for _, h in series), "context_mb": round(context, 1),
                     "over_max_mb": round(max(over), 1), "samples_over": sum(o > 0 for o in over)}
    return out


def estimate_errors(ledger: Any, slack: float, cache_tokens: int) -> list[dict[str, Any]]:
    """Each measured shape: the ledger's first estimate of its working memory (nothing measured yet:
    the shape model, :mod:`ourvidz_tasks.models.memplan`) against the first measurement on this device."""
    from ourvidz_tasks.runtime.estimates import MeasuredSizes, first_estimate

    scratch = MeasuredSizes(ledger.redis, "gpucheck:nothing-measured")
    rows = []
    for model in ("sdxl", "qwen_instruct", "wan"):
        known = ledger.sizes(model)
        first = first_estimate(model, slack=slack, shape=f"tokens:{cache_tokens}" if model.startswith("qwen") else None)
        held = first["default_mb"] - first["default_work_mb"]
        for shape, measured in sorted(known["first"].items()):
            work = scratch.estimate(model, first["default_mb"], shape, default_work_mb=first["default_work_mb"]) - held
            rows.append({"model": model, "shape": shape, "first_estimate_work_mb": work, "measured_first_mb": measured,
                         "measured_recent_mb": known["work"].get(shape),
                         "error": round(measured / work - 1, 3) if work > 0 else None})
    return rows


def _oom_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if "OOM_ERROR" in line or "out of memory" in line.lower())


# -- the table --------------------------------------------------------------------------------


def render_table(card: str, result: dict[str, Any]) -> str:
    """The section as Markdown for ``bench/RESULTS.md``."""
    s = result.get("summary", {})
    lines = [f"### Service rehearsal on {card} ({result.get('size')} size, `bin/gpu-check --service`)", "",
             f"{result.get('rounds')} rounds in {result.get('workload_s')} s; models written in {result.get('write_s')} s "
             f"(full size needs {result.get('disk_needed_full_gib_total')} GiB of disk); workers ready in "
             f"{result.get('ready_s')} s; memory from {result.get('memory_source')}.", "",
             "| figure | value |", "|---|---|",
             f"| jobs ended exactly once | {s.get('ended_once')} / {s.get('jobs')} (not ended {s.get('not_ended')}, "
             f"twice or more {s.get('ended_more_than_once')}) |",
             f"| completed / failed | {s.get('completed')} / {s.get('failed')} |",
             f"| OOM count (target 0) | {s.get('oom_count')} |", f"| step-downs | {s.get('step_downs')} |"]
    for kind, lat in (s.get("latency_s") or {}).items():
        lines.append(f"| latency {kind} (n={lat['n']}) | p50 {lat['p50']} s, max {lat['max']} s |")
    for pool, mem in (result.get("memory", {}).get("pools") or {}).items():
        if mem.get("samples"):
            lines.append(f"| {pool}: used / held max (MB), over held + context {mem['context_mb']} MB | "
                         f"{mem['used_max_mb']} / {mem['held_max_mb']}, max over {mem['over_max_mb']} MB in "
                         f"{mem['samples_over']} of {mem['samples']} samples |")
    for row in result.get("estimates") or []:
        lines.append(f"| first estimate {row['model']} {row['shape']}: estimated / measured work (MB) | "
                     f"{row['first_estimate_work_mb']} / {row['measured_first_mb']} (error {row['error']}) |")
    return "\n".join(lines) + "\n"


def write_results_md(path: Path, card: str, table: str) -> None:
    """Put ``table`` between this card's markers in ``path`` (appended the first time)."""
    begin, end = f"<!-- gpu-check service {card}: begin -->", f"<!-- gpu-check service {card}: end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{table}{end}\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        text = head + block + rest.partition(end)[2].lstrip("\n")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block
    path.write_text(text)
