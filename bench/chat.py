"""Chat: tokens/s of the tiny Qwen2 models on CPU, and what an enhance step adds to a chain.

The enhance step's own inference is reported by the task (``enhancement_time``);
the rest of its cost in a chain is dispatch: the hop chat → sdxl through Redis.
"""

from __future__ import annotations

import time
import uuid

from figures import figure
from harness import ROOT, Cluster, summary, write

from ourvidz_tasks.contract.settings import Settings
from ourvidz_tasks.models import resolve_device
from ourvidz_tasks.models.qwen import generate_chat, load_qwen


def tokens_per_second() -> dict[str, float]:
    settings = Settings(model_source="tiny", tiny_cache=ROOT / ".cache" / "tiny")
    out = {}
    for name in ("qwen_instruct", "qwen_base"):
        model = load_qwen(settings, name, resolve_device("cpu"))  # type: ignore[arg-type]
        messages = [{"role": "user", "content": "Describe a lighthouse at dawn."}]
        generate_chat(model, messages, max_tokens=8, temperature=0.7, top_p=0.9, seed=1)
        rates = []
        for seed in range(5):
            result = generate_chat(model, messages, max_tokens=128, temperature=0.7, top_p=0.9, seed=seed)
            rates.append(result.completion_tokens / result.generation_time)
        out[name] = summary(rates)["median"]
    return out


def job(enhance: bool) -> dict:
    body = {"id": uuid.uuid4().hex, "type": "sdxl_image_fast", "user_id": "bench", "prompt": "a red fox",
            "config": {"resolution": "256x256", "num_inference_steps": 2, "seed": 1}}
    if enhance:
        body["metadata"] = {"enhance": {"max_tokens": 32}}
    return body


def main() -> None:
    rates = tokens_per_second()
    with Cluster("sdxl", "chat") as cluster:
        from celery import chain

        from ourvidz_tasks.publish import enhance, sdxl_generate

        def run_chain(payload: dict) -> tuple[dict, float]:
            started = time.perf_counter()
            chain(enhance.s(payload), sdxl_generate.s()).apply_async()
            while True:
                for call in cluster.sink.callbacks(payload["id"]):
                    if call["body"]["status"] == "completed":
                        return call["body"], time.perf_counter() - started
                time.sleep(0.005)

        cluster.run("ourvidz.sdxl.generate", "sdxl", job(False))
        run_chain(job(True))
        plain, hops = [], []
        for _ in range(5):
            payload = job(False)
            published = time.time()
            plain.append(cluster.run("ourvidz.sdxl.generate", "sdxl", payload)[1])
            hops.append(min(c["at"] for c in cluster.sink.callbacks(payload["id"])
                            if c["body"]["status"] == "processing") - published)
        chained, inference = [], []
        for _ in range(5):
            body, wall = run_chain(job(True))
            chained.append(wall)
            inference.append(body["metadata"]["enhancement_time"])
    added = summary(chained)["median"] - summary(plain)["median"]
    beyond = added - summary(inference)["median"]
    for name, rate in rates.items():
        print(f"{name}: {rate:.0f} tokens/s (tiny, CPU)")
    print(f"enhance adds {added * 1000:.0f}ms to a chain; its inference {summary(inference)['median'] * 1000:.0f}ms; "
          f"beyond inference {beyond * 1000:.0f}ms (dispatch, the hop chat → sdxl)")
    hop = summary(hops)["median"]
    write("chat", {"tokens_per_s": rates, "plain_job_s": summary(plain), "chain_s": summary(chained),
                   "enhance_inference_s": summary(inference), "enhance_added_s": added,
                   "enhance_beyond_inference_s": beyond, "dispatch_hop_s": summary(hops), "device": "cpu (2 cores)"},
          [figure("enhance → SDXL chain: latency beyond both inferences", beyond * 1000, "ms", reference=hop * 1000,
                  against="one dispatch hop (publish → processing)", max_ratio=2.0),
           *[figure(f"{name}: decode speed (tiny, one request)", rate, "tok/s") for name, rate in rates.items()]])


if __name__ == "__main__":
    main()
