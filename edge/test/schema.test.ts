import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { Ajv2020 } from "ajv/dist/2020.js";

import { buildMessage, TASKS } from "../src/celery.ts";
import { SDXL_TYPES, WAN_TYPES, type CallbackBody, type ChatRequest, type Job } from "../src/schema.ts";

const SCHEMAS = new URL("../../schemas/", import.meta.url);

function schema(name: string): object {
  return JSON.parse(readFileSync(new URL(`${name}.schema.json`, SCHEMAS), "utf8"));
}

const ajv = new Ajv2020({ strict: false, allErrors: true });
const validJob = ajv.compile(schema("job"));
const validChat = ajv.compile(schema("chat-request"));
const validCallback = ajv.compile(schema("callback"));

test("jobs typed as Job validate against schemas/job.schema.json", () => {
  const jobs: Job[] = [
    { id: "a1", type: "sdxl_image_fast", user_id: "u1", prompt: "x", config: { num_images: 3, seed: 0 } },
    {
      id: "a2", type: "video7b_fast_enhanced", user_id: "u1", prompt: "x",
      config: { frames: 83, fps: 16, reference_mode: "both", first_frame: "https://a/1.png", last_frame: "https://a/2.png" },
      metadata: { enhance: { model: "qwen_instruct", max_tokens: 200 } },
    },
  ];
  for (const job of jobs) {
    assert.ok(validJob(job), JSON.stringify(validJob.errors));
    const { envelope } = buildMessage(TASKS.sdxl, [job]);
    const [[sent]] = JSON.parse(Buffer.from(envelope.body, "base64").toString()) as [[unknown]];
    assert.ok(validJob(sent));
  }
  assert.ok(!validJob({ id: "a b", type: "sdxl_image_fast", user_id: "u" }));
  assert.ok(!validJob({ id: "a", type: "sdxl_video", user_id: "u" }));
  assert.ok(!validJob({ id: "a", type: "sdxl_image_fast" }));
  assert.ok(!validJob({ id: "a", type: "sdxl_image_fast", user_id: "u", config: { num_images: 2 } }));
});

test("the generated type constants are the schema's enum", () => {
  const job = schema("job") as { properties: { type: { enum: string[] } } };
  assert.deepEqual(job.properties.type.enum, [...SDXL_TYPES, ...WAN_TYPES]);
});

test("chat requests and callback bodies typed in TypeScript validate", () => {
  const request: ChatRequest = { messages: [{ role: "system", content: "s" }, { role: "user", content: "u" }], max_tokens: 8 };
  assert.ok(validChat(request), JSON.stringify(validChat.errors));
  assert.ok(!validChat({ messages: [{ role: "robot", content: "x" }] }));
  const body: CallbackBody = {
    job_id: "a1", worker_id: "sdxl@host", status: "completed",
    assets: [{
      type: "image", url: "workspace-temp/u1/a1/0.png", thumbnail_url: "workspace-temp/u1/a1/0.thumb.webp",
      metadata: { width: 1024, height: 1024, format: "png", file_size_bytes: 1, asset_index: 0, seed: 42 },
    }],
    metadata: { callback_id: "c", attempt: 1, processing_time: 1.5, batch_size: 1 },
  };
  assert.ok(validCallback(body), JSON.stringify(validCallback.errors));
  assert.ok(!validCallback({ ...body, status: "done" }));
});
