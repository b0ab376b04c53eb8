// Publishing jobs and chat requests, and waiting for a chat's result.
//
// Jobs are routed by `type` (sdxl_* → ourvidz.sdxl.generate, the WAN types →
// ourvidz.wan.generate). With enhancement, a job is published as the chain
// ourvidz.chat.enhance → generate. Results of jobs come back as signed
// callbacks to /functions/v1/job-callback; a chat's result is read from the
// Celery result backend (`celery-task-meta-{task id}`). `standing(jobId)` says where a
// job stands: its place in the pools' fair order and when it should start.

import { buildMessage, familyOf, signature, TASKS, usableId, type MessageOptions, type TaskName } from "./celery.ts";
import { ID_PATTERN, type ChatRequest, type ChatResult, type Job } from "./schema.ts";
import { FAIR_JOB_PREFIX, FAMILY_LISTS, JOB_PREFIX, POOL_PRESENT_S, STANDING_SCRIPT } from "./standing.ts";
import type { RedisCommands } from "./upstash.ts";

export interface Published {
  /** the id of the first task published (the one on the queue now) */
  taskId: string;
  /** every task id, in run order: `[enhance id, generate id]` for a chain */
  taskIds: string[];
  /** the first task's queue */
  queue: string;
  /** the job id (undefined for a chat without an id) */
  jobId?: string;
}

export interface PublishJobOptions {
  /**
   * Enhance the prompt first (ourvidz.chat.enhance → generate). Default: only
   * the `*_enhanced` WAN types not yet enhanced (the WAN task would otherwise
   * enhance them itself, one hop later).
   */
  enhance?: boolean;
  /** the id of the first task (default: a new UUID) */
  taskId?: string;
  /** time after which a worker drops the message unrun */
  expires?: Date | string;
  /** W3C trace context of the caller: the job's spans (chain steps included) join that trace */
  traceparent?: string;
  tracestate?: string;
}

export interface WaitOptions {
  /** give up after this many milliseconds (default 60 000) */
  timeoutMs?: number;
  /** poll interval in milliseconds (default 250, growing to 1 000) */
  intervalMs?: number;
}

/** The task failed: `code` is the contract's error code when the message starts with one. */
export class TaskFailed extends Error {
  constructor(
    message: string,
    readonly taskId: string,
    readonly state: string,
    readonly code?: string,
  ) {
    super(message);
    this.name = "TaskFailed";
  }
}

/** No result within the timeout; the task may still run. */
export class ResultTimeout extends Error {
  constructor(readonly taskId: string, timeoutMs: number) {
    super(`no result for task ${taskId} within ${timeoutMs} ms`);
    this.name = "ResultTimeout";
  }
}

/** Where a job stands (CONTRACT section 7). */
export interface Standing {
  state: "queued" | "running" | "ended" | "unknown";
  family?: string;
  /** 0: the next to start on its family */
  position?: number;
  /** jobs that will start before it */
  ahead?: number;
  /** seconds until it starts, from measured durations */
  eta_s?: number;
  waited_s?: number;
}

export interface PublisherOptions {
  /** where results are read (default: the broker's Redis, as in the cluster's default) */
  results?: RedisCommands;
  /** seconds a pool counts as present without a fetch: the cluster's OURVIDZ_LEASE_SECONDS */
  poolPresentS?: number;
  /** Flower's "origin" of each message (default "edge") */
  origin?: string;
}

const RESULT_KEY = "celery-task-meta-";
const FAILED_STATES = new Set(["FAILURE", "REVOKED", "REJECTED"]);

export class Publisher {
  readonly #broker: RedisCommands;
  readonly #results: RedisCommands;
  readonly #origin: string;
  readonly #present: number;

  constructor(broker: RedisCommands, options: PublisherOptions = {}) {
    this.#broker = broker;
    this.#results = options.results ?? broker;
    this.#origin = options.origin ?? "edge";
    this.#present = options.poolPresentS ?? POOL_PRESENT_S;
  }

  /** Publish a generation job; the result arrives as callbacks, not here. */
  async publishJob(job: Job, options: PublishJobOptions = {}): Promise<Published> {
    checkJob(job);
    const family = familyOf(job.type)!;
    const generate = family === "sdxl" ? TASKS.sdxl : TASKS.wan;
    const enhanced = job.metadata?.enhanced_prompt != null || job.metadata?.enhancement_error != null;
    const enhance = options.enhance ?? (family === "wan" && job.type.endsWith("_enhanced") && !enhanced);
    const trace = { traceparent: options.traceparent, tracestate: options.tracestate };
    if (!enhance) {
      return this.#publish(generate, [job], { taskId: options.taskId, expires: options.expires, ...trace }, job.id);
    }
    const next = signature(generate);
    const first = await this.#publish(
      TASKS.enhance,
      [job],
      { taskId: options.taskId, expires: options.expires, then: [next], ...trace },
      job.id,
    );
    return { ...first, taskIds: [first.taskId, next.options.task_id] };
  }

  /** Publish a chat request; read its answer with `waitForResult` (or use `chat`). */
  async publishChat(request: ChatRequest, options: { taskId?: string } = {}): Promise<Published> {
    if (!Array.isArray(request?.messages) || request.messages.length === 0) {
      throw new TypeError("chat request: `messages` must hold at least one message");
    }
    if (request.id != null && !ID_PATTERN.test(request.id)) {
      throw new TypeError("chat request: `id` must be 1-128 characters of [A-Za-z0-9_-]");
    }
    return this.#publish(TASKS.chat, [request], { taskId: options.taskId }, request.id ?? undefined);
  }

  /** Publish a chat request and wait for its result. */
  async chat(request: ChatRequest, options: WaitOptions = {}): Promise<ChatResult> {
    const { taskId } = await this.publishChat(request);
    return this.waitForResult<ChatResult>(taskId, options);
  }

  /**
   * Wait for a task's result in the result backend. Rejects with `TaskFailed`
   * (its message starts with the error code, e.g. `INVALID_JOB: ...`) or
   * `ResultTimeout`.
   */
  async waitForResult<T = unknown>(taskId: string, options: WaitOptions = {}): Promise<T> {
    const timeoutMs = options.timeoutMs ?? 60_000;
    let interval = options.intervalMs ?? 250;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const raw = await this.#results.command(["GET", `${RESULT_KEY}${taskId}`]);
      if (typeof raw === "string") {
        const meta = JSON.parse(raw) as { status?: string; result?: unknown };
        if (meta.status === "SUCCESS") return meta.result as T;
        if (meta.status !== undefined && FAILED_STATES.has(meta.status)) throw failure(taskId, meta.status, meta.result);
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new ResultTimeout(taskId, timeoutMs);
      await new Promise((resolve) => setTimeout(resolve, Math.min(interval, left)));
      interval = Math.min(interval * 1.5, Math.max(1_000, options.intervalMs ?? 0));
    }
  }

  /**
   * Where a job stands (CONTRACT section 7): `state` and, while queued, its `family`, `position`
   * (0: next to start, in the pools' fair order), `ahead`, `eta_s` and `waited_s`. One script on the
   * broker, whatever the queue's length; cheap enough to poll.
   */
  async standing(jobId: string): Promise<Standing> {
    if (!ID_PATTERN.test(jobId)) throw new TypeError("job id: must be 1-128 characters of [A-Za-z0-9_-]");
    const raw = await this.#broker.command([
      "EVAL", STANDING_SCRIPT, 2 + FAMILY_LISTS.length, `${FAIR_JOB_PREFIX}${jobId}`, `${JOB_PREFIX}${jobId}:final`,
      ...FAMILY_LISTS.map(([list]) => list), jobId, this.#present, ...FAMILY_LISTS.map(([, family]) => family),
    ]);
    return JSON.parse(String(raw)) as Standing;
  }

  async #publish(task: TaskName, args: unknown[], options: MessageOptions, jobId?: string): Promise<Published> {
    const message = buildMessage(task, args, { ...options, origin: this.#origin });
    await this.#broker.command(["LPUSH", message.queue, JSON.stringify(message.envelope)]);
    return { taskId: message.taskId, taskIds: [message.taskId], queue: message.queue, jobId };
  }
}

/** Throws a TypeError naming the field when a job cannot be routed or stored. */
export function checkJob(job: Job): void {
  if (typeof job !== "object" || job === null) throw new TypeError("a job must be an object");
  if (usableId(job) === undefined || typeof job.id !== "string") {
    throw new TypeError("job: `id` must be 1-128 characters of [A-Za-z0-9_-]");
  }
  if (typeof job.user_id !== "string" || !ID_PATTERN.test(job.user_id)) {
    throw new TypeError("job: `user_id` must be 1-128 characters of [A-Za-z0-9_-]");
  }
  if (familyOf(job.type) === undefined) {
    throw new TypeError(`job: unknown \`type\` ${JSON.stringify(job.type)}`);
  }
}

function failure(taskId: string, state: string, result: unknown): TaskFailed {
  let message = state;
  if (typeof result === "object" && result !== null) {
    const exc = result as { exc_type?: string; exc_message?: unknown };
    const text = Array.isArray(exc.exc_message) ? exc.exc_message.map(String).join(" ") : exc.exc_message;
    message = typeof text === "string" && text ? text : (exc.exc_type ?? state);
  }
  const code = /^([A-Z][A-Z0-9_]+): /.exec(message)?.[1];
  return new TaskFailed(message, taskId, state, code);
}
