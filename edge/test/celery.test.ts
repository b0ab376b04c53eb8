import assert from "node:assert/strict";
import { test } from "node:test";

import { argsrepr, base64Json, buildMessage, familyOf, signature, TASKS, usableId } from "../src/celery.ts";
import type { Job } from "../src/schema.ts";

const PROMPT = "a lighthouse at dawn, ünïcödé ✨ secret-prompt-marker";

function job(fields: Partial<Job> = {}): Job {
  return { id: "job_123", type: "sdxl_image_fast", user_id: "user_123", prompt: PROMPT, ...fields };
}

function decode(body: string): unknown {
  return JSON.parse(Buffer.from(body, "base64").toString("utf8"));
}

test("a message is a protocol v2 envelope with a base64 [args, kwargs, embed] body", () => {
  const { envelope, queue, taskId } = buildMessage(TASKS.sdxl, [job()]);
  assert.equal(queue, "sdxl");
  assert.equal(envelope["content-type"], "application/json");
  assert.equal(envelope["content-encoding"], "utf-8");
  assert.equal(envelope.properties.body_encoding, "base64");
  assert.deepEqual(envelope.properties.delivery_info, { exchange: "", routing_key: "sdxl" });
  assert.equal(envelope.headers.task, "ourvidz.sdxl.generate");
  assert.equal(envelope.headers.id, taskId);
  assert.equal(envelope.headers.root_id, taskId);
  assert.equal(envelope.properties.correlation_id, taskId);
  assert.equal(envelope.headers.lang, "py");
  assert.deepEqual(decode(envelope.body), [[job()], {}, { callbacks: null, errbacks: null, chain: null, chord: null }]);
});

test("the body survives any unicode (UTF-8, not Latin-1)", () => {
  const text = "日本語 😀 \u0000 \u2028 é";
  assert.deepEqual(decode(base64Json({ text })), { text });
  const big = "x".repeat(200_000) + "😀";
  assert.deepEqual(decode(base64Json([big])), [big]);
});

test("argsrepr holds the job id only; no prompt anywhere outside the body", () => {
  const { envelope } = buildMessage(TASKS.sdxl, [job()]);
  assert.equal(envelope.headers.argsrepr, "('job_123',)");
  assert.equal(envelope.headers.kwargsrepr, "{}");
  const outside = JSON.stringify({ ...envelope, body: undefined });
  assert.ok(!outside.includes("secret-prompt-marker"));
  assert.ok(!outside.includes("user_123"));
  assert.equal(argsrepr({ id: "bad id with spaces" }), "('?',)");
  assert.equal(argsrepr({ job_id: "legacy-1" }), "('legacy-1',)");
  assert.equal(argsrepr("not a job"), "('?',)");
});

test("task ids and delivery tags are unique", () => {
  const ids = new Set<string>();
  const tags = new Set<string>();
  for (let i = 0; i < 2000; i++) {
    const { envelope } = buildMessage(TASKS.chat, [{ messages: [] }]);
    ids.add(envelope.headers.id);
    tags.add(envelope.properties.delivery_tag);
  }
  assert.equal(ids.size, 2000);
  assert.equal(tags.size, 2000);
});

test("a chain goes in embed.chain, last task first, each routed to its queue", () => {
  const generate = signature(TASKS.wan);
  const { envelope, queue } = buildMessage(TASKS.enhance, [job({ type: "video7b_fast_enhanced" })], { then: [generate] });
  assert.equal(queue, "chat");
  const [, , embed] = decode(envelope.body) as [unknown, unknown, { chain: unknown[] }];
  assert.deepEqual(embed.chain, [generate]);
  assert.deepEqual(generate.options, { task_id: generate.options.task_id, queue: "wan", routing_key: "wan", exchange: "" });
  const a = signature(TASKS.sdxl);
  const b = signature(TASKS.wan);
  const two = buildMessage(TASKS.enhance, [job()], { then: [a, b] });
  assert.deepEqual((decode(two.envelope.body) as [unknown, unknown, { chain: unknown[] }])[2].chain, [b, a]);
});

test("explicit task ids, origin and expiry are carried", () => {
  const expires = new Date("2030-01-02T03:04:05Z");
  const { envelope } = buildMessage(TASKS.sdxl, [job()], { taskId: "t-1", origin: "edge@fn", expires });
  assert.equal(envelope.headers.id, "t-1");
  assert.equal(envelope.headers.origin, "edge@fn");
  assert.equal(envelope.headers.expires, "2030-01-02T03:04:05.000Z");
});

test("a W3C traceparent rides in the headers; a malformed one is refused", () => {
  const traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  const { envelope } = buildMessage(TASKS.sdxl, [job()], { traceparent, tracestate: "v=1" });
  assert.equal(envelope.headers.traceparent, traceparent);
  assert.equal(envelope.headers.tracestate, "v=1");
  assert.equal(buildMessage(TASKS.sdxl, [job()]).envelope.headers.traceparent, undefined);
  assert.throws(() => buildMessage(TASKS.sdxl, [job()], { traceparent: "00-nope" }), /traceparent/);
});

test("families by type", () => {
  assert.equal(familyOf("sdxl_image_high"), "sdxl");
  assert.equal(familyOf("image_fast"), "wan");
  assert.equal(familyOf("video7b_high_enhanced"), "wan");
  assert.equal(familyOf("sdxl_video"), undefined);
  assert.equal(usableId({ id: "a".repeat(129) }), undefined);
});
