"""Where the time of a WAN job goes: model vs everything else, 33 and 81 frames (tiny model, CPU).

Also confirms the model is loaded once for all jobs (0 loads per job).
"""

from __future__ import annotations

import uuid

from harness import Cluster, summary, write


def job(frames: int) -> dict:
    return {"id": uuid.uuid4().hex, "type": "video_fast", "user_id": "bench", "prompt": "waves on a beach",
            "config": {"width": 128, "height": 128, "frames": frames, "fps": 16, "num_inference_steps": 4, "seed": 3}}


def main() -> None:
    rows: dict[str, dict] = {}
    with Cluster("wan") as cluster:
        cluster.run("ourvidz.wan.generate", "wan", job(5))  # warm caches
        for frames in (33, 81):
            walls, model, outside = [], [], []
            for _ in range(3):
                body, wall = cluster.run("ourvidz.wan.generate", "wan", job(frames))
                walls.append(wall)
                model.append(body["metadata"]["model_time"])
                outside.append(wall - body["metadata"]["model_time"])
            rows[f"frames_{frames}"] = {
                "frames_delivered": body["metadata"]["frame_num"], "wall_s": summary(walls), "model_s": summary(model),
                "outside_model_s": summary(outside),
                "outside_share": summary([o / w for o, w in zip(outside, walls, strict=True)]),
            }
        rows["loads"] = cluster.loads("wan")
    for name, row in rows.items():
        if name.startswith("frames"):
            print(f"{name} (128x128, 4 steps): wall {row['wall_s']['median']:.2f}s  model {row['model_s']['median']:.2f}s  "
                  f"outside the model {row['outside_model_s']['median'] * 1000:.0f}ms "
                  f"(encode mp4 + thumbnail + upload + callbacks)")
    print(f"model loads across {1 + 6} jobs: {rows['loads']}")
    write("wan_job", {"device": "cpu (2 cores)", **rows})


if __name__ == "__main__":
    main()
