// Celery protocol v2 messages, built by hand (CONTRACT.md section 1).
//
// A message is a JSON envelope whose `body` is base64 of the JSON
// `[args, kwargs, embed]`; its list key is the queue name and it is LPUSHed
// (workers pop the other end, so LPUSH keeps FIFO). `headers.argsrepr` holds
// only the job id: Flower shows it, and prompts must never reach it.
// Web-standard APIs only (btoa, TextEncoder, crypto.randomUUID): runs on Deno.

import { ID_PATTERN, SDXL_TYPES, WAN_TYPES, type JobType } from "./schema.ts";

export const TASKS = {
  sdxl: "ourvidz.sdxl.generate",
  wan: "ourvidz.wan.generate",
  chat: "ourvidz.chat.chat",
  enhance: "ourvidz.chat.enhance",
} as const;

export type TaskName = (typeof TASKS)[keyof typeof TASKS];
export type Family = "sdxl" | "wan";

/** The queue (= Redis list key = routing key) of each task: routing is by task name. */
export const QUEUE_OF_TASK: Record<TaskName, string> = {
  "ourvidz.sdxl.generate": "sdxl",
  "ourvidz.wan.generate": "wan",
  "ourvidz.chat.chat": "chat",
  "ourvidz.chat.enhance": "chat",
};

/** A chain element as `embed.chain` holds it (a serialized Celery signature). */
export interface Signature {
  task: TaskName;
  args: unknown[];
  kwargs: Record<string, unknown>;
  options: { task_id: string; queue: string; routing_key: string; exchange: "" };
  subtask_type: null;
  immutable: boolean;
  chord_size: null;
}

export interface Headers {
  lang: "py";
  task: TaskName;
  id: string;
  shadow: null;
  eta: null;
  expires: string | null;
  group: null;
  group_index: null;
  retries: 0;
  timelimit: [null, null];
  root_id: string;
  parent_id: null;
  argsrepr: string;
  kwargsrepr: "{}";
  origin: string;
  ignore_result: boolean;
  /** W3C trace context: the job's spans join the caller's trace (docs/operators.md, Traces) */
  traceparent?: string;
  tracestate?: string;
}

/** What is LPUSHed onto the queue's list. */
export interface Envelope {
  body: string;
  "content-encoding": "utf-8";
  "content-type": "application/json";
  headers: Headers;
  properties: {
    correlation_id: string;
    reply_to: string;
    delivery_mode: 2;
    delivery_info: { exchange: ""; routing_key: string };
    priority: 0;
    body_encoding: "base64";
    delivery_tag: string;
  };
}

export interface MessageOptions {
  /** the Celery task id (default: a new UUID) */
  taskId?: string;
  /** the tasks that run after this one, in run order (stored last-first in `embed.chain`) */
  then?: Signature[];
  /** shown by Flower as the publisher (default "edge") */
  origin?: string;
  /** ISO 8601 time after which a worker revokes the message instead of running it */
  expires?: Date | string;
  /** W3C `traceparent` of the caller's span (`00-<32 hex>-<16 hex>-<2 hex>`), and its `tracestate` */
  traceparent?: string;
  tracestate?: string;
}

const TRACEPARENT = /^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/;

export interface Message {
  envelope: Envelope;
  /** the Redis list to LPUSH it onto */
  queue: string;
  taskId: string;
}

/** A new unique id (task ids, delivery tags). */
export function newId(): string {
  return crypto.randomUUID();
}

/** Base64 of the UTF-8 JSON of `value` (what `body_encoding: base64` means). */
export function base64Json(value: unknown): string {
  const bytes = new TextEncoder().encode(JSON.stringify(value));
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

/** The usable id of a payload (`id`, else the legacy `job_id`), or undefined. */
export function usableId(payload: unknown): string | undefined {
  if (typeof payload !== "object" || payload === null) return undefined;
  const record = payload as Record<string, unknown>;
  for (const key of ["id", "job_id"]) {
    const value = record[key];
    if (value !== undefined && value !== null) {
      return typeof value === "string" && ID_PATTERN.test(value) ? value : undefined;
    }
  }
  return undefined;
}

/** `headers.argsrepr`: the Python repr of `(job_id,)`, never the payload. */
export function argsrepr(payload: unknown): string {
  return `('${usableId(payload) ?? "?"}',)`;
}

/** The model family of a job type, or undefined for an unknown type. */
export function familyOf(type: unknown): Family | undefined {
  if ((SDXL_TYPES as readonly unknown[]).includes(type)) return "sdxl";
  if ((WAN_TYPES as readonly unknown[]).includes(type)) return "wan";
  return undefined;
}

export function isJobType(type: unknown): type is JobType {
  return familyOf(type) !== undefined;
}

/** A chain element: `task` called with the previous task's result (plus `args`). */
export function signature(task: TaskName, args: unknown[] = [], taskId: string = newId()): Signature {
  const queue = QUEUE_OF_TASK[task];
  return {
    task,
    args,
    kwargs: {},
    options: { task_id: taskId, queue, routing_key: queue, exchange: "" },
    subtask_type: null,
    immutable: false,
    chord_size: null,
  };
}

/** The protocol v2 message of `task(...args)`, and the list it goes to. */
export function buildMessage(task: TaskName, args: unknown[], options: MessageOptions = {}): Message {
  const taskId = options.taskId ?? newId();
  const queue = QUEUE_OF_TASK[task];
  if (queue === undefined) throw new TypeError(`unknown task ${JSON.stringify(task)}`);
  const chain = options.then && options.then.length > 0 ? [...options.then].reverse() : null;
  const embed = { callbacks: null, errbacks: null, chain, chord: null };
  const expires = options.expires instanceof Date ? options.expires.toISOString() : (options.expires ?? null);
  const envelope: Envelope = {
    body: base64Json([args, {}, embed]),
    "content-encoding": "utf-8",
    "content-type": "application/json",
    headers: {
      lang: "py",
      task,
      id: taskId,
      shadow: null,
      eta: null,
      expires,
      group: null,
      group_index: null,
      retries: 0,
      timelimit: [null, null],
      root_id: taskId,
      parent_id: null,
      argsrepr: argsrepr(args[0]),
      kwargsrepr: "{}",
      origin: options.origin ?? "edge",
      ignore_result: false,
    },
    properties: {
      correlation_id: taskId,
      reply_to: "",
      delivery_mode: 2,
      delivery_info: { exchange: "", routing_key: queue },
      priority: 0,
      body_encoding: "base64",
      delivery_tag: newId(),
    },
  };
  if (options.traceparent !== undefined) {
    if (!TRACEPARENT.test(options.traceparent)) throw new TypeError("traceparent must be a W3C traceparent");
    envelope.headers.traceparent = options.traceparent;
    if (options.tracestate) envelope.headers.tracestate = options.tracestate;
  }
  return { envelope, queue, taskId };
}
