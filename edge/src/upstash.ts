// The Upstash Redis REST API: POST a command as a JSON array, get {"result": ...}.
// Only fetch: runs on Deno (Supabase Edge Functions) and Node 18+.

/** Anything that runs one Redis command and returns its result. */
export interface RedisCommands {
  command(args: (string | number)[]): Promise<unknown>;
}

/** An error answer of the REST API or of the transport; never contains the token. */
export class UpstashError extends Error {
  constructor(
    message: string,
    readonly status?: number,
  ) {
    super(message);
    this.name = "UpstashError";
  }
}

export interface UpstashOptions {
  /** e.g. `https://eu1-xxx.upstash.io` (UPSTASH_REDIS_REST_URL) */
  url: string;
  /** UPSTASH_REDIS_REST_TOKEN */
  token: string;
  /** milliseconds one request may take (default 10 000) */
  timeoutMs?: number;
  /** a fetch implementation (default: the global one) */
  fetch?: typeof fetch;
}

export class UpstashRedis implements RedisCommands {
  readonly url: string;
  readonly #token: string;
  readonly #timeoutMs: number;
  readonly #fetch: typeof fetch;

  constructor(options: UpstashOptions) {
    if (!options.url) throw new TypeError("UpstashRedis: `url` is required");
    if (!options.token) throw new TypeError("UpstashRedis: `token` is required");
    this.url = options.url.replace(/\/+$/, "");
    this.#token = options.token;
    this.#timeoutMs = options.timeoutMs ?? 10_000;
    this.#fetch = options.fetch ?? ((input, init) => fetch(input, init));
  }

  /** From UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN, e.g. `UpstashRedis.fromEnv(Deno.env.get)`. */
  static fromEnv(get: (name: string) => string | undefined): UpstashRedis {
    const url = get("UPSTASH_REDIS_REST_URL");
    const token = get("UPSTASH_REDIS_REST_TOKEN");
    if (!url || !token) throw new TypeError("UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN must be set");
    return new UpstashRedis({ url, token });
  }

  async command(args: (string | number)[]): Promise<unknown> {
    const name = String(args[0] ?? "").toUpperCase();
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), this.#timeoutMs);
    let response: Response;
    try {
      response = await this.#fetch(this.url, {
        method: "POST",
        headers: { Authorization: `Bearer ${this.#token}`, "Content-Type": "application/json" },
        body: JSON.stringify(args),
        signal: abort.signal,
      });
    } catch (error) {
      const why = abort.signal.aborted ? `timed out after ${this.#timeoutMs} ms` : String((error as Error)?.name ?? error);
      throw new UpstashError(`${name}: request failed (${why})`);
    } finally {
      clearTimeout(timer);
    }
    let data: { result?: unknown; error?: unknown } | undefined;
    try {
      data = (await response.json()) as { result?: unknown; error?: unknown };
    } catch {
      data = undefined;
    }
    if (!response.ok || data === undefined || data.error !== undefined) {
      const why = typeof data?.error === "string" ? data.error : `HTTP ${response.status}`;
      throw new UpstashError(`${name}: ${why}`, response.status);
    }
    return data.result ?? null;
  }
}
