/**
 * @file The search memory in PostgreSQL (`npm:postgres`, postgres.js): the `SearchStorage` that lets search
 * processes and workers on many machines share one search (`--storage postgres://…`).
 *
 * Design: the trial table is the queue. A worker claims the oldest queued trial with
 * `SELECT … FOR UPDATE SKIP LOCKED` (two workers never wait on or take the same row), heartbeats by updating
 * the trial's `heartbeat_at`, and every try is a row of `attempts` (worker, start, end, error, late result).
 * pg-boss was considered and not used: its jobs live in its own table, so a trial's state would be kept twice
 * and the two could disagree after a crash (pg-boss completes a job on its own connection, not in the
 * transaction that writes the trial's result); its expiry drops a late completion instead of recording it on
 * the attempt; and its retry counts and times are its own, where the contract wants them on the trial (and
 * `requeueStale(graceMs, now)` testable with a given clock). What pg-boss would bring — SKIP LOCKED claims,
 * heartbeat expiry, a retry limit, one job per key — is here in a few statements on the trial table: the
 * canonical key is UNIQUE (its singleton key), `requeueStale(grace, now, maxAttempts)` is its expiry and retry
 * limit. A trial that fails by itself (an exception, a diverged loss) is a result, not retried.
 *
 * Tables, in a schema of their own per search (`search_<name>`, so one database holds many searches): the
 * SQLite memory's `meta`, `trials` and `attempts` with the same columns (JSON as `json`, which keeps the text
 * as written; times as `bigint` milliseconds), and `weights(trial_id, data)`: each done trial's EMA weights
 * (safetensors bytes), so that workers on other machines can inherit from them and the report can be drawn
 * from the database alone.
 *
 * Heartbeats come from a thread with its own connection (search/heartbeat_thread.ts), so that synchronous
 * kernels holding the main thread do not stop them.
 *
 * Times come from the database server's clock (one clock for every machine: a worker whose clock is off by a
 * minute must not look dead); `requeueStale`'s `now` overrides it. Every state change is one transaction; the
 * row lock taken by `finish` and `requeueStale` orders a late result against its re-queue. Trial ids are
 * assigned under a per-search advisory lock, so they are gapless in creation order as in SQLite.
 *
 * The connection string's password is never printed or stored: `label` is the URL without it, and every error
 * this storage throws has it scrubbed. TLS options in the URL pass through: `sslmode` (disable, prefer,
 * require, verify-full) to postgres.js, `sslrootcert`, `sslcert` and `sslkey` (file paths) read into its
 * `ssl` options.
 */

import { Buffer } from "node:buffer";
import postgres from "postgres";
import type {
  HeartbeatStats,
  NewTrial,
  SearchStorage,
  Trial,
  TrialAttempt,
  TrialResult,
  TrialStatus,
} from "./types.ts";

/** Version of the tables below; bumped with any change to them. */
export const PG_SCHEMA_VERSION = 1;
/** Search names: the PostgreSQL schema is `search_<name>`. */
const NAME = /^[a-z][a-z0-9_]{0,39}$/;
const SCHEMA_PREFIX = "search_";

/** Whether `spec` is a PostgreSQL connection string (else `--storage` names SQLite). */
export function isPostgresUrl(spec: string): boolean {
  return /^postgres(ql)?:\/\//i.test(spec);
}

/** The connection string without its password (safe to print, log and store). */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = "***";
    return u.toString();
  } catch {
    // Not parseable: hide everything between "//user:" and "@".
    return url.replace(/(\/\/[^:/@]*:)[^@]*@/, "$1***@");
  }
}

/** The password of a connection string (percent-decoded as the client sends it), or "". */
function passwordOf(url: string): string {
  try {
    return decodeURIComponent(new URL(url).password);
  } catch {
    return "";
  }
}

const STATUSES: readonly TrialStatus[] = ["queued", "running", "done", "failed", "pruned", "rejected"];
/** The server's clock in milliseconds since the epoch, as a fragment of a statement. */
const nowMs = (tx: Tx) => tx`(extract(epoch from clock_timestamp()) * 1000)::bigint`;

const SCHEMA = `
CREATE TABLE meta (
  name text PRIMARY KEY,
  value text NOT NULL
);
CREATE TABLE trials (
  id bigint PRIMARY KEY,
  key text NOT NULL UNIQUE,
  spec json NOT NULL,
  proposer text NOT NULL,
  prompt text,
  raw_reply text,
  seed bigint NOT NULL,
  status text NOT NULL CHECK (status IN (${STATUSES.map((s) => `'${s}'`).join(", ")})),
  scores json NOT NULL,
  costs json NOT NULL,
  loss_history json NOT NULL,
  error text,
  created_at bigint NOT NULL,
  heartbeat_at bigint,
  parent_id bigint REFERENCES trials(id)
);
CREATE INDEX trials_by_status ON trials(status, id);
CREATE TABLE attempts (
  trial_id bigint NOT NULL REFERENCES trials(id),
  n integer NOT NULL,
  worker text NOT NULL,
  started_at bigint NOT NULL,
  ended_at bigint,
  error text,
  late_result json,
  PRIMARY KEY (trial_id, n)
);
CREATE TABLE weights (
  trial_id bigint PRIMARY KEY REFERENCES trials(id),
  data bytea NOT NULL
);
`;

/** Options of `PostgresStorage.open`. */
export interface PostgresStorageOptions {
  /** The search's name in the database (default "default"): its tables are in schema `search_<name>`. */
  search?: string;
  /** Connections in the pool (default 4: a worker needs one for heartbeats while another writes). */
  maxConnections?: number;
  /** Seconds to wait for a connection before failing (default 15). */
  connectTimeoutSeconds?: number;
}

type Sql = postgres.Sql;
type Tx = postgres.TransactionSql;
type Row = Record<string, unknown>;

/** postgres.js options from a URL: TLS file options read and taken out of the startup parameters. */
async function clientOptions(
  url: string,
  o: PostgresStorageOptions,
): Promise<[string, postgres.Options<never>]> {
  const u = new URL(url);
  const files: Record<string, string> = {};
  for (const k of ["sslrootcert", "sslcert", "sslkey"]) {
    const v = u.searchParams.get(k);
    if (v !== null && v !== "system") {
      files[k] = v;
      u.searchParams.delete(k);
    }
  }
  const opts: postgres.Options<never> = {
    max: o.maxConnections ?? 4,
    connect_timeout: o.connectTimeoutSeconds ?? 15,
    onnotice: () => {}, // "schema already exists, skipping" and the like are not the user's business
    connection: { application_name: "diffusion-search" },
  };
  if (Object.keys(files).length) {
    const read = async (k: string) => {
      try {
        return await Deno.readTextFile(files[k]);
      } catch (e) {
        throw new Error(`${k}=${files[k]}: ${(e as Error).message}`);
      }
    };
    const mode = u.searchParams.get("sslmode") ?? "verify-full";
    u.searchParams.delete("sslmode");
    opts.ssl = {
      ...(files.sslrootcert ? { ca: await read("sslrootcert") } : {}),
      ...(files.sslcert ? { cert: await read("sslcert") } : {}),
      ...(files.sslkey ? { key: await read("sslkey") } : {}),
      // libpq's meaning: require encrypts without checking the certificate, verify-* checks it.
      rejectUnauthorized: mode.startsWith("verify"),
      ...(mode === "verify-ca" ? { checkServerIdentity: () => undefined } : {}),
    };
  }
  return [u.toString(), opts];
}

/** The search memory of one search in a PostgreSQL database (see the file comment). */
export class PostgresStorage implements SearchStorage {
  readonly #sql: Sql;
  readonly #password: string;
  /** The connection string, for the heartbeat thread's own connection (never printed). */
  readonly #url: string;
  #open = true;
  #thread: Worker | null = null;
  #threadReady: Promise<void> = Promise.resolve();
  readonly #stopped = new Map<number, (s: HeartbeatStats) => void>();

  private constructor(
    /** The connection string without its password. */
    readonly label: string,
    /** The search's name; its tables are in schema `search_<name>`. */
    readonly search: string,
    sql: Sql,
    url: string,
    password: string,
  ) {
    this.#sql = sql;
    this.#url = url;
    this.#password = password;
  }

  /** Connects to the search `opts.search` at `url`, creating its tables if needed; refuses another version. */
  static async open(url: string, opts: PostgresStorageOptions = {}): Promise<PostgresStorage> {
    const search = opts.search ?? "default";
    const label = redactUrl(url), password = passwordOf(url);
    if (!NAME.test(search)) {
      throw new Error(
        `search name ${
          JSON.stringify(search)
        }: use 1 to 40 lower-case letters, digits and _, starting with a letter`,
      );
    }
    let sql: Sql;
    try {
      const [clean, o] = await clientOptions(url, opts);
      sql = postgres(clean, {
        ...o,
        connection: { ...o.connection, search_path: `${SCHEMA_PREFIX}${search}` },
      });
    } catch (e) {
      throw scrubbed(e, password, `cannot open search memory ${label}`);
    }
    const store = new PostgresStorage(label, search, sql, url, password);
    try {
      await store.#tx((tx) => store.#initSchema(tx));
    } catch (e) {
      await sql.end({ timeout: 1 }).catch(() => {});
      throw scrubbed(e, password, `cannot open search ${search} in ${label}`);
    }
    return store;
  }

  /** The names of the searches held in the database at `url`. */
  static async listSearches(url: string, opts: PostgresStorageOptions = {}): Promise<string[]> {
    const password = passwordOf(url);
    let sql: Sql | undefined;
    try {
      const [clean, o] = await clientOptions(url, opts);
      sql = postgres(clean, { ...o, max: 1 });
      const rows = await sql`SELECT nspname FROM pg_namespace WHERE starts_with(nspname, ${SCHEMA_PREFIX})
                             ORDER BY nspname`;
      return rows.map((r) => String(r.nspname).slice(SCHEMA_PREFIX.length)).filter((n) => NAME.test(n));
    } catch (e) {
      throw scrubbed(e, password, `cannot list the searches in ${redactUrl(url)}`);
    } finally {
      await sql?.end({ timeout: 1 }).catch(() => {});
    }
  }

  /** Drops the search `name` and everything in it (tests; `--search` names are refused like in `open`). */
  static async dropSearch(url: string, name: string): Promise<void> {
    if (!NAME.test(name)) throw new Error(`search name ${JSON.stringify(name)} is not a search name`);
    const [clean, o] = await clientOptions(url, {});
    const sql = postgres(clean, { ...o, max: 1 });
    try {
      await sql.unsafe(`DROP SCHEMA IF EXISTS ${SCHEMA_PREFIX}${name} CASCADE`);
    } catch (e) {
      throw scrubbed(e, passwordOf(url), `cannot drop search ${name} in ${redactUrl(url)}`);
    } finally {
      await sql.end({ timeout: 1 });
    }
  }

  /** Creates the tables of a new search; checks the version of an existing one. */
  async #initSchema(tx: Tx): Promise<void> {
    const schema = `${SCHEMA_PREFIX}${this.search}`;
    // Two processes opening a new search at once: the second waits here and then finds the tables.
    await tx`SELECT pg_advisory_xact_lock(hashtext(${schema}))`;
    const tables = (await tx`SELECT table_name FROM information_schema.tables WHERE table_schema = ${schema}`)
      .map((r) => String(r.table_name));
    if (!tables.includes("meta")) {
      if (tables.length) {
        throw new Error(`schema ${schema} is not a search memory (tables ${tables.join(", ")})`);
      }
      await tx.unsafe(`CREATE SCHEMA IF NOT EXISTS ${schema}`);
      await tx.unsafe(SCHEMA);
      await tx`INSERT INTO meta(name, value) VALUES ('schema_version', ${String(PG_SCHEMA_VERSION)})`;
      return;
    }
    const v = (await tx`SELECT value FROM meta WHERE name = 'schema_version'`)[0]?.value;
    if (v !== String(PG_SCHEMA_VERSION)) {
      throw new Error(
        `its schema version is ${v ?? "missing"}; this program reads version ${PG_SCHEMA_VERSION}`,
      );
    }
  }

  /** Runs `f` as one transaction (rolled back if it throws); errors have the password scrubbed. */
  async #tx<T>(f: (tx: Tx) => Promise<T>): Promise<T> {
    if (!this.#open) throw new Error(`search memory ${this.label} (${this.search}) is closed`);
    try {
      return await this.#sql.begin((tx) => f(tx)) as T;
    } catch (e) {
      throw scrubbed(e, this.#password);
    }
  }

  /** Runs reads in one read-only snapshot (REPEATABLE READ: the trials and their attempts agree). */
  async #read<T>(f: (tx: Tx) => Promise<T>): Promise<T> {
    if (!this.#open) throw new Error(`search memory ${this.label} (${this.search}) is closed`);
    try {
      return await this.#sql.begin("ISOLATION LEVEL REPEATABLE READ READ ONLY", (tx) => f(tx)) as T;
    } catch (e) {
      throw scrubbed(e, this.#password);
    }
  }

  async getMeta(): Promise<Record<string, unknown> | null> {
    return await this.#read(async (tx) => {
      const v = (await tx`SELECT value FROM meta WHERE name = 'settings'`)[0]?.value;
      return v === undefined ? null : JSON.parse(String(v));
    });
  }

  async setMeta(meta: Record<string, unknown>): Promise<void> {
    const json = JSON.stringify(meta);
    await this.#tx((tx) =>
      tx`INSERT INTO meta(name, value) VALUES ('settings', ${json})
         ON CONFLICT (name) DO UPDATE SET value = excluded.value`
    );
  }

  async addTrial(t: NewTrial): Promise<{ trial: Trial; added: boolean }> {
    const status = t.status ?? "queued";
    if (typeof t.key !== "string" || !t.key) throw new Error("addTrial: key must be a non-empty string");
    if (status !== "queued" && status !== "rejected") {
      throw new Error(`addTrial: status must be "queued" or "rejected", got ${JSON.stringify(status)}`);
    }
    if (status === "rejected" && !t.error) {
      throw new Error("addTrial: a rejected trial needs an error saying why");
    }
    if (!Number.isSafeInteger(t.seed)) throw new Error(`addTrial: seed must be an integer, got ${t.seed}`);
    const spec = JSON.stringify(t.spec);
    if (spec === undefined) throw new Error("addTrial: spec must be JSON-serialisable");
    return await this.#tx(async (tx) => {
      // Ids in creation order without gaps: one adder at a time per search (adds are rare, claims are not).
      await tx`SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':add'))`;
      const existing = await trialWhere(tx, "key", t.key);
      if (existing) return { trial: existing, added: false };
      const parent = t.parentId ?? null;
      if (parent !== null && !(await tx`SELECT 1 FROM trials WHERE id = ${parent}`).length) {
        throw new Error(`addTrial: parentId ${parent} is not a trial of this memory`);
      }
      const [row] = await tx`
        INSERT INTO trials(id, key, spec, proposer, prompt, raw_reply, seed, status, scores, costs, loss_history,
          error, created_at, heartbeat_at, parent_id)
        VALUES ((SELECT COALESCE(MAX(id), 0) + 1 FROM trials), ${t.key}, ${spec}::json, ${t.proposer},
          ${t.prompt ?? null}, ${t.rawReply ?? null}, ${t.seed}, ${status}, '{}', ${
        JSON.stringify(t.costs ?? {})
      }::json,
          '[]', ${t.error ?? null}, ${nowMs(tx)}, NULL, ${parent})
        RETURNING id`;
      return { trial: (await trialWhere(tx, "id", Number(row.id)))!, added: true };
    });
  }

  async claimNext(worker: string): Promise<Trial | null> {
    return await this.#tx(async (tx) => {
      const rows = await tx`
        UPDATE trials SET status = 'running', heartbeat_at = ${nowMs(tx)}
        WHERE id = (SELECT id FROM trials WHERE status = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
        RETURNING id, heartbeat_at`;
      if (!rows.length) return null;
      const id = Number(rows[0].id);
      await tx`
        INSERT INTO attempts(trial_id, n, worker, started_at)
        VALUES (${id}, (SELECT COALESCE(MAX(n), 0) + 1 FROM attempts WHERE trial_id = ${id}), ${worker},
          ${rows[0].heartbeat_at})`;
      return await trialWhere(tx, "id", id);
    });
  }

  async heartbeat(id: number, worker: string): Promise<boolean> {
    return await this.#tx(async (tx) => {
      const r = await tx`
        UPDATE trials SET heartbeat_at = ${nowMs(tx)}
        WHERE id = ${id} AND status = 'running' AND EXISTS (
          SELECT 1 FROM attempts WHERE trial_id = trials.id AND worker = ${worker} AND ended_at IS NULL)`;
      return r.count === 1;
    });
  }

  async finish(id: number, worker: string, result: TrialResult): Promise<boolean> {
    if (!["done", "failed", "pruned"].includes(result.status)) {
      throw new Error(`finish: status must be done, failed or pruned, got ${JSON.stringify(result.status)}`);
    }
    return await this.#tx(async (tx) => {
      // The row lock orders this against a concurrent re-queue of the same trial.
      const [t] = await tx`SELECT status FROM trials WHERE id = ${id} FOR UPDATE`;
      if (!t) return false;
      const [open] = t.status === "running"
        ? await tx`SELECT n FROM attempts WHERE trial_id = ${id} AND worker = ${worker} AND ended_at IS NULL
                   ORDER BY n DESC LIMIT 1`
        : [];
      if (!open) {
        // Not this worker's any more: keep the result on its last attempt (a duplicate), apply nothing.
        await tx`
          UPDATE attempts SET late_result = ${JSON.stringify(result)}::json,
            ended_at = COALESCE(ended_at, ${nowMs(tx)})
          WHERE trial_id = ${id} AND n = (SELECT MAX(n) FROM attempts WHERE trial_id = ${id} AND worker = ${worker})`;
        return false;
      }
      const cur = (await trialWhere(tx, "id", id))!;
      await tx`
        UPDATE trials SET status = ${result.status}, scores = ${
        JSON.stringify({ ...cur.scores, ...result.scores })
      }::json,
          costs = ${JSON.stringify({ ...cur.costs, ...result.costs })}::json,
          loss_history = ${JSON.stringify(result.lossHistory ?? [])}::json, error = ${result.error ?? null},
          heartbeat_at = NULL
        WHERE id = ${id}`;
      await tx`
        UPDATE attempts SET ended_at = ${nowMs(tx)},
          error = ${result.status === "failed" ? result.error ?? "failed" : null}
        WHERE trial_id = ${id} AND n = ${open.n}`;
      return true;
    });
  }

  async requeueStale(graceMs: number, now?: number, maxAttempts = Infinity): Promise<number[]> {
    return await this.#tx(async (tx) => {
      const clock = now ?? Number((await tx`SELECT ${nowMs(tx)} AS now`)[0].now);
      // Rows a worker is finishing right now are locked: skipped, not waited for (they are not stale).
      const stale = await tx`
        SELECT t.id, t.heartbeat_at, (SELECT COUNT(*) FROM attempts a WHERE a.trial_id = t.id) AS tries
        FROM trials t WHERE t.status = 'running' AND t.heartbeat_at < ${clock - graceMs}
        ORDER BY t.id FOR UPDATE SKIP LOCKED`;
      for (const r of stale) {
        const id = Number(r.id), silent = (clock - Number(r.heartbeat_at)) / 1000;
        const why = `heartbeat lost: none for ${silent.toFixed(1)} s (grace ${graceMs / 1000} s)`;
        const giveUp = Number(r.tries) >= maxAttempts;
        await tx`
          UPDATE trials SET status = ${giveUp ? "failed" : "queued"}, heartbeat_at = NULL,
            error = ${giveUp ? `${why}; gave up after ${r.tries} attempts` : null}
          WHERE id = ${id}`;
        await tx`UPDATE attempts SET ended_at = ${clock}, error = ${why} WHERE trial_id = ${id} AND ended_at IS NULL`;
      }
      return stale.map((r) => Number(r.id));
    });
  }

  async getTrial(id: number): Promise<Trial | null> {
    return await this.#read((tx) => trialWhere(tx, "id", id));
  }

  async getTrialByKey(key: string): Promise<Trial | null> {
    return await this.#read((tx) => trialWhere(tx, "key", key));
  }

  async listTrials(filter: { status?: TrialStatus[] } = {}): Promise<Trial[]> {
    const st = filter.status;
    if (!this.#open) throw new Error(`search memory ${this.label} (${this.search}) is closed`);
    if (st && !st.length) return [];
    return await this.#read(async (tx) => {
      const rows = st
        ? await tx`SELECT * FROM trials WHERE status IN ${tx(st)} ORDER BY id`
        : await tx`SELECT * FROM trials ORDER BY id`;
      const attempts = new Map<number, TrialAttempt[]>();
      for (const a of await tx`SELECT * FROM attempts ORDER BY trial_id, n`) {
        const id = Number(a.trial_id);
        if (!attempts.has(id)) attempts.set(id, []);
        attempts.get(id)!.push(toAttempt(a));
      }
      return rows.map((r) => toTrial(r, attempts.get(Number(r.id)) ?? []));
    });
  }

  /**
   * Stores a trial's weights (safetensors bytes), replacing earlier ones, while the trial runs under `worker`
   * (a worker presumed dead must not overwrite the weights of the attempt that replaced it).
   */
  async saveWeights(id: number, worker: string, bytes: Uint8Array): Promise<boolean> {
    const data = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    return await this.#tx(async (tx) => {
      const r = await tx`
        INSERT INTO weights(trial_id, data)
        SELECT ${id}, ${data} FROM trials t WHERE t.id = ${id} AND t.status = 'running' AND EXISTS (
          SELECT 1 FROM attempts a WHERE a.trial_id = t.id AND a.worker = ${worker} AND a.ended_at IS NULL)
        ON CONFLICT (trial_id) DO UPDATE SET data = excluded.data`;
      return r.count === 1;
    });
  }

  /** A trial's stored weights, or null. */
  async loadWeights(id: number): Promise<Uint8Array | null> {
    return await this.#read(async (tx) => {
      const r = (await tx`SELECT data FROM weights WHERE trial_id = ${id}`)[0];
      return r ? new Uint8Array(r.data as Uint8Array) : null;
    });
  }

  /** Heartbeats from the heartbeat thread (search/heartbeat_thread.ts), started on first use. */
  async startHeartbeats(
    id: number,
    worker: string,
    intervalMs: number,
  ): Promise<{ stop(): Promise<HeartbeatStats> }> {
    if (!this.#open) throw new Error(`search memory ${this.label} (${this.search}) is closed`);
    if (!this.#thread) {
      const thread = new Worker(new URL("./heartbeat_thread.ts", import.meta.url).href, { type: "module" });
      this.#thread = thread;
      this.#threadReady = new Promise<void>((ready) => {
        thread.onmessage = (e: MessageEvent) => {
          if (e.data.type === "ready") ready();
          if (e.data.type !== "stopped") return;
          this.#stopped.get(e.data.id)?.({ calls: e.data.calls, ms: e.data.ms, lost: e.data.lost });
          this.#stopped.delete(e.data.id);
        };
      });
      thread.postMessage({ type: "open", url: this.#url, search: this.search });
    }
    const thread = this.#thread;
    // The trial starts once the thread can beat (its start-up is no time to be silent), and with a beat.
    await this.#threadReady;
    await this.heartbeat(id, worker);
    thread.postMessage({ type: "start", id, worker, intervalMs });
    return {
      stop: () =>
        new Promise<HeartbeatStats>((resolve) => {
          this.#stopped.set(id, resolve);
          thread.postMessage({ type: "stop", id });
        }),
    };
  }

  async close(): Promise<void> {
    if (!this.#open) return;
    this.#open = false;
    const thread = this.#thread;
    if (thread) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 5000);
        thread.onmessage = (e: MessageEvent) => {
          if (e.data.type === "closed") {
            clearTimeout(t);
            resolve();
          }
        };
        thread.postMessage({ type: "close" });
      });
      thread.terminate();
    }
    await this.#sql.end({ timeout: 5 });
  }
}

/** `e` as an Error whose message has no trace of `password` (and a prefix, if given). */
function scrubbed(e: unknown, password: string, prefix?: string): Error {
  let msg = e instanceof Error ? e.message : String(e);
  if (password) msg = msg.split(password).join("***");
  if (password && encodeURIComponent(password) !== password) {
    msg = msg.split(encodeURIComponent(password)).join("***");
  }
  return new Error(prefix ? `${prefix}: ${msg}` : msg);
}

/** The one trial whose `column` is `value` (with its attempts), or null. */
async function trialWhere(tx: Tx, column: "id" | "key", value: number | string): Promise<Trial | null> {
  const [r] = column === "id"
    ? await tx`SELECT * FROM trials WHERE id = ${value}`
    : await tx`SELECT * FROM trials WHERE key = ${value}`;
  if (!r) return null;
  const attempts = (await tx`SELECT * FROM attempts WHERE trial_id = ${r.id} ORDER BY n`).map(toAttempt);
  return toTrial(r, attempts);
}

const num = (v: unknown): number | null => (v === null || v === undefined ? null : Number(v));
const str = (v: unknown): string | null => (v === null || v === undefined ? null : String(v));
/** postgres.js parses json columns; a text value (never expected) is parsed here. */
const json = <T>(v: unknown): T => (typeof v === "string" ? JSON.parse(v) : v) as T;

function toAttempt(a: Row): TrialAttempt {
  const out: TrialAttempt = {
    worker: String(a.worker),
    start: Number(a.started_at),
    end: num(a.ended_at),
    error: str(a.error),
  };
  if (a.late_result !== null && a.late_result !== undefined) {
    out.lateResult = json<TrialResult>(a.late_result);
  }
  return out;
}

function toTrial(r: Row, attempts: TrialAttempt[]): Trial {
  return {
    id: Number(r.id),
    key: String(r.key),
    spec: json(r.spec),
    proposer: String(r.proposer),
    prompt: str(r.prompt),
    rawReply: str(r.raw_reply),
    seed: Number(r.seed),
    status: String(r.status) as TrialStatus,
    scores: json(r.scores),
    costs: json(r.costs),
    lossHistory: json(r.loss_history),
    error: str(r.error),
    attempts,
    createdAt: Number(r.created_at),
    heartbeatAt: num(r.heartbeat_at),
    parentId: num(r.parent_id),
  };
}
