"""Property-based fuzzing of what reaches the ``sdxl`` queue, against one real worker process.

1. Job payloads (wire envelopes built like the edge's, see ``wire.py``) with random,
   missing and wrong-typed fields, huge strings, nested junk, unicode, numbers out of
   range and non-finite numbers (``NaN``/``Infinity`` are what ``json.dumps`` writes and
   what kombu's ``json.loads`` reads back): every payload with a usable id gets exactly
   one terminal callback; a failure is ``INVALID_JOB`` naming a field (or
   ``INVALID_PROMPT``, or ``I2I_PIPELINE_ERROR`` for an exact copy without a usable
   reference); a payload without a usable id becomes a dead letter; the worker never dies.
2. Raw list items (random bytes, JSON that is no envelope) LPUSHed onto ``sdxl``: every
   one a dead letter, the worker alive.

Valid payloads run the tiny model, so sizes and steps are capped (see :func:`cheapen`).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from devtools.sink import Sink
from ourvidz_tasks.services.guard import DEAD_LETTERS

from .support.cluster import WorkerProcess
from .support.jobs import new_id
from .support.process import wait_for
from .wire import envelope

TASK = "ourvidz.sdxl.generate"
ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
#: a field named in an error message: `config.width`, `user_id`, `metadata.enhance.model`...
NAMED_FIELD = re.compile(r"`[A-Za-z_][A-Za-z0-9_.]*`")
#: OURVIDZ_FUZZ_EXAMPLES=500 for a longer hunt
FUZZ = settings(max_examples=int(os.environ.get("OURVIDZ_FUZZ_EXAMPLES", "60")), deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
#: the raw-item test reports the first item that fails as it is: shrinking after a worker died
#: would only shrink "the worker is dead" down to a meaningless example
RAW_FUZZ = settings(FUZZ, phases=[Phase.explicit, Phase.reuse, Phase.generate])
SINK_REF = "<sink-reference>"  # replaced by a real reference image URL on the sink

# -- strategies ------------------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "0x10", "１２８", "256x256", "128*128", " 64 x 64 "]),
)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                        max_size=4), max_leaves=10)
huge = st.builds(lambda unit, n: unit * n, st.sampled_from(["a", "é", "🦄", "\u0000", "\u202e", "ab\n", "%s{}"]),
                 st.integers(2_000, 60_000))
anything = st.one_of(junk, huge)


def mix(valid: st.SearchStrategy[Any], weight: int = 2) -> st.SearchStrategy[Any]:
    """Mostly ``valid``, sometimes anything at all."""
    return st.one_of(*([valid] * weight), anything)


refs = st.sampled_from([
    SINK_REF, "http://127.0.0.1:9/closed.png", "workspace-temp/nope/missing.png", "file:///etc/passwd",
    "ftp://127.0.0.1/a.png", "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/x.png",
    "http://nonexistent.invalid/x.png", "javascript:alert(1)", "", "   ", "http://user:pw@127.0.0.1:9/a.png",
])
#: references a valid job may carry: they work, or fall back (unreachable, missing)
safe_refs = st.sampled_from([SINK_REF, SINK_REF, "http://127.0.0.1:9/closed.png", "workspace-temp/nope/missing.png"])
small_size = st.sampled_from(["64x64", "128x128", "128x64", "64*128", "1024x1024", "4096x4096", "63x64", "0x0",
                              "-64x64", "64x", "x", "64x64x64", "１２８x１２８"])
dims = st.one_of(st.sampled_from([64, 128, 72, 120, 2048, 2056, 63, 0, -8]), st.integers(-(2**40), 2**40),
                 st.floats(allow_nan=True, allow_infinity=True))
steps = st.one_of(st.integers(1, 3), st.integers(-(2**40), 2**40), st.sampled_from([0, 150, 151, 2.0, 2.5, "2"]))
numbers = st.one_of(st.floats(-2, 40, allow_nan=False), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-(2**65), 2**65))
prompts = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["", "a lighthouse", "a naked child", "loli", "sexy 12 year old", "café ☕ " * 40,
                     "(cat:1.5) and (dog)--", "\u0000\u0001\u0002", "<script>alert(1)</script>", "%s %d {0}"]),
    huge,
)

config = st.fixed_dictionaries({}, optional={
    "num_images": mix(st.sampled_from([1, 3, 6, 2, 0, -1, 100])),
    "num_inference_steps": mix(steps), "steps": mix(steps), "sample_steps": mix(steps),
    "guidance_scale": mix(numbers), "sample_guide_scale": mix(numbers),
    "resolution": mix(small_size), "width": mix(dims), "height": mix(dims),
    "seed": mix(st.one_of(st.integers(0, 2**31 - 1), st.integers(-(2**64), 2**64))),
    "pipeline": mix(st.sampled_from(["txt2img", "img2img", "video", "TXT2IMG", ""])),
    "denoise_strength": mix(numbers), "image": mix(refs), "negative_prompt": mix(prompts, 1),
    "reference_mode": anything, "frames": anything, "fps": anything, "first_frame": anything,
})
metadata = st.fixed_dictionaries({}, optional={
    "reference_image_url": mix(refs), "reference_strength": mix(numbers), "denoise_strength": mix(numbers),
    "exact_copy_mode": mix(st.booleans()), "reference_type": anything, "negative_prompt": mix(prompts, 1),
    "enhance": anything, "original_prompt": mix(prompts, 1), "enhanced_prompt": mix(prompts, 1),
    "enhancement_error": anything, "enhancement_time": mix(numbers),
})
bad_ids = st.one_of(
    st.text(max_size=30).filter(lambda s: not ID.match(s)),
    st.sampled_from(["", "a" * 129, "../../etc/passwd", "id with space", "ünïcode", "a/b", "a\nb", "%2e%2e"]),
    st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(), st.integers(), max_size=2),
)
wild = st.fixed_dictionaries(
    {
        # how the job names itself: fresh valid ids are filled in per example
        "_id": st.sampled_from(["id", "id", "id", "job_id", "both", "bad_id", "bad_id_good_job_id", "none"]),
        "_bad": bad_ids,
        "_cheap": st.sampled_from([True, True, True, False]),
    },
    optional={
        "type": mix(st.sampled_from(["sdxl_image_fast", "sdxl_image_high"]), 6),
        "job_type": mix(st.sampled_from(["sdxl_image_fast", "video_fast", "image_fast"])),
        "user_id": st.one_of(*[st.sampled_from(["user_123", "u", "A-b_9" * 25])] * 6, bad_ids),
        "prompt": mix(prompts, 4), "negative_prompt": mix(prompts, 1),
        "compel_enabled": mix(st.booleans()), "compel_weights": mix(st.one_of(st.none(), prompts), 1),
        "seed": mix(st.integers(0, 2**31)), "reference_image_url": mix(refs), "reference_strength": mix(numbers),
        "original_prompt": anything, "enhanced_prompt": anything, "quality": anything, "format": anything,
        "config": mix(config, 6), "metadata": mix(metadata, 4),
        "sfw_mode": anything, "unknown_field_ünï": anything,
    },
)

#: every place a field can be; a mutation deletes one or sets it to anything
PATHS = (
    "id", "job_id", "type", "job_type", "user_id", "prompt", "negative_prompt", "compel_enabled", "compel_weights",
    "seed", "reference_image_url", "reference_strength", "config", "metadata",
    "config.num_images", "config.num_inference_steps", "config.steps", "config.guidance_scale", "config.resolution",
    "config.width", "config.height", "config.seed", "config.pipeline", "config.denoise_strength", "config.image",
    "metadata.reference_image_url", "metadata.reference_strength", "metadata.denoise_strength",
    "metadata.exact_copy_mode", "metadata.enhance", "metadata.negative_prompt", "metadata.enhanced_prompt",
)
base_jobs = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["sdxl_image_fast", "sdxl_image_high"]),
        "user_id": st.sampled_from(["user_123", "0b6c3f3e-5a43-4c9e-a1c1-2d1e0c7b9a10", "u"]),
        "prompt": st.one_of(st.text(max_size=60), st.sampled_from(
            ["a lighthouse", "", "ünïcödé 🦄 prompt", "a naked child", "(red:1.4) cat, (blue)0.5"])),
        "config": st.fixed_dictionaries({
            "num_images": st.sampled_from([1, 1, 3]),
            "num_inference_steps": st.integers(1, 2),
            "resolution": st.sampled_from(["64x64", "128x128", "64x128"]),
            "seed": st.integers(0, 2**31 - 1),
        }, optional={"image": safe_refs, "pipeline": st.sampled_from(["txt2img", "img2img"]),
                     "denoise_strength": st.floats(0, 1)}),
        "metadata": st.fixed_dictionaries({}, optional={
            "exact_copy_mode": st.booleans(), "reference_strength": st.floats(0, 1),
            "reference_image_url": safe_refs}),
    },
    optional={"compel_enabled": st.booleans(), "compel_weights": st.sampled_from([None, "(cat:1.2)", "junk(("]),
              "negative_prompt": st.text(max_size=40)},
)
mutations = st.lists(st.tuples(st.sampled_from(PATHS), st.one_of(st.just("<delete>"), anything, refs, numbers)),
                     max_size=2, unique_by=lambda m: m[0])
plausible = st.fixed_dictionaries({"_base": base_jobs, "_mutations": mutations})

#: payloads that are not even objects
not_objects = st.one_of(st.lists(junk, max_size=3), scalars)
STRATEGIES = {"plausible": plausible, "wild": wild, "not an object": not_objects}
payloads = st.sampled_from(["plausible"] * 5 + ["wild"] * 4 + ["not an object"]).flatmap(
    lambda kind: st.tuples(st.just(kind), STRATEGIES[kind]))


# -- the oracle and the runner ---------------------------------------------------------------------------------


def usable(payload: Any) -> str | None:
    """CONTRACT.md section 6: ``id`` > ``job_id`` (first present wins), 1-128 of ``[A-Za-z0-9_-]``."""
    if not isinstance(payload, dict):
        return None
    for key in ("id", "job_id"):
        value = payload.get(key)
        if value is not None:
            return value if isinstance(value, str) and ID.match(value) else None
    return None


def _dim_cap(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and 128 < value <= 2048 and value % 8 == 0:
        return 128
    return value


def cheapen(payload: dict[str, Any]) -> dict[str, Any]:
    """Keep a valid payload cheap: sizes above 128 px and steps above 3 that would pass are lowered.

    Invalid values stay as drawn. With ``_cheap`` set, a config without a size or steps
    gets 64x64 and 1 step (else the defaults, 1024x1024 and 15/25 steps, run as drawn).
    """
    cfg = payload.get("config")
    if isinstance(cfg, dict):
        for key in ("width", "height"):
            if key in cfg:
                cfg[key] = _dim_cap(cfg[key])
        res = cfg.get("resolution")
        if isinstance(res, str):
            m = re.match(r"^\s*(\d{2,5})\s*[x*X]\s*(\d{2,5})\s*$", res)
            if m and all(64 <= int(v) <= 2048 and int(v) % 8 == 0 for v in m.groups()):
                cfg["resolution"] = f"{_dim_cap(int(m[1]))}x{_dim_cap(int(m[2]))}"
        for key in ("num_inference_steps", "steps", "sample_steps"):
            value = cfg.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 3 < value <= 150:
                cfg[key] = 3
    cheap = payload.pop("_cheap")
    if isinstance(cfg, dict) and cfg.get("num_images") in (3, 6):
        cheap = True  # six default-sized images would cost half a minute
    if cheap and payload.get("config") is None:
        payload["config"] = cfg = {}
    if cheap and isinstance(cfg, dict):
        if not {"width", "height", "resolution"} & cfg.keys():
            cfg["resolution"] = "64x64"
        if not {"num_inference_steps", "steps", "sample_steps"} & cfg.keys():
            cfg["num_inference_steps"] = 1
    return payload


def _fill_ref(value: Any, ref_url: str) -> Any:
    return json.loads(json.dumps(value).replace(json.dumps(SINK_REF)[1:-1], ref_url))


def _mutate(payload: dict[str, Any], path: str, value: Any) -> bool:
    *parents, leaf = path.split(".")
    target: Any = payload
    for part in parents:
        target = target.get(part) if isinstance(target, dict) else None
    if not isinstance(target, dict):
        return False
    if value == "<delete>":
        target.pop(leaf, None)
    else:
        target[leaf] = value
    return True


def materialize(kind: str, drawn: Any, ref_url: str) -> tuple[Any, list[str]]:
    """The payload to publish (fresh ids, so no two examples share one) and the paths mutated."""
    drawn = _fill_ref(drawn, ref_url)
    if kind == "not an object":
        return drawn, []
    if kind == "plausible":
        payload = {"id": new_id(), **drawn["_base"]}
        mutated = [path for path, value in drawn["_mutations"] if _mutate(payload, path, value)]
        payload["_cheap"] = True
        return cheapen(payload), mutated
    payload = drawn
    how, bad = payload.pop("_id"), payload.pop("_bad")
    if how in ("id", "both"):
        payload["id"] = new_id()
    if how in ("job_id", "both", "bad_id_good_job_id"):
        payload["job_id"] = new_id()
    if how in ("bad_id", "bad_id_good_job_id"):
        payload["id"] = bad
    return cheapen(payload), []


#: found by this fuzzer: a valid exact copy whose denoise is tiny but positive derives a schedule
#: of 6 / 4e-170 steps, which diffusers refuses (``I2I_PIPELINE_ERROR: img2img failed: ValueError``)
EXACT_COPY_TINY_DENOISE = ("plausible", {"_mutations": [], "_base": {
    "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "",
    "config": {"num_images": 1, "num_inference_steps": 1, "resolution": "64x64", "seed": 0, "image": SINK_REF,
               "denoise_strength": 4.2e-170},
    "metadata": {"exact_copy_mode": True}}})
#: compel's parser refused a form feed inside a prompt: the job failed WORKER_UNAVAILABLE (ParseException)
COMPEL_FORM_FEED = ("plausible", {"_mutations": [], "_base": {
    "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "0\x0c", "compel_enabled": True, "metadata": {},
    "config": {"num_images": 1, "num_inference_steps": 1, "resolution": "64x64", "seed": 0}}})


class Tally:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.ids: list[str] = []
        self.slowest = 0.0
        self.killer: str | None = None


def terminals(sink: Sink, job_id: str) -> list[dict[str, Any]]:
    return [c["body"] for c in sink.callbacks(job_id) if c["body"]["status"] in ("completed", "failed")]


def dead_letter_of(store: redis.Redis, task_id: str) -> dict[str, Any] | None:
    for raw in store.lrange(DEAD_LETTERS, 0, 200):
        entry = json.loads(raw)
        if entry.get("task_id") == task_id:
            return entry
    return None


#: fields that are only valid together: a change to one may be reported as the other missing
PAIRS = ({"config.width", "config.height"},)


def related(named: str, path: str) -> bool:
    """The field an error names is the mutated one, a part of it, its container, or its pair."""
    return (named == path or named.startswith(path + ".") or path.startswith(named + ".")
            or any({named, path} == pair for pair in PAIRS))


def alive(worker: WorkerProcess, pid: int) -> bool:
    return worker.alive() and worker.proc is not None and worker.proc.pid == pid


def short(value: Any, limit: int = 600) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def check_one(payload: Any, mutated: list[str], store: redis.Redis, sink: Sink, worker: WorkerProcess, pid: int,
              tally: Tally) -> None:
    if tally.killer is not None:  # every later example fails at once, naming the payload that killed it
        raise AssertionError(f"the worker died on an earlier payload: {tally.killer}")
    job_id = usable(payload)
    task_id = str(uuid.uuid4())
    env = envelope(TASK, [payload], "sdxl", task_id=task_id, argsrepr=f"({job_id!r},)")
    started = time.time()
    store.lpush("sdxl", json.dumps(env))

    def outcome(find: Any) -> Any:
        def probe() -> Any:
            if not alive(worker, pid):
                tally.killer = short(payload)
                raise AssertionError(f"the worker died on this payload: {tally.killer}\n{worker.text()[-3000:]}")
            return find()
        return probe

    if job_id is None:
        entry = wait_for(outcome(lambda: dead_letter_of(store, task_id)), 60, interval=0.05,
                         what=f"dead letter of {task_id}")
        assert entry["reason"] == "no usable job id", entry
        tally.outcomes["dead letter (no usable id)"] += 1
    else:
        bodies = wait_for(outcome(lambda: terminals(sink, job_id)), 180, interval=0.05,
                          what=f"terminal callback of {job_id}")
        body = bodies[0]
        assert body["job_id"] == job_id and isinstance(body["assets"], list) and isinstance(body["metadata"], dict)
        if body["status"] == "failed":
            error = body["error"]
            assert error["code"] in ("INVALID_JOB", "INVALID_PROMPT", "I2I_PIPELINE_ERROR"), (error, payload)
            if error["code"] == "INVALID_JOB":
                named = NAMED_FIELD.search(error["message"])
                assert named or "JSON object" in error["message"], error
                assert error["retryable"] is False
                if len(mutated) == 1 and named:  # one change to a valid job: the error is about that change
                    assert related(named[0].strip("`"), mutated[0]), (error["message"], mutated)
            if error["code"] == "I2I_PIPELINE_ERROR":
                assert "exact copy" in error["message"], error
            tally.outcomes[f"failed {error['code']}"] += 1
        else:
            assert body["assets"], body
            tally.outcomes["completed"] += 1
        tally.ids.append(job_id)
    tally.slowest = max(tally.slowest, time.time() - started)
    if not alive(worker, pid):
        tally.killer = short(payload)
        raise AssertionError(f"the worker died on this payload: {tally.killer}")


@pytest.fixture()
def reference_on_sink(sink: Sink) -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (120, 30, 200)).save(buffer, "PNG")
    return sink.put(f"refs/fuzz-{new_id()[:8]}.png", buffer.getvalue())


@pytest.mark.slow
def test_fuzzed_payloads_each_end_once_and_never_kill_the_worker(
        sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink, reference_on_sink: str) -> None:
    pid = sdxl_worker.proc.pid if sdxl_worker.proc else -1
    tally = Tally()
    began = time.time()

    @FUZZ
    @given(payloads)
    @example(EXACT_COPY_TINY_DENOISE)
    @example(COMPEL_FORM_FEED)
    def one(drawn: tuple[str, Any]) -> None:
        kind, value = drawn
        payload, mutated = materialize(kind, value, reference_on_sink)
        tally.kinds[kind] += 1
        check_one(payload, mutated, store, sink, sdxl_worker, pid, tally)

    one()
    time.sleep(2)  # a late second terminal callback would show up here
    duplicated = [i for i in tally.ids if len(terminals(sink, i)) != 1]
    unexpected = sdxl_worker.text().count("unexpected")
    total = sum(tally.outcomes.values())
    print(f"{total} payloads, 0 crashes (worker pid {pid} alive), {len(duplicated)} with more than one terminal "
          f"callback, {unexpected} 'unexpected' errors in the log; {dict(tally.kinds)} -> {dict(tally.outcomes)}; "
          f"slowest {tally.slowest:.1f}s, total {time.time() - began:.0f}s")
    assert not duplicated
    assert alive(sdxl_worker, pid)


props = st.fixed_dictionaries({}, optional={
    "body_encoding": st.one_of(st.sampled_from(["base64", "utf-8", None, "rot13"]), junk),
    "delivery_info": st.one_of(st.just({"exchange": "", "routing_key": "sdxl"}), junk),
    "priority": junk, "correlation_id": junk, "reply_to": junk,
})
near_envelopes = st.fixed_dictionaries(
    {"headers": st.one_of(st.just({"task": TASK}), st.dictionaries(st.text(max_size=10), junk, max_size=4),
                          st.fixed_dictionaries({"task": junk, "argsrepr": junk, "retries": junk})),
     "properties": props,
     "body": st.one_of(junk, st.just("<tag>"), st.just("W1tdLHt9LHt9XQ=="), st.just("not base64!"))},
    optional={"content-type": st.one_of(st.sampled_from(["application/json", "application/x-python-serialize",
                                                        "application/x-yaml", ""]), junk),
              "content-encoding": st.one_of(st.sampled_from(["utf-8", "binary", "zlib"]), junk)},
)
raw_items = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=2048)),
    st.tuples(st.just("json"), junk),  # JSON that is no envelope (and no `type`: not a raw job)
    st.tuples(st.just("bytes"), st.sampled_from([b"", b"{", b"null", b"[]", b'{"body": 1}', b"\xff\xfe\x00"])),
    st.tuples(st.just("envelope"), near_envelopes),  # passes the transport's envelope check, then is malformed
)


def raw_item(kind: str, value: Any, cut: int, tag: str) -> bytes:
    """The list item, carrying ``tag`` where its dead letter will show it (raw text or task id)."""
    if kind == "bytes":
        cut = min(cut, len(value))
        return bytes(value[:cut]) + tag.encode() + bytes(value[cut:])
    if kind == "json":
        return json.dumps({"tag": tag, "value": value} if cut % 2 else [tag, value]).encode()
    env = json.loads(json.dumps(value).replace("<tag>", tag))
    env["properties"]["delivery_tag"] = tag
    if isinstance(env["headers"], dict):
        env["headers"]["id"] = tag
    if env["body"] != tag:  # keep the tag findable in the raw body too
        env["headers"]["x-fuzz"] = tag
    return json.dumps(env).encode()


#: found by this fuzzer: kombu's Message() raises on an unknown ``body_encoding`` inside the
#: transport's read loop, and the whole worker process exits
KILLS_THE_WORKER = (("envelope", {"headers": {"task": TASK}, "properties": {"body_encoding": "rot13"},
                                  "body": "<tag>"}), 0)
#: found by this fuzzer: with no ``properties.delivery_info``, kombu's QoS.append raises KeyError,
#: which kombu's Redis transport counts as a connection error: the consumer reconnects and the
#: item, already popped, is gone (no dead letter)
SILENTLY_LOST = (("envelope", {"headers": {"task": TASK}, "properties": {}, "body": None}), 0)


@pytest.mark.slow
def test_fuzzed_raw_list_items_are_dead_letters(isolated_broker: str,
                                                start_worker: Callable[..., WorkerProcess]) -> None:
    """Its own worker on its own broker database: an item that kills it must not take the session's worker along."""
    store = redis.Redis.from_url(isolated_broker)
    worker = start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_CALLBACKS="inline",
                          OURVIDZ_HOSTNAME=f"rawfuzz-{new_id()[:6]}")
    pid = worker.proc.pid if worker.proc else -1
    reasons: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    killer: list[bytes] = []

    @RAW_FUZZ
    @given(raw_items, st.integers(0, 2048))
    @example(*SILENTLY_LOST)
    @example(*KILLS_THE_WORKER)
    def one(drawn: tuple[str, Any], cut: int) -> None:
        if killer:
            raise AssertionError(f"the worker died on an earlier item: {killer[0][:600]!r}")
        kind, value = drawn
        tag = f"rawfuzz-{uuid.uuid4().hex}"
        item = raw_item(kind, value, cut, tag)
        store.lpush("sdxl", item)
        kinds[kind] += 1

        def mine() -> dict[str, Any] | None:
            if not alive(worker, pid):
                killer.append(item)
                raise AssertionError(f"the worker died on this {kind} item: {item[:600]!r}\n{worker.text()[-3000:]}")
            for raw in store.lrange(DEAD_LETTERS, 0, 200):
                if tag in (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)):
                    return json.loads(raw)
            return None

        entry = wait_for(mine, 20, interval=0.05, what=f"the dead letter of this {kind} item: {item[:600]!r}")
        assert entry["queue"] == "sdxl", entry
        reason = entry["reason"]
        reasons[reason if reason.startswith("malformed") else reason.split(":")[0][:60]] += 1

    one()
    print(f"{sum(kinds.values())} raw items {dict(kinds)}: {sum(reasons.values())} dead letters, 0 crashes: "
          f"{dict(reasons)}")
    assert alive(worker, pid)
