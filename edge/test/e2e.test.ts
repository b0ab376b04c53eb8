// Against a real cluster: an Upstash-REST-compatible endpoint in front of the
// broker's Redis, with real sdxl and chat workers consuming what is sent.
// tests/test_edge.py runs it (with the environment below) and then checks the
// callbacks that arrived for the jobs written to OURVIDZ_EDGE_REPORT.
//
//   UPSTASH_REDIS_REST_URL, UPSTASH_REDIS_REST_TOKEN   the endpoint
//   OURVIDZ_EDGE_REPORT                                where to write what was published

import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { after, test } from "node:test";

import { Publisher, ResultTimeout, TaskFailed, UpstashError, UpstashRedis, type Job } from "../src/mod.ts";

const url = process.env.UPSTASH_REDIS_REST_URL;
const token = process.env.UPSTASH_REDIS_REST_TOKEN;
const reportPath = process.env.OURVIDZ_EDGE_REPORT;
const skip = url && token && reportPath ? false : "set UPSTASH_REDIS_REST_URL, UPSTASH_REDIS_REST_TOKEN and OURVIDZ_EDGE_REPORT";

const report: Record<string, unknown> = {};
after(() => {
  if (reportPath) writeFileSync(reportPath, JSON.stringify(report, null, 2));
});

function publisher(): Publisher {
  return new Publisher(UpstashRedis.fromEnv((name) => process.env[name]));
}

function sdxlJob(fields: Partial<Job> = {}): Job {
  return {
    id: crypto.randomUUID(),
    type: "sdxl_image_fast",
    user_id: "user_123",
    prompt: "a lighthouse on a cliff at dawn, secret-prompt-marker",
    config: { resolution: "256x256", num_inference_steps: 4, seed: 42 },
    ...fields,
  };
}

test("a job published through Upstash REST", { skip }, async () => {
  const job = sdxlJob();
  const published = await publisher().publishJob(job);
  assert.equal(published.queue, "sdxl");
  report.single = { job, ...published };
});

test("where a job stands, asked through Upstash REST", { skip }, async () => {
  const job = sdxlJob();
  const p = publisher();
  await p.publishJob(job);
  const where = await p.standing(job.id);
  assert.ok(["queued", "running", "ended"].includes(where.state), JSON.stringify(where));
  assert.deepEqual(await p.standing("no-such-job"), { state: "unknown" });
  report.standing = { job, where };
});

test("an enhance -> generate chain published through Upstash REST", { skip }, async () => {
  const job = sdxlJob({ prompt: "a cat on a sofa", metadata: { enhance: { max_tokens: 12, temperature: 0.8 } } });
  const published = await publisher().publishJob(job, { enhance: true });
  assert.equal(published.queue, "chat");
  assert.equal(published.taskIds.length, 2);
  report.chain = { job, ...published };
});

test("a chat answered through the result backend", { skip, timeout: 240_000 }, async () => {
  const result = await publisher().chat(
    { messages: [{ role: "system", content: "You answer briefly." }, { role: "user", content: "Name a colour." }], max_tokens: 8, seed: 3 },
    { timeoutMs: 200_000 },
  );
  assert.equal(typeof result.response, "string");
  assert.equal(result.model, "qwen_instruct");
  assert.ok(result.completion_tokens >= 1 && result.completion_tokens <= 8);
  assert.ok(result.finish_reason === "stop" || result.finish_reason === "length");
  report.chat = result;
});

test("a failed chat rejects with the error code first", { skip, timeout: 240_000 }, async () => {
  const bad = { messages: [{ role: "user", content: "hi" }], model: "gpt-9" } as unknown as Parameters<Publisher["chat"]>[0];
  await assert.rejects(publisher().chat(bad, { timeoutMs: 200_000 }), (error: unknown) => {
    assert.ok(error instanceof TaskFailed, String(error));
    assert.equal(error.code, "INVALID_JOB");
    assert.match(error.message, /^INVALID_JOB: `model`/);
    return true;
  });
});

test("waiting gives up at the timeout", { skip }, async () => {
  await assert.rejects(publisher().waitForResult(crypto.randomUUID(), { timeoutMs: 300 }), ResultTimeout);
});

test("a wrong token is refused", { skip }, async () => {
  const wrong = new Publisher(new UpstashRedis({ url: url!, token: "wrong-token" }));
  await assert.rejects(wrong.publishJob(sdxlJob()), (error: unknown) => {
    assert.ok(error instanceof UpstashError && error.status === 401);
    return true;
  });
});
