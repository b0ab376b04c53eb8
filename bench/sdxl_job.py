"""Where the time of an SDXL job goes, against diffusers called directly (tiny model, CPU, 1024²).

A real worker, real Redis, real HTTP to the sink, batches 1, 3 and 6. Each job's
wall time (publish → terminal callback) is split into dispatch (publish → first
``processing`` callback), the model call, delivery (encode PNG + WEBP thumbnail
+ uploads, reported by the task) and the rest (validation, policy, the terminal
callback). The floor is the same pipeline called directly in this process with
the same arguments. Tiny models make model time tiny on purpose: what carries
over to a real card is the absolute time outside the model, scaled here against
the anchor below.
"""

from __future__ import annotations

import time
import uuid

from figures import figure
from harness import ROOT, Cluster, median_seconds, summary, write

SIZE, STEPS = 1024, 15
#: diffusers' published SDXL 1024² 30 steps on an A100 (bf16 + SDPA): 3.31 s; scaled to our steps and batch
ANCHOR_S_PER_STEP = 3.31 / 30
BATCHES = (1, 3, 6)


def job(num_images: int) -> dict:
    return {"id": uuid.uuid4().hex, "type": "sdxl_image_fast", "user_id": "bench", "prompt": "a lighthouse at dawn",
            "config": {"resolution": f"{SIZE}x{SIZE}", "num_inference_steps": STEPS, "num_images": num_images,
                       "seed": 1}}


def first_processing(cluster: Cluster, job_id: str) -> float:
    return min(c["at"] for c in cluster.sink.callbacks(job_id) if c["body"]["status"] == "processing")


def through_pools() -> dict[int, dict]:
    rows: dict[int, dict] = {}
    with Cluster("sdxl") as cluster:
        cluster.run("ourvidz.sdxl.generate", "sdxl", job(1))  # warm caches
        for n in BATCHES:
            parts: dict[str, list[float]] = {k: [] for k in ("wall", "dispatch", "model", "delivery", "rest")}
            for _ in range(3 if n == 1 else 1):
                payload = job(n)
                published = time.time()
                body, wall = cluster.run("ourvidz.sdxl.generate", "sdxl", payload)
                meta = body["metadata"]
                dispatch = first_processing(cluster, payload["id"]) - published
                parts["wall"].append(wall)
                parts["dispatch"].append(dispatch)
                parts["model"].append(meta["model_time"])
                parts["delivery"].append(meta["delivery_time"])
                parts["rest"].append(wall - dispatch - meta["processing_time"])
            rows[n] = {k: summary(v) for k, v in parts.items()}
        rows[0] = {"loads": cluster.loads("sdxl")}
    return rows


def direct() -> dict[int, float]:
    """The floor: the same tiny pipeline, same arguments, called in this process (2 threads, as the pool)."""
    import torch

    from ourvidz_tasks.contract.settings import Settings
    from ourvidz_tasks.models import resolve_device
    from ourvidz_tasks.models.sdxl import load_sdxl

    torch.set_num_threads(2)
    model = load_sdxl(Settings(model_source="tiny", tiny_cache=ROOT / ".cache" / "tiny"), resolve_device("cpu"))

    def call(n: int) -> None:
        with torch.inference_mode():
            model.t2i(prompt="a lighthouse at dawn", width=SIZE, height=SIZE, num_inference_steps=STEPS,
                      num_images_per_prompt=n, guidance_scale=7.5,
                      generator=[torch.Generator("cpu").manual_seed(1 + i) for i in range(n)])

    return {n: median_seconds(lambda n=n: call(n), 3 if n == 1 else 1) for n in BATCHES}


def main() -> None:
    rows = through_pools()
    floor = direct()
    figures = []
    for n in BATCHES:
        row = {k: v["median"] for k, v in rows[n].items()}
        outside = row["wall"] - row["model"]
        real_model = ANCHOR_S_PER_STEP * STEPS * n
        print(f"batch {n}: wall {row['wall']:.2f}s = dispatch {row['dispatch'] * 1000:.1f}ms + model {row['model']:.2f}s "
              f"(direct diffusers {floor[n]:.2f}s) + delivery {row['delivery'] * 1000:.0f}ms "
              f"+ rest {row['rest'] * 1000:.1f}ms")
        figures += [
            figure(f"SDXL 1024² b{n}: model call in the pool", row["model"], "s", reference=floor[n],
                   against="diffusers called directly", max_ratio=1.1),
            figure(f"SDXL 1024² b{n}: delivery per image (PNG+WEBP+uploads)", row["delivery"] / n * 1000, "ms",
                   max_value=150, note="the old system: ~1,900 ms per image"),
            figure(f"SDXL 1024² b{n}: outside the model, share of a real-size job", 100 * outside / (outside + real_model),
                   "%", max_value=5, note=f"real model time {real_model:.2f}s = 3.31s/30 steps (A100) x {STEPS} x {n}"),
        ]
    print(f"model loads during the bench: {rows[0]['loads']} (1 = loaded once at start)")
    write("sdxl_job", {"size": SIZE, "steps": STEPS, "device": "cpu (2 cores)", "direct_s": floor,
                       "pools": {str(k): v for k, v in rows.items()}}, figures)


if __name__ == "__main__":
    main()
