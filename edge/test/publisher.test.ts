import assert from "node:assert/strict";
import { test } from "node:test";

import { Publisher, ResultTimeout, TaskFailed } from "../src/publisher.ts";
import type { Job } from "../src/schema.ts";
import { UpstashError, UpstashRedis, type RedisCommands } from "../src/upstash.ts";

/** An in-memory stand-in for Redis: lists and strings, enough for the publisher. */
class MemoryRedis implements RedisCommands {
  lists = new Map<string, string[]>();
  strings = new Map<string, string>();
  commands: (string | number)[][] = [];

  async command(args: (string | number)[]): Promise<unknown> {
    this.commands.push(args);
    const [name, key, value] = args.map(String);
    if (name === "LPUSH") {
      const list = this.lists.get(key) ?? [];
      list.unshift(value);
      this.lists.set(key, list);
      return list.length;
    }
    if (name === "GET") return this.strings.get(key) ?? null;
    throw new Error(`unsupported ${name}`);
  }

  envelopes(queue: string): { headers: Record<string, unknown>; body: string }[] {
    return (this.lists.get(queue) ?? []).map((item) => JSON.parse(item));
  }
}

function job(fields: Partial<Job> = {}): Job {
  return { id: "job_1", type: "sdxl_image_fast", user_id: "user_1", prompt: "a cat", ...fields };
}

function body(envelope: { body: string }): [unknown[], unknown, { chain: { task: string }[] | null }] {
  return JSON.parse(Buffer.from(envelope.body, "base64").toString("utf8"));
}

test("jobs are routed by type, never by anything else", async () => {
  const redis = new MemoryRedis();
  const publisher = new Publisher(redis);
  const a = await publisher.publishJob(job());
  const b = await publisher.publishJob(job({ id: "job_2", type: "image_fast" }));
  assert.equal(a.queue, "sdxl");
  assert.equal(b.queue, "wan");
  assert.equal(redis.envelopes("sdxl")[0].headers.task, "ourvidz.sdxl.generate");
  assert.equal(redis.envelopes("wan")[0].headers.task, "ourvidz.wan.generate");
  assert.deepEqual(a.taskIds, [a.taskId]);
  assert.equal(a.jobId, "job_1");
});

test("enhanced WAN types become enhance -> generate chains; enhance is optional for others", async () => {
  const redis = new MemoryRedis();
  const publisher = new Publisher(redis);
  const chained = await publisher.publishJob(job({ type: "video7b_fast_enhanced" }));
  assert.equal(chained.queue, "chat");
  assert.equal(chained.taskIds.length, 2);
  const [envelope] = redis.envelopes("chat");
  assert.equal(envelope.headers.task, "ourvidz.chat.enhance");
  assert.equal(envelope.headers.argsrepr, "('job_1',)");
  const chain = body(envelope)[2].chain!;
  assert.deepEqual(chain.map((s) => s.task), ["ourvidz.wan.generate"]);
  assert.equal((chain[0] as unknown as { options: { task_id: string } }).options.task_id, chained.taskIds[1]);

  const already = await publisher.publishJob(
    job({ id: "job_2", type: "image7b_fast_enhanced", metadata: { enhanced_prompt: "done" } }),
  );
  assert.equal(already.queue, "wan");
  const sdxl = await publisher.publishJob(job({ id: "job_3" }), { enhance: true });
  assert.equal(sdxl.queue, "chat");
  assert.deepEqual(body(redis.envelopes("chat")[0])[2].chain!.map((s) => s.task), ["ourvidz.sdxl.generate"]);
  const off = await publisher.publishJob(job({ id: "job_4", type: "video7b_fast_enhanced" }), { enhance: false });
  assert.equal(off.queue, "wan");
});

test("a job that cannot be routed or stored is refused before anything is sent", async () => {
  const redis = new MemoryRedis();
  const publisher = new Publisher(redis);
  const bad: [Partial<Job>, RegExp][] = [
    [{ id: "has space" }, /`id`/],
    [{ user_id: "../etc" }, /`user_id`/],
    [{ type: "sdxl_video" as Job["type"] }, /`type`/],
  ];
  for (const [fields, message] of bad) {
    await assert.rejects(publisher.publishJob(job(fields)), message);
  }
  await assert.rejects(publisher.publishChat({ messages: [] }), /messages/);
  assert.equal(redis.commands.length, 0);
});

test("waitForResult returns a success, throws a failure with its code, and times out", async () => {
  const redis = new MemoryRedis();
  const publisher = new Publisher(redis);
  const { taskId } = await publisher.publishChat({ messages: [{ role: "user", content: "hi" }] });
  setTimeout(() => {
    redis.strings.set(`celery-task-meta-${taskId}`, JSON.stringify({ status: "STARTED", result: null }));
  }, 20);
  setTimeout(() => {
    redis.strings.set(
      `celery-task-meta-${taskId}`,
      JSON.stringify({ status: "SUCCESS", result: { response: "blue" }, task_id: taskId }),
    );
  }, 120);
  assert.deepEqual(await publisher.waitForResult(taskId, { timeoutMs: 5_000, intervalMs: 10 }), { response: "blue" });

  redis.strings.set(
    "celery-task-meta-t-fail",
    JSON.stringify({
      status: "FAILURE",
      result: { exc_type: "InvalidJob", exc_message: ["INVALID_JOB: `model` must be one of qwen_instruct, qwen_base"] },
    }),
  );
  await assert.rejects(publisher.waitForResult("t-fail", { timeoutMs: 1_000 }), (error: unknown) => {
    assert.ok(error instanceof TaskFailed);
    assert.equal(error.code, "INVALID_JOB");
    assert.match(error.message, /^INVALID_JOB: `model`/);
    return true;
  });

  const started = Date.now();
  await assert.rejects(publisher.waitForResult("never", { timeoutMs: 150, intervalMs: 20 }), ResultTimeout);
  assert.ok(Date.now() - started < 1_000);
});

test("results can live on another Redis than the broker", async () => {
  const broker = new MemoryRedis();
  const results = new MemoryRedis();
  const publisher = new Publisher(broker, { results });
  results.strings.set("celery-task-meta-x", JSON.stringify({ status: "SUCCESS", result: 1 }));
  assert.equal(await publisher.waitForResult("x", { timeoutMs: 100 }), 1);
  assert.equal(broker.commands.length, 0);
});

test("the Upstash client POSTs the command with the bearer token, and hides the token in errors", async () => {
  const seen: { url: string; init: RequestInit }[] = [];
  let answer: Response = Response.json({ result: 3 });
  const fake = async (url: string | URL | Request, init?: RequestInit): Promise<Response> => {
    seen.push({ url: String(url), init: init ?? {} });
    return answer;
  };
  const redis = new UpstashRedis({ url: "https://example.upstash.io/", token: "tok-secret", fetch: fake });
  assert.equal(await redis.command(["LPUSH", "sdxl", "x"]), 3);
  assert.equal(seen[0].url, "https://example.upstash.io");
  assert.equal(seen[0].init.method, "POST");
  assert.equal(new Headers(seen[0].init.headers).get("authorization"), "Bearer tok-secret");
  assert.deepEqual(JSON.parse(String(seen[0].init.body)), ["LPUSH", "sdxl", "x"]);

  answer = Response.json({ error: "WRONGTYPE Operation against a key" }, { status: 400 });
  await assert.rejects(redis.command(["LPUSH", "k", "v"]), (error: unknown) => {
    assert.ok(error instanceof UpstashError);
    assert.equal(error.status, 400);
    assert.match(error.message, /^LPUSH: WRONGTYPE/);
    assert.ok(!error.message.includes("tok-secret"));
    return true;
  });
  answer = new Response("<html>bad gateway</html>", { status: 502 });
  await assert.rejects(redis.command(["GET", "k"]), /GET: HTTP 502/);

  const failing = new UpstashRedis({
    url: "https://example.upstash.io",
    token: "tok-secret",
    fetch: async () => {
      throw new TypeError("network down tok-secret");
    },
  });
  await assert.rejects(failing.command(["GET", "k"]), (error: unknown) => {
    assert.ok(error instanceof UpstashError && !error.message.includes("tok-secret"));
    return true;
  });
  assert.throws(() => UpstashRedis.fromEnv(() => undefined), /UPSTASH_REDIS_REST_URL/);
});

test("no secret of the publisher reaches a message", async () => {
  const pushed: string[] = [];
  const fake = async (_url: string | URL | Request, init?: RequestInit): Promise<Response> => {
    pushed.push(String(init?.body));
    return Response.json({ result: 1 });
  };
  const publisher = new Publisher(new UpstashRedis({ url: "https://x.upstash.io", token: "tok-secret", fetch: fake }));
  await publisher.publishJob(job({ type: "video7b_high_enhanced" }));
  await publisher.publishChat({ messages: [{ role: "user", content: "hi" }] });
  for (const request of pushed) {
    const [, , message] = JSON.parse(request) as string[];
    assert.ok(!message.includes("tok-secret"));
    assert.ok(!Buffer.from(JSON.parse(message).body, "base64").toString().includes("tok-secret"));
  }
});
