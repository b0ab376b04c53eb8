// @ourvidz/edge-publisher: publish ourvidz jobs from a Supabase Edge Function (Deno) or Node.
//
//   import { Publisher, UpstashRedis } from "./mod.ts";
//   const publisher = new Publisher(UpstashRedis.fromEnv((name) => Deno.env.get(name)));
//   await publisher.publishJob(job);                        // result: the job-callback
//   const where = await publisher.standing(job.id);         // { state, position, eta_s, ... }
//   const answer = await publisher.chat({ messages }, { timeoutMs: 30_000 });

export {
  argsrepr,
  base64Json,
  buildMessage,
  familyOf,
  isJobType,
  newId,
  QUEUE_OF_TASK,
  signature,
  TASKS,
  usableId,
  type Envelope,
  type Family,
  type Message,
  type MessageOptions,
  type Signature,
  type TaskName,
} from "./celery.ts";
export {
  checkJob,
  Publisher,
  ResultTimeout,
  TaskFailed,
  type Published,
  type PublisherOptions,
  type PublishJobOptions,
  type Standing,
  type WaitOptions,
} from "./publisher.ts";
export * from "./schema.ts";
export { UpstashError, UpstashRedis, type RedisCommands, type UpstashOptions } from "./upstash.ts";
