/**
 * @file The LLM proposer of DiffNAS (Li et al. 2023): an LLM behind any OpenAI-compatible chat-completions
 * endpoint (OpenAI, vLLM, a llama.cpp server, Ollama) proposes UNet candidates from a prompt that holds the task,
 * the space, the budget and the search memory (`search/prompt.ts`).
 *
 * The reply is untrusted data, handled so that nothing in it can act:
 *
 * - Size. A custom `fetch` given to the `openai` client reads the body itself and stops past `maxReplyBytes`
 *   (at once when Content-Length says so, else while streaming, cancelling the rest), so a reply of many MB is
 *   refused after reading at most the bound, before any `JSON.parse`. The client gets the bounded bytes.
 * - Shape. The chat envelope and the reply are checked with zod; the reply's text is `JSON.parse`d (after
 *   stripping ``` fences), never evaluated, and each candidate is parsed with the space's zod schema. A
 *   candidate that fails becomes a `Proposal` with `spec: null` and an error naming the field, so an injected
 *   `"__proto__"` or `"constructor"` key, or a JS expression where a number belongs, is refused as a schema
 *   error. (`JSON.parse` makes `"__proto__"` an own key, not a prototype, so nothing is polluted on the way.)
 * - Memory. Only parsed specs and short error strings are stored with a trial; the next prompt puts them in
 *   the user message as JSON lines, never in the system message. The reply text is kept as `rawReply` (bounded)
 *   for inspection, never fed back.
 *
 * One `propose` call is one request for min(count, candidatesPerCall) candidates: several per request share
 * the prompt's cost and let the model spread them over the space; the caller asks again for more.
 *
 * Structured output. The request asks for `response_format: json_schema` with a `{ candidates: [...] }`
 * wrapper around the candidate's JSON Schema. A server that refuses it (HTTP 400/422 naming response_format or
 * JSON schema) is asked again with `json_object`, then with no `response_format` (the prompt alone asks for
 * JSON); the step down is remembered for the proposer's lifetime and costs no retry.
 *
 * Retries. Each try has `timeoutMs` for the whole exchange, body included: a timer of ours aborts the request,
 * so the bound does not rest on the client's timeout semantics (the client's own timeout, 1 s later, is only a
 * backstop). A try that times out, fails to connect, or gets HTTP
 * 408/409/429/5xx is retried up to `maxRetries` times after `retryBaseMs·2^(try-1)` ms times a jitter factor in
 * [0.5, 1) (Math.random: its job is to spread workers that share a seed), or the server's Retry-After /
 * retry-after-ms, each wait capped at `retryMaxDelayMs`; no wait or try runs past `totalTimeoutMs`. A reply
 * over the size bound and other HTTP errors are not retried (they would recur). The client's own retries are
 * off. When the tries run out, `propose` returns one `Proposal` with `spec: null` and the reason; it never
 * throws for a failed request, so the run goes on and the memory shows the failure.
 *
 * The API key. It is read from the environment variable named by `apiKeyEnv` once, at construction, and lives
 * only in the closure of the custom `fetch`, which sets the Authorization header; the `openai` client, the
 * proposer's fields, prompts, replies and errors never hold it (the client gets a placeholder). Servers that
 * need no key (llama.cpp, Ollama, vLLM without --api-key) work with the variable unset: the placeholder is sent.
 * As a second line, every stored string (prompt, rawReply, error) has the key replaced by `[key]`, in case a
 * server echoes it in an error body.
 */

import OpenAI from "openai";
import { z } from "zod";
import { parseUsage, zodMessage } from "../../util/config.ts";
import { UsageError } from "../../util/errors.ts";
import { buildPrompt, type ChatPrompt, type SearchBudget } from "../prompt.ts";
import type { Proposal, ProposalContext, Proposer, SpaceDescription } from "../types.ts";

/** The proposer's settings (a user's config, so a bad field is a `UsageError`). */
export const LlmSettings = z.strictObject({
  /** API root: "https://api.openai.com/v1", or a local server's ".../v1" (llama.cpp, vLLM, Ollama). */
  baseUrl: z.url({ protocol: /^https?$/ }).default("https://api.openai.com/v1"),
  /** Model name as the server knows it. */
  model: z.string().min(1),
  /** NAME of the environment variable that holds the API key (the key itself never appears in a config). */
  apiKeyEnv: z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, "must be an environment variable name")
    .default("OPENAI_API_KEY"),
  /** One try, request to last byte of the reply. */
  timeoutMs: z.int().min(10).max(3_600_000).default(120_000),
  /** All tries and waits of one `propose` call together. */
  totalTimeoutMs: z.int().min(10).max(86_400_000).default(600_000),
  /** Retries after the first try, on timeouts, connection errors, HTTP 408/409/429/5xx. */
  maxRetries: z.int().min(0).max(20).default(4),
  /** First backoff; doubles per retry, times a jitter factor in [0.5, 1). */
  retryBaseMs: z.int().min(1).max(600_000).default(1000),
  /** Cap of any one wait, Retry-After included. */
  retryMaxDelayMs: z.int().min(1).max(600_000).default(30_000),
  /** Sampling temperature. */
  temperature: z.number().min(0).max(2).default(0.7),
  /** `max_tokens` of the request; null leaves it to the server. */
  maxTokens: z.int().positive().nullable().default(null),
  /** Largest reply body read; a larger one is refused unread past the bound. */
  maxReplyBytes: z.int().min(1024).max(64 * 2 ** 20).default(256 * 1024),
  /** Upper bound of the prompt (both messages), in UTF-16 code units. */
  maxPromptChars: z.int().min(500).max(4_000_000).default(32_000),
  /** Candidates asked for per request (fewer when the caller wants fewer). */
  candidatesPerCall: z.int().min(1).max(64).default(4),
  /** Best trials by proxy FID shown in the prompt. */
  bestK: z.int().min(0).max(1000).default(8),
  /** Most recent other trials shown. */
  recentK: z.int().min(0).max(1000).default(8),
  /** Most recent rejected proposals shown with their reason. */
  rejectedK: z.int().min(0).max(1000).default(6),
});
export type LlmSettings = z.output<typeof LlmSettings>;
export type LlmSettingsInput = z.input<typeof LlmSettings>;

/** How the request asks for JSON; steps down once per server refusal and stays there. */
export type ResponseMode = "json_schema" | "json_object" | "plain";

/** What the caller knows besides the space: the budget the prompt states. */
export interface LlmProposerOptions {
  budget?: SearchBudget;
}

/** The placeholder key the `openai` client holds (it refuses to start without one). */
const PLACEHOLDER_KEY = "no-key";

/** Thrown by the bounded fetch when a reply body passes the size bound. */
export class ReplyTooLargeError extends Error {
  override name = "ReplyTooLargeError";
  constructor(readonly limit: number, readonly declared: number | null, readonly prefix: string) {
    super(
      `reply larger than maxReplyBytes (${limit} bytes${
        declared !== null ? `; Content-Length ${declared}` : ""
      })` +
        ", refused",
    );
  }
}

/**
 * A `fetch` that sets the Authorization header (when a key is given) and reads at most `maxBytes` of the reply
 * body, cancelling the rest; the `Response` it returns holds the bytes read.
 */
export function boundedFetch(maxBytes: number, authorization: string | null): typeof fetch {
  return async (input, init) => {
    const headers = new Headers(init?.headers);
    if (authorization !== null) headers.set("authorization", authorization);
    const res = await fetch(input, { ...init, headers });
    if (!res.body) return res;
    const declared = Number(res.headers.get("content-length") ?? NaN);
    if (declared > maxBytes) {
      await res.body.cancel();
      throw new ReplyTooLargeError(maxBytes, declared, "");
    }
    const reader = res.body.getReader();
    const chunks: Uint8Array[] = [];
    let total = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (total + value.length > maxBytes) {
        chunks.push(value.subarray(0, maxBytes - total));
        await reader.cancel();
        throw new ReplyTooLargeError(maxBytes, null, new TextDecoder().decode(concat(chunks, maxBytes)));
      }
      chunks.push(value);
      total += value.length;
    }
    const out = new Headers(res.headers);
    out.delete("content-length"); // the body is now the decoded bytes
    out.delete("content-encoding");
    return new Response(concat(chunks, total), {
      status: res.status,
      statusText: res.statusText,
      headers: out,
    });
  };
}

function concat(chunks: Uint8Array[], total: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c.subarray(0, total - at), at);
    at += Math.min(c.length, total - at);
  }
  return out;
}

/** `text` cut to at most `maxBytes` of UTF-8 (at a character boundary). */
export function truncateUtf8(text: string, maxBytes: number): string {
  const bytes = new TextEncoder().encode(text);
  if (bytes.length <= maxBytes) return text;
  return new TextDecoder().decode(bytes.subarray(0, maxBytes)).replace(/\uFFFD$/, "");
}

/** The text between the first ``` fence line and the next fence, or the whole text (trimmed). */
export function stripFences(text: string): string {
  const open = text.indexOf("```");
  if (open < 0) return text.trim();
  const lineEnd = text.indexOf("\n", open);
  if (lineEnd < 0) return text.trim();
  const close = text.indexOf("```", lineEnd);
  return text.slice(lineEnd + 1, close < 0 ? undefined : close).trim();
}

/** The `response_format` JSON Schema: `{ candidates: [candidate, ...] }`, with the candidate's `$defs` at the root. */
export function replySchema(candidate: Record<string, unknown>): Record<string, unknown> {
  const { $schema: _, $defs, definitions, ...item } = candidate;
  return {
    type: "object",
    properties: { candidates: { type: "array", items: item } },
    required: ["candidates"],
    additionalProperties: false,
    ...($defs !== undefined ? { $defs } : {}),
    ...(definitions !== undefined ? { definitions } : {}),
  };
}

/** One parsed candidate: a spec the schema accepted, or the reason it did not. */
export interface ParsedCandidate {
  spec: unknown;
  error: string | null;
}

/** The reply's wrapper; other keys (a model's "reasoning" note) are dropped unread, the candidates are checked. */
const ReplyWrapper = z.object({ candidates: z.array(z.unknown()).min(1) });

/**
 * Parses a reply's text into at most `count` candidates with `schema`. Never throws: a reply that is not JSON
 * or has no candidates is one entry with `spec: null` and the reason.
 */
export function parseCandidates(text: string, schema: z.ZodType, count: number): ParsedCandidate[] {
  const body = stripFences(text);
  let value: unknown;
  try {
    value = JSON.parse(body);
  } catch (e) {
    // A reply with prose around the object: try the outermost braces once.
    const from = body.indexOf("{"), to = body.lastIndexOf("}");
    try {
      if (from < 0 || to <= from) throw e;
      value = JSON.parse(body.slice(from, to + 1));
    } catch {
      return [{ spec: null, error: `reply is not JSON: ${cut((e as Error).message, 200)}` }];
    }
  }
  let candidates: unknown[];
  if (Array.isArray(value)) candidates = value;
  else {
    const w = ReplyWrapper.safeParse(value);
    if (!w.success) {
      return [{ spec: null, error: `reply has no candidates: ${zodMessage(w.error, "(reply)")}` }];
    }
    candidates = w.data.candidates;
  }
  if (candidates.length === 0) return [{ spec: null, error: "reply has no candidates: the list is empty" }];
  const n = Math.min(candidates.length, count);
  const out: ParsedCandidate[] = [];
  for (let i = 0; i < n; i++) {
    const r = schema.safeParse(candidates[i]);
    out.push(
      r.success
        ? { spec: r.data, error: null }
        : { spec: null, error: `candidate ${i + 1} of ${n}: ${zodMessage(r.error, "(candidate)")}` },
    );
  }
  return out;
}

const cut = (s: string, n: number) => s.length > n ? `${s.slice(0, n)}…` : s;

/** The parts of a chat completion this proposer reads; a server's reply is checked against it. */
const ChatEnvelope = z.object({
  choices: z.array(z.object({
    message: z.object({ content: z.string().nullish(), refusal: z.string().nullish() }),
    finish_reason: z.string().nullish(),
  })).min(1),
});

/** How one failed try is handled. */
interface Failure {
  /** format: the server refused response_format; retry: transient; final: do not retry. */
  kind: "format" | "retry" | "final";
  message: string;
  retryAfterMs?: number;
  rawReply?: string;
}

/** A try that our timer aborted. */
class TryTimeout extends Error {}

/** The wait a server asked for (retry-after-ms, or Retry-After in seconds or as an HTTP date), if any. */
function retryAfterMs(headers: Headers | undefined): number | undefined {
  const ms = parseFloat(headers?.get("retry-after-ms") ?? "");
  if (Number.isFinite(ms) && ms >= 0) return ms;
  const ra = headers?.get("retry-after");
  if (!ra) return undefined;
  const s = parseFloat(ra);
  if (Number.isFinite(s) && s >= 0) return s * 1000;
  const at = Date.parse(ra);
  return Number.isFinite(at) ? Math.max(0, at - Date.now()) : undefined;
}

/** Every key-bearing string goes through this before it is stored or returned. */
function redactor(key: string | null): (s: string) => string {
  // A short key would match ordinary text; such a key is no secret worth garbling every string for.
  if (key === null || key.length < 8) return (s) => s;
  return (s) => s.split(key).join("[key]");
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Proposes candidates by asking an LLM behind an OpenAI-compatible endpoint. */
export class LlmProposer implements Proposer {
  readonly name = "llm";
  readonly settings: LlmSettings;
  readonly #space: SpaceDescription;
  readonly #candidate: z.ZodType;
  readonly #budget: SearchBudget;
  readonly #client: OpenAI;
  readonly #redact: (s: string) => string;
  readonly #keyUnset: boolean;
  #mode: ResponseMode = "json_schema";

  /**
   * `settings` is a user's config (parsed strictly); `space` is what the prompt shows; `candidate` is the zod
   * schema one candidate must pass. Reads the API key from the environment variable `settings.apiKeyEnv`.
   */
  constructor(
    settings: unknown,
    space: SpaceDescription,
    candidate: z.ZodType,
    options: LlmProposerOptions = {},
  ) {
    this.settings = parseUsage(LlmSettings, settings, "llm proposer settings");
    this.#space = space;
    this.#candidate = candidate;
    this.#budget = options.budget ?? {};
    try {
      this.#prompt([], this.settings.candidatesPerCall); // the memory-free prompt must fit the bound
    } catch (e) {
      throw new UsageError(`llm proposer settings: ${(e as Error).message}`);
    }
    const key = Deno.env.get(this.settings.apiKeyEnv) || null;
    this.#keyUnset = key === null;
    this.#redact = redactor(key);
    this.#client = new OpenAI({
      baseURL: this.settings.baseUrl,
      apiKey: PLACEHOLDER_KEY,
      adminAPIKey: null,
      organization: null,
      project: null,
      webhookSecret: null,
      maxRetries: 0, // retries are ours: backoff, Retry-After cap, total time
      logLevel: "off",
      fetch: boundedFetch(this.settings.maxReplyBytes, key === null ? null : `Bearer ${key}`),
    });
  }

  /** How requests currently ask for JSON (after any step down). */
  get responseMode(): ResponseMode {
    return this.#mode;
  }

  async propose(ctx: ProposalContext): Promise<Proposal[]> {
    const n = Math.min(ctx.count, this.settings.candidatesPerCall);
    if (n <= 0) return [];
    const prompt = this.#prompt(ctx.trials, n);
    const text = this.#redact(prompt.text);
    const reply = await this.#complete(prompt, ctx.seed);
    const rawReply = reply.rawReply === undefined ? null : this.#redact(
      truncateUtf8(reply.rawReply, this.settings.maxReplyBytes),
    );
    if ("error" in reply) {
      return [{ spec: null, parentId: null, prompt: text, rawReply, error: this.#redact(reply.error) }];
    }
    return parseCandidates(reply.content, this.#candidate, n).map((c) => ({
      spec: c.spec,
      parentId: null,
      prompt: text,
      rawReply,
      error: c.error === null ? null : this.#redact(
        reply.cutShort ? `${c.error} (the reply was cut at the token limit)` : c.error,
      ),
    }));
  }

  #prompt(trials: ProposalContext["trials"], count: number): ChatPrompt {
    const s = this.settings;
    return buildPrompt({
      space: this.#space,
      budget: this.#budget,
      trials,
      count,
      limits: {
        maxPromptChars: s.maxPromptChars,
        bestK: s.bestK,
        recentK: s.recentK,
        rejectedK: s.rejectedK,
      },
    });
  }

  /** One chat exchange with retries and response_format fallback: the reply's text, or why there is none. */
  async #complete(
    prompt: ChatPrompt,
    seed: number,
  ): Promise<
    { content: string; rawReply: string; cutShort: boolean } | { error: string; rawReply?: string }
  > {
    const s = this.settings;
    const deadline = performance.now() + s.totalTimeoutMs;
    for (let tries = 1;; tries++) {
      const tryMs = Math.min(s.timeoutMs, Math.floor(deadline - performance.now()));
      let completion: unknown;
      try {
        completion = await this.#requestOnce(prompt, seed, Math.max(1, tryMs));
      } catch (e) {
        const f = this.#classify(e, tryMs);
        if (f.kind === "format") {
          this.#mode = this.#mode === "json_schema" ? "json_object" : "plain";
          tries--; // a step down is not a retry
          continue;
        }
        const fail = (why: string) => ({
          error: `LLM request failed after ${tries} ${tries === 1 ? "try" : "tries"}${why}: ${f.message}`,
          rawReply: f.rawReply,
        });
        if (f.kind === "final") return fail("");
        if (tries > s.maxRetries) return fail("");
        const backoff = s.retryBaseMs * 2 ** (tries - 1) * (0.5 + 0.5 * Math.random());
        const wait = Math.min(f.retryAfterMs ?? backoff, s.retryMaxDelayMs);
        if (performance.now() + wait >= deadline) {
          return fail(` (totalTimeoutMs ${s.totalTimeoutMs} reached)`);
        }
        await sleep(wait);
        continue;
      }
      const env = ChatEnvelope.safeParse(completion);
      if (!env.success) {
        return {
          error: `reply is not a chat completion: ${cut(zodMessage(env.error, "(reply)"), 300)}`,
          rawReply: JSON.stringify(completion) ?? String(completion),
        };
      }
      const { message, finish_reason } = env.data.choices[0];
      if (!message.content) {
        const refusal = message.refusal ? `; refusal: ${cut(message.refusal, 300)}` : "";
        return {
          error: `reply has no content (finish_reason ${finish_reason ?? "none"}${refusal})`,
          rawReply: "",
        };
      }
      return { content: message.content, rawReply: message.content, cutShort: finish_reason === "length" };
    }
  }

  /** One request under its own timer; resolves to the parsed JSON body (unchecked). */
  async #requestOnce(prompt: ChatPrompt, seed: number, ms: number): Promise<unknown> {
    const s = this.settings;
    const format = this.#mode === "json_schema"
      ? {
        response_format: {
          type: "json_schema" as const,
          json_schema: { name: "candidates", strict: true, schema: replySchema(this.#space.jsonSchema) },
        },
      }
      : this.#mode === "json_object"
      ? { response_format: { type: "json_object" as const } }
      : {};
    const controller = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, ms);
    try {
      return await this.#client.chat.completions.create({
        model: s.model,
        messages: [
          { role: "system", content: this.#redact(prompt.system) },
          { role: "user", content: this.#redact(prompt.user) },
        ],
        temperature: s.temperature,
        seed,
        ...(s.maxTokens !== null ? { max_tokens: s.maxTokens } : {}),
        ...format,
      }, { signal: controller.signal, timeout: ms + 1000, maxRetries: 0 });
    } catch (e) {
      throw timedOut ? new TryTimeout() : e;
    } finally {
      clearTimeout(timer);
    }
  }

  #classify(e: unknown, tryMs: number): Failure {
    for (let c: unknown = e, depth = 0; c instanceof Error && depth < 8; c = c.cause, depth++) {
      if (c instanceof ReplyTooLargeError) return { kind: "final", message: c.message, rawReply: c.prefix };
    }
    if (e instanceof TryTimeout || e instanceof OpenAI.APIConnectionTimeoutError) {
      return { kind: "retry", message: `timed out after ${tryMs} ms` };
    }
    if (e instanceof OpenAI.APIError && e.status !== undefined) {
      const message = `HTTP ${cut(e.message, 300)}`;
      if (
        (e.status === 400 || e.status === 422) && this.#mode !== "plain" &&
        /response_format|json.?schema|json_object/i.test(e.message)
      ) return { kind: "format", message };
      if (e.status === 408 || e.status === 409 || e.status === 429 || e.status >= 500) {
        return { kind: "retry", message, retryAfterMs: retryAfterMs(e.headers) };
      }
      const hint = (e.status === 401 || e.status === 403) && this.#keyUnset
        ? ` (no API key sent: ${this.settings.apiKeyEnv} is not set)`
        : "";
      return { kind: "final", message: message + hint };
    }
    if (e instanceof OpenAI.APIConnectionError) {
      const cause = e.cause instanceof Error ? `: ${cut(e.cause.message, 200)}` : "";
      return { kind: "retry", message: `${e.message}${cause}` };
    }
    // Anything else is a body the client could not parse (not JSON) or a bug: retrying would not help.
    return { kind: "final", message: cut(e instanceof Error ? `${e.name}: ${e.message}` : String(e), 300) };
  }
}
