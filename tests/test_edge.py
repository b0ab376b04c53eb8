"""The TypeScript edge publisher (edge/), run by Node and by Deno against the real cluster.

``npm test`` in edge/ type-checks the publisher (web-standard APIs only, as on
Deno) and runs its unit tests; ``deno check`` and ``deno test`` do the same on
Deno, the runtime of Supabase Edge Functions (the binary comes from the ``deno``
npm package, a devDependency). The end-to-end run points the publisher at a small
Upstash-REST-compatible server in front of the test Redis, with real SDXL and
chat workers consuming what it sends; this file then checks the callbacks in
the sink, the messages that crossed the REST API, and (under Node) that the same
job pushed raw onto the legacy ``sdxl_queue`` (through ``bin/bridge``) produces
the same signed ``completed`` callback.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import secrets
import subprocess
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.contract.schemas import CallbackBody

from .support.cluster import BridgeProcess, WorkerProcess
from .support.env import BROKER, KEY, worker_env
from .support.jobs import new_id, terminal
from .support.process import ROOT
from .support.tools import tool
from .upstash_rest import UpstashRest

EDGE = ROOT / "edge"
TOKEN = "upstash-test-token-" + secrets.token_hex(6)
#: what ``npm ci`` installs that the tests run: a node_modules without one is stale
INSTALLED = (".package-lock.json", "tsx/package.json", "typescript/package.json", "deno/package.json")
#: the environment variables the e2e test reads
E2E_ENV = ("UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN", "OURVIDZ_EDGE_REPORT")


def run(command: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> str:
    out = subprocess.run(command, cwd=EDGE, env=env, capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(command)} exited {out.returncode}:\n{text[-6000:]}"
    return text


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """edge/node_modules, from package-lock.json: ``bin/test`` runs ``npm ci`` when missing or stale
    (``bin/_tools``); a bare pytest run does it here."""
    tool("node", "nodejs")
    tool("npm", "npm")
    if not all((EDGE / "node_modules" / name).exists() for name in INSTALLED):
        run(["npm", "ci", "--no-audit", "--no-fund"], timeout=600)
    return EDGE / "node_modules"


@pytest.fixture(scope="module")
def deno(node_modules: Path) -> list[str]:
    """The Deno binary of the ``deno`` npm package, quiet and offline-safe."""
    command = [str(node_modules / ".bin" / "deno")]
    assert "deno 2." in run([*command, "--version"], env=deno_env())
    return command


def deno_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPSTASH_", "OURVIDZ_EDGE_"))}
    return {**env, "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1", "DENO_NO_PROMPT": "1", **extra}


@pytest.fixture
def bridge(sink: Sink, tmp_path: Path) -> Iterator[BridgeProcess]:
    process = BridgeProcess(tmp_path / "bridge.log", worker_env(sink, "bridge")).launch()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def upstash() -> Iterator[UpstashRest]:
    server = UpstashRest(BROKER, TOKEN).start()
    yield server
    server.stop()


def test_typescript_typechecks_and_unit_tests(node_modules: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPSTASH_", "OURVIDZ_EDGE_"))}
    text = run(["npm", "test"], env=env)
    assert "# fail 0" in text and "# pass " in text, text[-3000:]


def test_deno_typechecks_and_runs_the_unit_tests(deno: list[str]) -> None:
    # the publisher alone, as an Edge Function imports it: Deno's own types, no Node ones
    assert "error" not in run([*deno, "check", "src/mod.ts"], env=deno_env()).lower()
    # the unit tests (node:test, which Deno runs), type-checked by Deno first; read-only and no network
    text = run([*deno, "test", "--no-prompt", "--allow-read", "--allow-env", "test/"], env=deno_env())
    passed = re.search(r"^ok \| (\d+) passed \| 0 failed", text, re.M)
    assert passed and int(passed.group(1)) >= 15, text[-3000:]  # every unit test file ran


def normalized(body: dict[str, Any]) -> dict[str, Any]:
    """A callback body without what differs between two runs of the same job: ids and timings."""
    out = json.loads(json.dumps(body).replace(body["job_id"], "JOB"))
    for key in ("callback_id", "processing_time", "model_time", "delivery_time", "queue_wait_s", "gpu_seconds"):
        out["metadata"].pop(key, None)
    return out


def stored(sink: Sink, path: str) -> bytes:
    response = httpx.get(f"{sink.url}/storage/v1/object/{path}", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, path
    return response.content


def decoded(envelope: dict[str, Any]) -> list[Any]:
    return json.loads(base64.b64decode(envelope["body"]))


@pytest.mark.slow
def test_typescript_publisher_end_to_end(node_modules: Path, upstash: UpstashRest, sdxl_worker: WorkerProcess,
                                         chat_worker: WorkerProcess, sink: Sink, store: redis.Redis,
                                         bridge: BridgeProcess, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    env = {**os.environ, "UPSTASH_REDIS_REST_URL": upstash.url, "UPSTASH_REDIS_REST_TOKEN": TOKEN,
           "OURVIDZ_EDGE_REPORT": str(report_path)}
    text = run(["node", "--import", "tsx", "--test", "test/e2e.test.ts"], env=env)
    assert "# fail 0" in text and "# skipped 0" in text, text[-3000:]
    single, body = check_report(json.loads(report_path.read_text()), upstash, sink)

    # done when: the same job pushed raw onto the legacy list gives the same signed completed callback
    bridge.wait_ready()
    raw = {**copy.deepcopy(single), "id": new_id()}
    store.rpush("sdxl_queue", json.dumps(raw))
    raw_body = terminal(sink, raw["id"])
    assert all(c["signature_ok"] for c in sink.callbacks(raw["id"]))
    assert normalized(raw_body) == normalized(body)
    assert stored(sink, raw_body["assets"][0]["url"]) == stored(sink, body["assets"][0]["url"])  # the same PNG bytes
    assert bridge.stop() == 0


@pytest.mark.slow
def test_deno_publisher_end_to_end(deno: list[str], upstash: UpstashRest, sdxl_worker: WorkerProcess,
                                   chat_worker: WorkerProcess, sink: Sink, tmp_path: Path) -> None:
    """The same e2e test file under Deno, with only the permissions an Edge Function would need."""
    report_path = tmp_path / "report.json"
    env = deno_env(UPSTASH_REDIS_REST_URL=upstash.url, UPSTASH_REDIS_REST_TOKEN=TOKEN,
                   OURVIDZ_EDGE_REPORT=str(report_path))
    host = upstash.url.split("://", 1)[1].rstrip("/")
    seen = {e["headers"]["id"] for e in upstash.pushed("sdxl") + upstash.pushed("chat")}
    text = run([*deno, "test", "--no-prompt", f"--allow-net={host}", f"--allow-env={','.join(E2E_ENV)}",
                "--allow-read", f"--allow-write={report_path}", "test/e2e.test.ts"], env=env)
    assert re.search(r"^ok \| 7 passed \| 0 failed", text, re.M), text[-3000:]
    assert "ignored" not in text.split("ok | ", 1)[1].splitlines()[0], text[-2000:]
    check_report(json.loads(report_path.read_text()), upstash, sink, seen)


def check_report(report: dict[str, Any], upstash: UpstashRest, sink: Sink,
                 before: Collection[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the e2e run published (``report``) completed; returns the single job and its terminal callback.

    ``before``: task ids pushed by an earlier run through the same REST stand-in, left out.
    """
    # a single job: one signed completed callback, shaped as the schema says
    single = report["single"]["job"]
    body = terminal(sink, single["id"])
    assert body["status"] == "completed", body
    CallbackBody.model_validate(body)
    calls = sink.callbacks(single["id"])
    assert all(c["signature_ok"] for c in calls)
    assert [c["body"]["status"] for c in calls].count("completed") == 1

    # where a job stands, asked from the edge: the same job ends like any other
    standing = report["standing"]
    assert standing["where"]["state"] in ("queued", "running", "ended"), standing
    assert terminal(sink, standing["job"]["id"])["status"] == "completed"

    # the chain: enhanced, then generated
    chained = report["chain"]["job"]
    chain_body = terminal(sink, chained["id"])
    assert chain_body["status"] == "completed", chain_body
    assert chain_body["metadata"]["original_prompt"] == "a cat on a sofa"
    assert chain_body["metadata"]["enhanced_prompt"]
    assert report["chat"]["response"] is not None

    # what crossed the REST API: envelopes with the job id only outside the body, and no secret
    envelopes = [e for e in upstash.pushed("sdxl") + upstash.pushed("chat") if e["headers"]["id"] not in before]
    assert len(envelopes) >= 4  # job, chain, two chats
    for envelope in envelopes:
        outside = json.dumps({**envelope, "body": None})
        assert "secret-prompt-marker" not in outside and "a cat on a sofa" not in outside
        assert TOKEN not in json.dumps(envelope) and TOKEN not in json.dumps(decoded(envelope))
    by_id = {e["headers"]["id"]: e for e in envelopes}
    sent = by_id[report["single"]["taskId"]]
    assert sent["headers"]["argsrepr"] == f"({single['id']!r},)"
    assert decoded(sent)[0] == [single]
    first = by_id[report["chain"]["taskId"]]
    assert first["headers"]["task"] == "ourvidz.chat.enhance"
    assert [step["task"] for step in decoded(first)[2]["chain"]] == ["ourvidz.sdxl.generate"]
    return single, body
