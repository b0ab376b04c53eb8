"""``ourvidz`` (the operator CLI): submit and follow, memory table, replay, help.

Run as a real process (``python -m ourvidz_tasks.tools.cli``, what the ``ourvidz``
console script calls) against the session's workers, broker and sink.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.sink import Sink

from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal
from .support.process import ROOT, wait_for
from .wire import publish

PROMPT = "a paper boat on a pond"


def ourvidz(*args: str, sink: Sink | None = None, timeout: float = 300,
            **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    if sink is not None:
        env["SUPABASE_URL"] = sink.url
    env.update(extra)
    return subprocess.run([sys.executable, "-m", "ourvidz_tasks.tools.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_names_every_command_and_how_submit_follows() -> None:
    top = ourvidz("--help")
    assert top.returncode == 0
    for command in ("submit", "memory", "replay", "usage", "metrics"):
        assert command in top.stdout
    submit = ourvidz("submit", "--help")
    assert submit.returncode == 0
    text = " ".join(submit.stdout.split())
    assert "result backend" in text and "cannot see" in text and "callback body" in text
    assert ourvidz().returncode == 2  # no command: usage


def test_an_invalid_job_is_refused_before_it_is_published(store: redis.Redis) -> None:
    before = store.llen("sdxl")
    run = ourvidz("submit", "--type", "sdxl_image_huge", "--user-id", "user_123", "--prompt", PROMPT)
    assert run.returncode == 2
    assert "INVALID_JOB" in run.stderr and "`type` must be one of" in run.stderr
    missing = ourvidz("submit", "--type", "sdxl_image_fast", "--prompt", PROMPT)
    assert missing.returncode == 2 and "`user_id` is required" in missing.stderr
    assert ourvidz("submit", "/no/such/job.json").returncode == 2
    assert store.llen("sdxl") == before


@pytest.mark.slow
def test_submit_a_file_follows_progress_and_prints_the_callback(sdxl_worker: WorkerProcess, sink: Sink,
                                                                tmp_path: Path) -> None:
    job = {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": PROMPT,
           "config": {"resolution": "1024x1024", "num_inference_steps": 20, "seed": 11}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    run = ourvidz("submit", str(path), "--interval", "0.05")
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    sent = terminal(sink, job["id"])
    assert printed == sent  # the very body the worker sent, callback_id included
    assert printed["status"] == "completed" and printed["assets"][0]["metadata"]["seed"] == 11
    # non-TTY stderr: one line per change, the bar moving forward to 100%
    percents = [int(p) for p in re.findall(rf"job {job['id']}  \[[█░]+\] (\d+)%", run.stderr)]
    assert len(set(percents)) >= 2 and percents == sorted(percents), run.stderr
    assert re.search(r"step \d+/20 · generating", run.stderr)
    assert f"job {job['id']} published" in run.stderr and "completed" in run.stderr.splitlines()[-1]


@pytest.mark.slow
def test_submit_with_flags_and_a_failing_job(sdxl_worker: WorkerProcess, sink: Sink) -> None:
    job_id = new_id()
    run = ourvidz("submit", "--type", "sdxl_image_fast", "--user-id", "user_123", "--prompt", PROMPT, "--id", job_id,
                  "--set", "config.resolution=256x256", "--set", "config.num_inference_steps=4",
                  "--set", "config.seed=0")
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    assert body["job_id"] == job_id and body["assets"][0]["metadata"]["seed"] == 0  # "0" parsed as JSON
    assert body["assets"][0]["metadata"]["width"] == 256

    bad = ourvidz("submit", "--type", "sdxl_image_fast", "--user-id", "user_123", "--prompt", PROMPT,
                  "--set", "config.num_images=5", "--set", "config.resolution=256x256")
    assert bad.returncode == 1
    failed = json.loads(bad.stdout)
    assert failed["status"] == "failed" and failed["error"]["code"] == "INVALID_JOB"
    assert "num_images" in failed["error"]["message"]


@pytest.mark.slow
def test_memory_shows_each_worker_and_its_models(sdxl_worker: WorkerProcess) -> None:
    run = ourvidz("memory")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "model loads per worker:" in lines
    header = lines[lines.index("model loads per worker:") + 1].split()
    assert header[:4] == ["WORKER", "ONLINE", "MODEL", "LOADS"]
    row = next(line.split() for line in lines if line.startswith(sdxl_worker.node + " "))
    assert row[1:3] == ["yes", "sdxl"] and int(row[3]) >= 1
    as_json = json.loads(ourvidz("memory", "--json").stdout)
    loads = {(r["worker"], r["model"]): r for r in as_json["loads"]}
    assert loads[(sdxl_worker.node, "sdxl")]["online"] is True


@pytest.mark.slow
def test_replay_resends_the_recorded_terminal_callback(sdxl_worker: WorkerProcess, store: redis.Redis,
                                                       sink: Sink) -> None:
    job: dict[str, Any] = {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": PROMPT,
                           "config": {"resolution": "256x256", "num_inference_steps": 4}}
    publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    first = terminal(sink, job["id"])
    wait_for(lambda: store.exists(f"ourvidz:job:{job['id']}:delivered"), 60, what="the delivered mark")
    run = ourvidz("replay", job["id"], sink=sink)
    assert run.returncode == 0, run.stderr
    assert f"job {job['id']}: completed callback re-sent" in run.stdout
    terminals = [c for c in sink.callbacks(job["id"]) if c["body"]["status"] == "completed"]
    assert len(terminals) == 2 and terminals[1]["body"] == first and terminals[1]["signature_ok"]
    unknown = ourvidz("replay", new_id(), sink=sink)
    assert unknown.returncode == 1 and "no recorded terminal callback" in unknown.stderr


@pytest.mark.slow
def test_submit_enhance_chains_the_prompt_enhancement(chat_worker: WorkerProcess, sdxl_worker: WorkerProcess,
                                                     sink: Sink) -> None:
    job_id = new_id()
    run = ourvidz("submit", "--enhance", "--type", "sdxl_image_fast", "--user-id", "user_123", "--prompt", PROMPT,
                  "--id", job_id, "--set", "config.resolution=256x256", "--set", "config.num_inference_steps=4",
                  "--set", 'metadata.enhance={"max_tokens": 16}', "--interval", "0.05")
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    assert body == terminal(sink, job_id) and body["status"] == "completed"
    assert body["metadata"]["original_prompt"] == PROMPT and "enhanced_prompt" in body["metadata"]
    assert "queued" in run.stderr or "enhancing the prompt" in run.stderr


def test_queue_says_where_a_job_stands_as_every_publisher_does(isolated_broker: str) -> None:
    """``ourvidz queue JOB_ID --json`` and the Python publisher's ``standing`` give the fair order's
    answer (CONTRACT section 7); ``ourvidz queue`` lists each family's waiting jobs per user."""
    from ourvidz_tasks.services import fairness

    client = redis.Redis.from_url(isolated_broker)
    jobs = [{"id": new_id(), "type": "sdxl_image_fast", "user_id": user, "prompt": PROMPT}
            for user in ("alice", "alice", "bob")]
    for job in jobs:
        publish(client, "ourvidz.sdxl.generate", job, "sdxl")  # no pool here: taken in by the test's intake
    fairness.Intake(client, "cli@test/1", ["sdxl"], estimate=lambda family, job: 2.0, weigh=lambda user: 1.0,
                    ttl=600).run_once()
    bob = jobs[2]["id"]
    cli = ourvidz("queue", bob, "--json", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_REDIS_URL=isolated_broker)
    assert cli.returncode == 0, cli.stderr
    code = f"import json; from ourvidz_tasks.publish import standing; print(json.dumps(standing({bob!r})))"
    python = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OURVIDZ_BROKER_URL": isolated_broker, "OURVIDZ_REDIS_URL": isolated_broker})
    assert python.returncode == 0, python.stderr
    for where in (json.loads(cli.stdout), json.loads(python.stdout), fairness.standing(client, bob, present=15)):
        assert {k: v for k, v in where.items() if k != "waited_s"} == {
            "state": "queued", "family": "sdxl", "position": 1, "ahead": 1, "eta_s": 2.0}, where  # alice's first, then bob
    listing = ourvidz("queue", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_REDIS_URL=isolated_broker)
    assert "sdxl: 3 waiting from 2 user(s)" in listing.stdout and "  alice: 2" in listing.stdout, listing.stdout
    unknown = ourvidz("queue", "no-such-job", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_REDIS_URL=isolated_broker)
    assert unknown.returncode == 1 and "job no-such-job: unknown" in unknown.stdout
