"""Where the time of a WAN job goes, against diffusers called directly (tiny model, CPU).

33 and 81 frames at the product's 480x832 (``OURVIDZ_BENCH_WAN_SIZE``): real-size
frames, so encoding the H.264 mp4, the thumbnail and the upload cost what they
cost on a GPU host; only the model is tiny. The floor is the same pipeline called directly in this
process with the same arguments. Also confirms 0 model loads per job.
"""

from __future__ import annotations

import os
import uuid

from figures import figure
from harness import ROOT, Cluster, median_seconds, summary, write

#: the product's 480x832 by default is ~7 minutes of tiny-model VAE work on 2 cores; bench/run uses 240x416
#: (OURVIDZ_BENCH_WAN_SIZE=480x832 bench/run wan_job for the real size; bench/RESULTS.md says which ran)
WIDTH, HEIGHT = (int(v) for v in os.environ.get("OURVIDZ_BENCH_WAN_SIZE", "480x832").split("x"))
STEPS = 1
#: Wan2.1 1.3B, 81 frames at 480p, 50 steps on an RTX 4090: 261 s (its model card); scaled by frames and steps
ANCHOR_S_PER_FRAME_STEP = 261 / 81 / 50
REAL_STEPS = 25  # the product's video_fast schedule (OURVIDZ_WAN_FAST_STEPS)


def job(frames: int) -> dict:
    return {"id": uuid.uuid4().hex, "type": "video_fast", "user_id": "bench", "prompt": "waves on a beach",
            "config": {"width": WIDTH, "height": HEIGHT, "frames": frames, "fps": 16, "num_inference_steps": STEPS,
                       "seed": 3}}


def through_pools() -> dict:
    rows: dict = {}
    with Cluster("wan") as cluster:
        cluster.run("ourvidz.wan.generate", "wan", job(5))  # warm caches
        for frames in (33, 81):
            walls, model, outside = [], [], []
            for _ in range(1):  # one each: a tiny 81-frame 480x832 clip still takes a minute on 2 cores
                body, wall = cluster.run("ourvidz.wan.generate", "wan", job(frames))
                walls.append(wall)
                model.append(body["metadata"]["model_time"])
                outside.append(wall - body["metadata"]["model_time"])
            rows[frames] = {"wall_s": summary(walls), "model_s": summary(model), "outside_model_s": summary(outside)}
        rows["loads"] = cluster.loads("wan")
    return rows


def direct() -> dict[int, float]:
    import torch

    from ourvidz_tasks.contract.settings import Settings
    from ourvidz_tasks.models import resolve_device
    from ourvidz_tasks.models.wan import load_wan

    torch.set_num_threads(2)
    model = load_wan(Settings(model_source="tiny", tiny_cache=ROOT / ".cache" / "tiny"), resolve_device("cpu"))

    def call(frames: int) -> None:
        with torch.inference_mode():
            model.pipe(prompt="waves on a beach", width=WIDTH, height=HEIGHT, num_frames=frames,
                       num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt",
                       generator=torch.Generator("cpu").manual_seed(3))

    return {frames: median_seconds(lambda f=frames: call(f), 1) for frames in (33, 81)}


def main() -> None:
    rows = through_pools()
    floor = direct()
    figures = []
    for frames in (33, 81):
        row = {k: v["median"] for k, v in rows[frames].items()}
        real_model = ANCHOR_S_PER_FRAME_STEP * frames * REAL_STEPS
        print(f"{frames} frames {WIDTH}x{HEIGHT}: wall {row['wall_s']:.2f}s  model {row['model_s']:.2f}s "
              f"(direct diffusers {floor[frames]:.2f}s)  outside the model {row['outside_model_s'] * 1000:.0f}ms")
        figures += [
            figure(f"WAN {WIDTH}x{HEIGHT} {frames} frames: model call in the pool", row["model_s"], "s", reference=floor[frames],
                   against="diffusers called directly", max_ratio=1.1),
            figure(f"WAN {WIDTH}x{HEIGHT} {frames} frames: outside the model (mp4, thumbnail, upload, callbacks)",
                   row["outside_model_s"] * 1000, "ms"),
            figure(f"WAN {WIDTH}x{HEIGHT} {frames} frames: outside the model, share of a real-size job",
                   100 * row["outside_model_s"] / (row["outside_model_s"] + real_model), "%", max_value=5,
                   note=f"real model time {real_model:.0f}s = 261s (RTX 4090, 81 frames, 50 steps) scaled to "
                        f"{frames} frames, {REAL_STEPS} steps"),
        ]
    print(f"model loads across 5 jobs: {rows['loads']}")
    write("wan_job", {"device": "cpu (2 cores)", "size": f"{WIDTH}x{HEIGHT}", "direct_s": floor,
                      "pools": {str(k): v for k, v in rows.items()}}, figures)


if __name__ == "__main__":
    main()
