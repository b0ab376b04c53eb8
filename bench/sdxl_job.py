"""Where the time of an SDXL job goes: model vs everything else (tiny model, CPU).

A real worker, real Redis, real HTTP to the sink. Prints per-image delivery
time (encode + thumbnail + upload; target ≤ 150 ms per 1024² image) and the
share of a job spent outside the model. Tiny models make model time tiny on
purpose; the absolute numbers outside the model are what carries over.
"""

from __future__ import annotations

import uuid

from harness import Cluster, summary, write

SIZE = "1024x1024"


def job(num_images: int, steps: int = 15) -> dict:
    return {"id": uuid.uuid4().hex, "type": "sdxl_image_fast", "user_id": "bench", "prompt": "a lighthouse at dawn",
            "config": {"resolution": SIZE, "num_inference_steps": steps, "num_images": num_images, "seed": 1}}


def main() -> None:
    rows: dict[str, dict] = {}
    with Cluster("sdxl") as cluster:
        cluster.run("ourvidz.sdxl.generate", "sdxl", job(1))  # warm caches
        for n in (1, 6):
            walls, model, delivery, outside = [], [], [], []
            for _ in range(3 if n == 1 else 2):
                body, wall = cluster.run("ourvidz.sdxl.generate", "sdxl", job(n))
                meta = body["metadata"]
                walls.append(wall)
                model.append(meta["model_time"])
                delivery.append(meta["delivery_time"] / n)
                outside.append(wall - meta["model_time"])
            rows[f"batch_{n}"] = {
                "wall_s": summary(walls), "model_s": summary(model), "delivery_per_image_s": summary(delivery),
                "outside_model_s": summary(outside),
                "outside_share": summary([o / w for o, w in zip(outside, walls, strict=True)]),
            }
        # an invalid job: dispatch + validation + the failed callback, no model at all
        bad = job(1)
        bad["config"]["num_images"] = 4
        overhead = [cluster.run("ourvidz.sdxl.generate", "sdxl", {**bad, "id": uuid.uuid4().hex})[1] for _ in range(20)]
        rows["invalid_job_round_trip_s"] = summary(overhead)
        rows["loads"] = cluster.loads("sdxl")
    for name, row in rows.items():
        if name.startswith("batch"):
            print(f"{name}: wall {row['wall_s']['median']:.2f}s  model {row['model_s']['median']:.2f}s  "
                  f"delivery/image {row['delivery_per_image_s']['median'] * 1000:.0f}ms  "
                  f"outside the model {row['outside_model_s']['median'] * 1000:.0f}ms "
                  f"({row['outside_share']['median']:.1%} of this tiny job)")
    print(f"invalid job round trip (publish → failed callback): "
          f"{rows['invalid_job_round_trip_s']['median'] * 1000:.1f}ms median")
    print(f"model loads during the bench: {rows['loads']} (1 = loaded once at start)")
    write("sdxl_job", {"size": SIZE, "steps": 15, "device": "cpu (2 cores)", **rows})


if __name__ == "__main__":
    main()
