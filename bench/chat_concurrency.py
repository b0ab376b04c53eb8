"""Chat at scale: concurrent chats through a real chat worker (tiny Qwen2, CPU), and the enhance wait.

For 1, 4, 8 and 16 chats of 64 tokens published at once: aggregate tokens/s
and p50/p99 latency per request (publish to result), beside the one-at-a-time
baseline (the same requests sent one after the other) measured in the same
run on the same worker. Then the enhance-behind-long-chats latency: an
enhance published right behind 3 chats of 256 tokens, with the pool decoding
one request at a time (``OURVIDZ_CHAT_CONCURRENCY=1``, the old behaviour)
and with the default batch of 8. Writes ``bench/out/chat_concurrency.json``.
The baseline of each level is measured right before it, in rounds, because the
2-core machine this runs on is shared and its load drifts; the worker runs one
torch thread (two threads on a loaded 2-core machine spin and run ~10x slower).
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from figures import figure
from harness import Cluster, write

from ourvidz_tasks.publish import chat, enhance

TOKENS = 64
LEVELS = (1, 4, 8, 16)


def request(i: int, max_tokens: int = TOKENS) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"Describe scene {i} in a few words"}],
            "max_tokens": max_tokens, "temperature": 0}


def timed(req: dict[str, Any]) -> float:
    started = time.perf_counter()
    out = chat.delay(req).get(timeout=600)
    assert out["completion_tokens"] == req["max_tokens"], out
    return time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def concurrency(rounds: int = 2) -> dict[str, Any]:
    """Per level: ``rounds`` times the same requests one after the other, then all at once."""
    for i in range(3):  # warm up the engine and the broker path
        timed(request(i))
    rows: dict[str, Any] = {}
    for n in LEVELS:
        alone: list[float] = []
        together: list[float] = []
        walls: list[float] = []
        for _ in range(rounds):  # interleaved, so load drift on a shared machine hits both alike
            alone += [timed(request(i)) for i in range(n)]
            with ThreadPoolExecutor(n) as pool:
                started = time.perf_counter()
                together += list(pool.map(timed, [request(i) for i in range(n)]))
                walls.append(time.perf_counter() - started)
        base = TOKENS * len(alone) / sum(alone)
        rate = TOKENS * n * rounds / sum(walls)
        rows[str(n)] = {
            "baseline_tok_s": round(base, 1), "baseline_p50_s": round(statistics.median(alone), 3),
            "baseline_p99_s": round(pct(alone, 0.99), 3), "tok_s": round(rate, 1),
            "speedup": round(rate / base, 2), "p50_s": round(statistics.median(together), 3),
            "p99_s": round(pct(together, 0.99), 3),
        }
        print(n, rows[str(n)], flush=True)
    return rows


def enhance_wait(long_tokens: int = 256) -> float:
    """Seconds from publishing an enhance, right behind 3 long chats, to its result."""
    longs = [chat.delay(request(i, long_tokens)) for i in range(3)]
    job = {"id": uuid.uuid4().hex, "type": "sdxl_image_fast", "user_id": "u1", "prompt": "a cat",
           "metadata": {"enhance": {"max_tokens": 16, "temperature": 1.0}}}
    started = time.perf_counter()
    enhance.delay(job).get(timeout=900)
    waited = time.perf_counter() - started
    for r in longs:
        r.get(timeout=900)
    return waited


def main() -> None:
    data: dict[str, Any] = {"tokens": TOKENS, "device": "cpu", "torch_threads": 1,
                            "machine_load": os.getloadavg()[0]}
    with Cluster("chat", threads=1):
        data["levels"] = concurrency()
        enhance_wait(16)  # warm
        data["enhance_after_s"] = round(enhance_wait(), 3)
        data["one_token_s"] = round(1 / data["levels"]["1"]["baseline_tok_s"], 4)
        write("chat_concurrency", data)
    with Cluster("chat", threads=1, OURVIDZ_CHAT_CONCURRENCY="1"):  # one at a time, as before
        enhance_wait(16)
        data["enhance_before_s"] = round(enhance_wait(), 3)
    data["machine_load_end"] = os.getloadavg()[0]
    print({k: v for k, v in data.items() if k != "levels"})
    at8 = data["levels"]["8"]
    figures = [
        figure("chat: 8 concurrent chats, seconds per token (aggregate)", 1 / at8["tok_s"], "s",
               reference=1 / at8["baseline_tok_s"], against="the same chats one at a time, same run",
               max_ratio=1 / 2.5, note="tiny Qwen2, real worker, CPU"),
        figure("chat: an enhance published behind 3 long chats", data["enhance_after_s"], "s",
               reference=data["enhance_before_s"], against="the pool decoding one request at a time"),
    ]
    write("chat_concurrency", data, figures)


if __name__ == "__main__":
    main()
