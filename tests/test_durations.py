"""Measured durations per job shape (``services.durations``) and per-user usage (``services.usage``,
``ourvidz usage``), on a real Redis database of their own; the CLI as a real process."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import redis

from ourvidz_tasks.contract import keys
from ourvidz_tasks.contract.names import FAMILIES
from ourvidz_tasks.contract.settings import Settings, load_settings
from ourvidz_tasks.services.durations import (
    DEFAULT_JOB_SECONDS,
    DURATIONS_TTL,
    Durations,
    default_shape,
    work_shape,
)
from ourvidz_tasks.services.usage import USAGE_DAYS, USAGE_TTL, day_of, days_since, queue_usage, read_usage

from .support.process import ROOT


@pytest.fixture
def db(isolated_broker: str) -> redis.Redis:
    return redis.Redis.from_url(isolated_broker)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sdxl(**config: Any) -> dict[str, Any]:
    return {"id": "j1", "type": "sdxl_image_high", "user_id": "u1", "prompt": "a fox", "config": config}


def test_a_jobs_shape_follows_the_contracts_rules() -> None:
    settings = Settings()
    assert set(DEFAULT_JOB_SECONDS) == set(FAMILIES)
    assert work_shape("sdxl", sdxl(num_images=6, resolution="832x1216"), settings) == ("832x1216x6s25", 832 * 1216 / 2**20 * 6 * 25)
    assert work_shape("sdxl", sdxl(width=512, height=512, steps=10), settings)[0] == "512x512x1s10"
    # img2img runs part of its schedule: the steps that run count
    shape, _ = work_shape("sdxl", {**sdxl(num_inference_steps=20), "metadata": {"reference_image_url": "http://x/a.png",
                                                                             "denoise_strength": 0.5}}, settings)
    assert shape == "1024x1024x1s10"
    wan = {"id": "j2", "type": "video_high", "user_id": "u1", "prompt": "a river", "config": {"frames": 83}}
    assert work_shape("wan", wan, settings) == ("480x832x81s50", 480 * 832 / 2**20 * 81 * 50)
    assert work_shape("wan", {**wan, "type": "image_fast"}, settings)[0] == "480x832x1s25"
    assert work_shape("chat", {"messages": []}, settings) == ("chat", 1.0)


@pytest.mark.parametrize("job", [
    None, 7, "text", [], {}, {"type": "sdxl_image_fast"}, sdxl(num_images=5), sdxl(resolution="huge"),
    sdxl(width=10**12, height=64), sdxl(steps=-3), {**sdxl(), "config": "not an object"},
    {**sdxl(), "type": "video_fast"}, {**sdxl(), "id": "../../etc"}, {**sdxl(), "prompt": "x" * 100_000},
])
def test_an_invalid_job_never_raises_and_has_the_familys_default_shape(job: Any) -> None:
    settings = Settings()
    assert work_shape("sdxl", job, settings) == default_shape("sdxl", settings) == ("1024x1024x1s15", 15.0)


def test_estimate_measured_shape_then_family_rate_then_default(db: redis.Redis) -> None:
    settings = load_settings(duration_window=3, job_seconds={"wan": 100.0})
    clock = Clock()
    durations = Durations(db, settings, clock=clock)
    six = sdxl(num_images=6)  # 1024x1024x6s25: 150 units
    one = sdxl(num_images=1, steps=15)  # the default shape: 15 units

    # nothing measured: the family's default seconds, scaled by units
    assert durations.estimate("sdxl", one) == pytest.approx(DEFAULT_JOB_SECONDS["sdxl"])
    assert durations.estimate("sdxl", six) == pytest.approx(DEFAULT_JOB_SECONDS["sdxl"] * 10)
    assert durations.estimate("wan", {"type": "video_fast"}) == pytest.approx(100.0)  # OURVIDZ_JOB_SECONDS
    assert durations.estimate("chat", {}) == pytest.approx(DEFAULT_JOB_SECONDS["chat"])

    shape, units = work_shape("sdxl", six, settings)
    for seconds in (10.0, 30.0, 50.0, 60.0):  # the window keeps the last 3
        durations.record("sdxl", shape, units, seconds)
    assert db.llen(keys.durations("sdxl", shape)) == 3 and db.llen(keys.duration_rate("sdxl")) == 3
    assert 0 < db.ttl(keys.durations("sdxl", shape)) <= DURATIONS_TTL
    assert 0 < db.ttl(keys.duration_rate("sdxl")) <= DURATIONS_TTL
    assert durations.estimate("sdxl", six) == pytest.approx((30 + 50 + 60) / 3)  # its own window's mean
    # a shape never run: the family's seconds per unit (the mean of 30/150, 50/150, 60/150) x its units
    assert durations.estimate("sdxl", one) == pytest.approx((30 + 50 + 60) / 3 / 150 * 15)
    assert durations.estimate("sdxl", None) == durations.estimate("sdxl", one)  # invalid: the default shape's
    assert durations.estimate("wan", {"type": "video_fast"}) == pytest.approx(100.0)  # other families: apart


def test_reads_are_cached_for_a_few_seconds(db: redis.Redis) -> None:
    settings = load_settings(duration_window=5)
    clock = Clock()
    reader, writer = Durations(db, settings, clock=clock), Durations(db, settings)
    job = sdxl(num_images=3)
    shape, units = work_shape("sdxl", job, settings)
    first = reader.estimate("sdxl", job)
    writer.record("sdxl", shape, units, 42.0)  # another process measures it
    for _ in range(50):
        assert reader.estimate("sdxl", job) == first  # fresh enough: not read again (else it saw 42)
    clock.now += 2.5
    assert reader.estimate("sdxl", job) == pytest.approx(42.0)
    reader.record("sdxl", shape, units, 44.0)  # its own record is seen at once
    assert reader.estimate("sdxl", job) == pytest.approx(43.0)


def test_days_since() -> None:
    today = dt.date(2026, 3, 10)
    assert days_since("1d", today) == ["2026-03-10"]
    assert days_since("3d", today) == ["2026-03-08", "2026-03-09", "2026-03-10"]
    assert days_since("2026-02-28", today)[:2] == ["2026-02-28", "2026-03-01"]
    assert len(days_since("2020-01-01", today)) == USAGE_DAYS  # nothing older is kept
    for wrong in ("0d", f"{USAGE_DAYS + 1}d", "7w", "2026-03-11", "yesterday"):
        with pytest.raises(ValueError, match="--since"):
            days_since(wrong, today)


def test_usage_sums_users_over_days_in_bounded_keys(db: redis.Redis, isolated_broker: str) -> None:
    now = time.time()
    yesterday, long_ago = now - 86400, now - 20 * 86400
    with db.pipeline(transaction=False) as pipe:
        queue_usage(pipe, "alice", 12.5, 1, now)
        queue_usage(pipe, "alice", 7.5, 1, yesterday)
        queue_usage(pipe, "bob", 100.0, 1, now)
        queue_usage(pipe, "bob", 1.0, 1, now)
        queue_usage(pipe, "carol", 3.0, 1, long_ago)
        pipe.execute()
    assert 0 < db.ttl(keys.usage(day_of(now))) <= USAGE_TTL
    rows = [(r.user, r.gpu_seconds, r.jobs) for r in read_usage(db, days_since("2d", dt.datetime.now(dt.UTC).date()))]
    assert rows == [("bob", 101.0, 2), ("alice", 20.0, 2)]

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}, "OURVIDZ_REDIS_URL": isolated_broker}

    def usage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ourvidz_tasks.tools.cli", "usage", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    listed = usage("--since", "30d", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["users"] == {"bob": {"gpu_seconds": 101.0, "jobs": 2}, "alice": {"gpu_seconds": 20.0, "jobs": 2},
                             "carol": {"gpu_seconds": 3.0, "jobs": 1}}
    assert data["until"] == day_of(now) and data["since"] == day_of(now - 29 * 86400)
    text = usage()  # the last 7 days: carol's job is older
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["USER", "GPU_SECONDS", "JOBS"]
    assert [line.split() for line in lines[1:]] == [["bob", "101", "2"], ["alice", "20", "2"]]
    assert "2 user(s), 121.0 GPU seconds, 4 job(s)" in text.stderr
    wrong = usage("--since", "a week")
    assert wrong.returncode == 2 and "--since must be Nd" in wrong.stderr
