"""The service rehearsal's workload and its memory sampler (``bin/gpu-check --service``).

:class:`Workload`: seeded rounds of a mixed stream, published as the edge and the
publishers do (``ourvidz_tasks.publish``): SDXL txt2img batch 1 and 6, img2img from a
reference on the sink, WAN with reference frames, a burst of chats, an enhance → SDXL
chain. Each round is sent at once and waited for before the next, until the time is up;
every job's end is read back from the sink's callbacks (chats: their results).

:class:`Sampler`: each pool process's memory at every sample beside what the ledger holds
for that pool: NVML's per-process used memory on CUDA (``pynvml`` when importable, else
``nvidia-smi``), the process's resident memory (``/proc``) on CPU.
"""

from __future__ import annotations

import io
import random
import re
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MB = 2**20
PUBLIC = "/storage/v1/object/public/"


@dataclass(frozen=True)
class Shapes:
    """The job shapes of one rehearsal: the real ones on a card, small ones on the tiny models."""

    sdxl_size: int
    sdxl_steps: int
    wan: tuple[int, int, int]  # width, height, frames
    wan_steps: int
    chat_burst: int
    chat_tokens: int
    job_timeout: float


REAL = Shapes(1024, 8, (832, 480, 81), 6, 8, 64, 900.0)
TINY = Shapes(128, 2, (32, 32, 5), 2, 4, 16, 300.0)


@dataclass
class Sent:
    """One thing published: a job (ends in a terminal callback) or a chat (ends in its result)."""

    kind: str
    id: str
    shape: str
    sent_at: float
    result: Any = None
    ended_at: float | None = None
    body: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, terminals: int) -> dict[str, Any]:
        error = self.body.get("error") or {}
        meta = self.body.get("metadata") or {}
        return {"kind": self.kind, "id": self.id, "shape": self.shape, "status": self.body.get("status"),
                "error_code": error.get("code"), "terminal_callbacks": terminals,
                "latency_s": None if self.ended_at is None else round(self.ended_at - self.sent_at, 3),
                "step_down": meta.get("oom_step_down")}


class Workload:
    """Publishes rounds and waits for them; ``sink_url``/``sink_root``: the local sink."""

    def __init__(self, shapes: Shapes, sink_url: str, sink_root: Path, seed: int = 25) -> None:
        self.shapes, self.sink_url, self.sink_root = shapes, sink_url, sink_root
        self.rng = random.Random(seed)
        self.sent: list[Sent] = []
        self.http = httpx.Client(timeout=30)

    # -- references ---------------------------------------------------------------------------

    def reference(self, name: str, width: int, height: int) -> str:
        """A two-colour PNG stored on the sink; its public URL."""
        from PIL import Image

        left = tuple(self.rng.randrange(256) for _ in range(3))
        right = tuple(self.rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", (width, height), left)  # type: ignore[arg-type]
        image.paste(right, (width // 2, 0, width, height))  # type: ignore[arg-type]
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        target = self.sink_root / "refs" / "gpucheck" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(buffer.getvalue())
        target.with_name(target.name + ".content-type").write_text("image/png")
        return f"{self.sink_url}{PUBLIC}refs/gpucheck/{name}"

    # -- one round ------------------------------------------------------------------------------

    def jobs(self, round_no: int) -> list[tuple[str, dict[str, Any]]]:
        """The round's jobs, shuffled: (kind, payload)."""
        s, rng = self.shapes, self.rng
        size = f"{s.sdxl_size}x{s.sdxl_size}"

        def sdxl(count: int, **metadata: Any) -> dict[str, Any]:
            return {"id": uuid.uuid4().hex, "type": "sdxl_image_fast", "user_id": "gpucheck",
                    "prompt": "a lighthouse on a cliff at dawn", "metadata": metadata,
                    "config": {"resolution": size, "num_images": count, "num_inference_steps": s.sdxl_steps,
                               "seed": rng.randrange(2**31)}}

        width, height, frames = s.wan
        mode = rng.choice(("start", "end", "both", "single"))
        refs = {"start": ("first_frame",), "end": ("last_frame",), "both": ("first_frame", "last_frame"),
                "single": ("image",)}[mode]
        wan = {"id": uuid.uuid4().hex, "type": "video_fast", "user_id": "gpucheck", "prompt": "waves on a beach",
               "config": {"width": width, "height": height, "frames": frames, "fps": 16, "reference_mode": mode,
                          "num_inference_steps": s.wan_steps, "seed": rng.randrange(2**31),
                          **{key: self.reference(f"{round_no}-{key}.png", width, height) for key in refs}}}
        i2i = sdxl(1, reference_image_url=self.reference(f"{round_no}-i2i.png", s.sdxl_size, s.sdxl_size),
                   denoise_strength=0.6)
        enhanced = sdxl(1, enhance={"system_prompt": "Rewrite the prompt with more visual detail.",
                                    "max_tokens": s.chat_tokens})
        chats = [("chat", {"messages": [{"role": "user", "content": f"Describe scene {round_no}.{i}."}],
                           "max_tokens": s.chat_tokens, "seed": rng.randrange(2**31)}) for i in range(s.chat_burst)]
        jobs = [("txt2img_b1", sdxl(1)), ("txt2img_b6", sdxl(6)), ("img2img", i2i), (f"wan_{mode}", wan),
                ("enhance_sdxl", enhanced), *chats]
        rng.shuffle(jobs)
        return jobs

    def send(self, kind: str, payload: dict[str, Any]) -> Sent:
        from celery import chain

        from ourvidz_tasks.publish import chat, enhance, sdxl_generate, wan_generate

        now = time.time()
        if kind == "chat":
            return Sent(kind, uuid.uuid4().hex, f"tokens:{payload['max_tokens']}", now, chat.delay(payload))
        c = payload["config"]
        shape = f"{c['width']}x{c['height']}x{c['frames']}" if "width" in c else f"{c['resolution']}x{c['num_images']}"
        if kind == "enhance_sdxl":
            chain(enhance.s(payload), sdxl_generate.s()).apply_async()
        else:
            (wan_generate if kind.startswith("wan") else sdxl_generate).delay(payload)
        return Sent(kind, payload["id"], shape, now)

    def run_round(self, round_no: int) -> list[Sent]:
        """Send one round at once; wait until each ended or its time is up."""
        batch = [self.send(kind, payload) for kind, payload in self.jobs(round_no)]
        self.sent += batch
        deadline = time.time() + self.shapes.job_timeout
        while time.time() < deadline and any(s.ended_at is None for s in batch):
            self.poll(batch)
            time.sleep(0.2)
        return batch

    def poll(self, batch: list[Sent]) -> None:
        calls = self.callbacks()
        for sent in batch:
            if sent.ended_at is not None:
                continue
            if sent.result is not None:
                if sent.result.ready():
                    sent.ended_at = time.time()
                    failed = sent.result.failed()
                    value = sent.result.result
                    sent.body = {"status": "failed" if failed else "completed",
                                 **({"error": {"code": type(value).__name__, "message": str(value)[:200]}}
                                    if failed else {})}
                continue
            for call in calls:
                body = call["body"]
                if body.get("job_id") == sent.id and body.get("status") in ("completed", "failed"):
                    sent.ended_at, sent.body = float(call["at"]), body
                    break

    def callbacks(self) -> list[dict[str, Any]]:
        response = self.http.get(f"{self.sink_url}/_sink/callbacks")
        response.raise_for_status()
        calls: list[dict[str, Any]] = response.json()
        return calls

    def run(self, seconds: float) -> int:
        """Rounds until ``seconds`` have passed (a round started is finished); how many ran."""
        started, rounds = time.monotonic(), 0
        while time.monotonic() - started < seconds:
            self.run_round(rounds)
            rounds += 1
        return rounds

    def outcome(self) -> list[dict[str, Any]]:
        """Every job and chat: how it ended and how many terminal callbacks it got."""
        calls = self.callbacks()
        terminals: dict[str, int] = {}
        for call in calls:
            body = call["body"]
            if body.get("status") in ("completed", "failed"):
                terminals[body.get("job_id", "")] = terminals.get(body.get("job_id", ""), 0) + 1
        return [s.as_dict(terminals.get(s.id, 0) if s.result is None else int(s.ended_at is not None))
                for s in self.sent]


# -- memory -------------------------------------------------------------------------------------


class MemoryReader:
    """MB each process holds: NVML per-process used memory on CUDA, resident memory on CPU."""

    def __init__(self, cuda_index: int | None) -> None:
        self.cuda_index, self.source, self.handle = cuda_index, "proc", None
        if cuda_index is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle, self.source = pynvml.nvmlDeviceGetHandleByIndex(cuda_index), "nvml"
        except Exception:
            self.source = "nvidia-smi" if shutil.which("nvidia-smi") else "none"

    def read(self, pids: list[int]) -> tuple[dict[int, float | None], float | None]:
        """(MB per pid, MB the whole device holds; None where it cannot be read)."""
        if self.cuda_index is None:
            return {pid: _rss_mb(pid) for pid in pids}, None
        if self.source == "nvml":
            import pynvml

            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
            used = {int(p.pid): (p.usedGpuMemory or 0) / MB for p in procs}
            total = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / MB
        elif self.source == "nvidia-smi":
            used, total = _smi(self.cuda_index)
        else:
            return dict.fromkeys(pids), None
        # a container without the host's PID namespace sees NVML's pids as strangers: then None
        return {pid: used.get(pid) for pid in pids}, total


def _rss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _smi(index: int) -> tuple[dict[int, float], float | None]:
    def query(*args: str) -> str:
        return subprocess.run(["nvidia-smi", "-i", str(index), *args, "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout

    used = {}
    for line in query("--query-compute-apps=pid,used_memory").splitlines():
        pid, _, mb = line.partition(",")
        if pid.strip().isdigit() and mb.strip().isdigit():
            used[int(pid)] = float(mb)
    total = query("--query-gpu=memory.used").strip()
    return used, float(total) if total.replace(".", "").isdigit() else None


class Sampler(threading.Thread):
    """Every ``interval`` seconds: each pool process's MB and what the ledger holds for its pool."""

    def __init__(self, reader: MemoryReader, pids: dict[str, int], held: Any, interval: float) -> None:
        super().__init__(name="gpucheck-sampler", daemon=True)
        self.reader, self.pids, self.held, self.interval = reader, pids, held, interval
        self.samples: list[dict[str, Any]] = []
        self.errors = 0
        self.stopping = threading.Event()
        self.started_at = time.monotonic()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a broker hiccup: the next sample tries again
                self.errors += 1

    def sample(self) -> None:
        holders: dict[str, int] = self.held()
        used, device = self.reader.read(list(self.pids.values()))
        pools = {}
        for pool, pid in self.pids.items():
            held = sum(mb for member, mb in holders.items() if member.split("/", 1)[0] == pool)
            mb = used.get(pid)
            pools[pool] = {"used_mb": None if mb is None else round(mb, 1), "held_mb": held}
        self.samples.append({"t": round(time.monotonic() - self.started_at, 3), "pools": pools,
                             "device_used_mb": None if device is None else round(device, 1),
                             "held_total_mb": sum(holders.values())})

    def stop(self) -> list[dict[str, Any]]:
        self.stopping.set()
        self.join(10)
        return self.samples
