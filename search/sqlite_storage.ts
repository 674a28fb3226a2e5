/**
 * @file The search memory in SQLite (`node:sqlite`), one file in the run folder (`memory.sqlite`): the default
 * `SearchStorage`.
 *
 * Durability and concurrency: the database runs in WAL mode with `synchronous = FULL` (a committed transaction
 * survives a power loss), a busy timeout (a second connection waits for the write lock instead of failing), and
 * foreign keys on. Every state change is one `BEGIN IMMEDIATE … COMMIT` transaction, which takes the write lock
 * before reading, so a read-then-write (claim the oldest queued trial; finish only if still ours) cannot
 * interleave with another connection's. A process killed mid-transaction leaves the last committed state.
 *
 * Tables (the schema version is in `meta`; a file of another version or a database that is not a search memory
 * is refused):
 *
 * - `meta(name, value)`: `schema_version`, and `settings` (the search's settings, JSON);
 * - `trials`: one row per trial, `key` UNIQUE (the same candidate is never added twice), JSON columns for the
 *   spec, scores, costs and loss history, checked with `json_valid`;
 * - `attempts(trial_id, n, worker, started_at, ended_at, error, late_result)`: every try at running a trial. A
 *   trial is running under a worker when its status is `running` and that worker's attempt is open
 *   (`ended_at` null). A result from a worker whose attempt was closed (its heartbeat was lost and the trial
 *   re-queued) goes into that attempt's `late_result` and changes nothing else.
 *
 * The methods are async to fit the interface (the PostgreSQL storage's are truly asynchronous); they run the
 * synchronous API at once.
 */

import { DatabaseSync, type SQLInputValue } from "node:sqlite";
import type { NewTrial, SearchStorage, Trial, TrialAttempt, TrialResult, TrialStatus } from "./types.ts";

/** Version of the tables below; bumped with any change to them. */
export const SCHEMA_VERSION = 1;
/** Name of the memory file in a run folder. */
export const MEMORY_FILE = "memory.sqlite";

const STATUSES: readonly TrialStatus[] = ["queued", "running", "done", "failed", "pruned", "rejected"];

const SCHEMA = `
CREATE TABLE meta (
  name TEXT PRIMARY KEY,
  value TEXT NOT NULL
) STRICT;
CREATE TABLE trials (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  key TEXT NOT NULL UNIQUE,
  spec TEXT NOT NULL CHECK (json_valid(spec)),
  proposer TEXT NOT NULL,
  prompt TEXT,
  raw_reply TEXT,
  seed INTEGER NOT NULL,
  status TEXT NOT NULL CHECK (status IN (${STATUSES.map((s) => `'${s}'`).join(", ")})),
  scores TEXT NOT NULL CHECK (json_valid(scores)),
  costs TEXT NOT NULL CHECK (json_valid(costs)),
  loss_history TEXT NOT NULL CHECK (json_valid(loss_history)),
  error TEXT,
  created_at INTEGER NOT NULL,
  heartbeat_at INTEGER,
  parent_id INTEGER REFERENCES trials(id)
) STRICT;
CREATE INDEX trials_by_status ON trials(status, id);
CREATE TABLE attempts (
  trial_id INTEGER NOT NULL REFERENCES trials(id),
  n INTEGER NOT NULL,
  worker TEXT NOT NULL,
  started_at INTEGER NOT NULL,
  ended_at INTEGER,
  error TEXT,
  late_result TEXT CHECK (late_result IS NULL OR json_valid(late_result)),
  PRIMARY KEY (trial_id, n)
) STRICT;
`;

/** Options of `SqliteStorage.open`. */
export interface SqliteStorageOptions {
  /** Milliseconds a connection waits for another's write lock before failing (SQLite busy_timeout). */
  busyTimeoutMs?: number;
  /** The clock of created, heartbeat and attempt times (ms since the epoch); tests pass their own. */
  now?: () => number;
}

type Row = Record<string, SQLInputValue>;

/** The value of `f` as a promise; an exception becomes a rejection (the interface's methods are async). */
function settle<T>(f: () => T): Promise<T> {
  try {
    return Promise.resolve(f());
  } catch (e) {
    return Promise.reject(e);
  }
}

/** The search memory in one SQLite file (see the file comment). */
export class SqliteStorage implements SearchStorage {
  readonly #db: DatabaseSync;
  readonly #now: () => number;
  #open = true;

  private constructor(readonly path: string, db: DatabaseSync, now: () => number) {
    this.#db = db;
    this.#now = now;
  }

  /** Opens (creating if needed) the memory at `path`; refuses a file that is not a memory of this version. */
  static open(path: string, opts: SqliteStorageOptions = {}): SqliteStorage {
    let db: DatabaseSync;
    try {
      db = new DatabaseSync(path);
    } catch (e) {
      throw new Error(`cannot open search memory ${path}: ${(e as Error).message}`);
    }
    const store = new SqliteStorage(path, db, opts.now ?? Date.now);
    try {
      db.exec(`PRAGMA busy_timeout = ${Math.max(0, Math.round(opts.busyTimeoutMs ?? 10_000))}`);
      db.exec("PRAGMA journal_mode = WAL");
      db.exec("PRAGMA synchronous = FULL");
      db.exec("PRAGMA foreign_keys = ON");
      store.#tx(() => store.#initSchema());
    } catch (e) {
      db.close();
      throw new Error(`cannot open search memory ${path}: ${(e as Error).message}`);
    }
    return store;
  }

  /** Opens `MEMORY_FILE` in the run folder `dir`. */
  static inRunFolder(dir: string, opts: SqliteStorageOptions = {}): SqliteStorage {
    return SqliteStorage.open(`${dir.replace(/\/+$/, "") || "/"}/${MEMORY_FILE}`, opts);
  }

  /** Creates the tables in a new database; checks the version of an existing one. */
  #initSchema(): void {
    const tables = this.#db.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").all()
      .map((r) => String(r.name));
    if (!tables.includes("meta")) {
      const foreign = tables.filter((t) => !t.startsWith("sqlite_"));
      if (foreign.length) {
        throw new Error(`it is a database but not a search memory (tables ${foreign.join(", ")})`);
      }
      this.#db.exec(SCHEMA);
      this.#db.prepare("INSERT INTO meta(name, value) VALUES ('schema_version', ?)").run(
        String(SCHEMA_VERSION),
      );
      return;
    }
    const v = this.#db.prepare("SELECT value FROM meta WHERE name = 'schema_version'").get()?.value;
    if (v !== String(SCHEMA_VERSION)) {
      throw new Error(
        `its schema version is ${v ?? "missing"}; this program reads version ${SCHEMA_VERSION}`,
      );
    }
  }

  /** Runs `f` as one write transaction (taking the write lock first); rolls back if it throws. */
  #tx<T>(f: () => T): T {
    if (!this.#open) throw new Error(`search memory ${this.path} is closed`);
    this.#db.exec("BEGIN IMMEDIATE");
    try {
      const r = f();
      this.#db.exec("COMMIT");
      return r;
    } catch (e) {
      this.#db.exec("ROLLBACK");
      throw e;
    }
  }

  /** Runs a read (a single statement is its own transaction). */
  #read<T>(f: () => T): T {
    if (!this.#open) throw new Error(`search memory ${this.path} is closed`);
    return f();
  }

  getMeta(): Promise<Record<string, unknown> | null> {
    return settle(() =>
      this.#read(() => {
        const v = this.#db.prepare("SELECT value FROM meta WHERE name = 'settings'").get()?.value;
        return v === undefined ? null : JSON.parse(String(v));
      })
    );
  }

  setMeta(meta: Record<string, unknown>): Promise<void> {
    return settle(() => {
      const json = JSON.stringify(meta);
      this.#tx(() =>
        this.#db.prepare(
          `INSERT INTO meta(name, value) VALUES ('settings', ?)
           ON CONFLICT(name) DO UPDATE SET value = excluded.value`,
        ).run(json)
      );
    });
  }

  addTrial(t: NewTrial): Promise<{ trial: Trial; added: boolean }> {
    return settle(() => this.#addTrial(t));
  }

  #addTrial(t: NewTrial): { trial: Trial; added: boolean } {
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
    return this.#tx(() => {
      const existing = this.#trialWhere("key = ?", t.key);
      if (existing) return { trial: existing, added: false };
      const parent = t.parentId ?? null;
      if (parent !== null && !this.#db.prepare("SELECT 1 FROM trials WHERE id = ?").get(parent)) {
        throw new Error(`addTrial: parentId ${parent} is not a trial of this memory`);
      }
      const row = this.#db.prepare(
        `INSERT INTO trials(key, spec, proposer, prompt, raw_reply, seed, status, scores, costs, loss_history,
           error, created_at, heartbeat_at, parent_id)
         VALUES (?, ?, ?, ?, ?, ?, ?, '{}', ?, '[]', ?, ?, NULL, ?) RETURNING id`,
      ).get(
        t.key,
        spec,
        t.proposer,
        t.prompt ?? null,
        t.rawReply ?? null,
        t.seed,
        status,
        JSON.stringify(t.costs ?? {}),
        t.error ?? null,
        this.#now(),
        parent,
      )!;
      return { trial: this.#trialWhere("id = ?", Number(row.id))!, added: true };
    });
  }

  claimNext(worker: string): Promise<Trial | null> {
    return settle(() =>
      this.#tx(() => {
        const row = this.#db.prepare("SELECT id FROM trials WHERE status = 'queued' ORDER BY id LIMIT 1")
          .get();
        if (!row) return null;
        const id = Number(row.id), now = this.#now();
        this.#db.prepare("UPDATE trials SET status = 'running', heartbeat_at = ? WHERE id = ?").run(now, id);
        this.#db.prepare(
          `INSERT INTO attempts(trial_id, n, worker, started_at)
         VALUES (?, (SELECT COALESCE(MAX(n), 0) + 1 FROM attempts WHERE trial_id = ?), ?, ?)`,
        ).run(id, id, worker, now);
        return this.#trialWhere("id = ?", id);
      })
    );
  }

  heartbeat(id: number, worker: string): Promise<boolean> {
    return settle(() =>
      Number(this.#tx(() =>
        this.#db.prepare(
          `UPDATE trials SET heartbeat_at = ? WHERE id = ? AND status = 'running' AND EXISTS (
             SELECT 1 FROM attempts WHERE trial_id = trials.id AND worker = ? AND ended_at IS NULL)`,
        ).run(this.#now(), id, worker).changes
      )) === 1
    );
  }

  finish(id: number, worker: string, result: TrialResult): Promise<boolean> {
    return settle(() => this.#finish(id, worker, result));
  }

  #finish(id: number, worker: string, result: TrialResult): boolean {
    if (!["done", "failed", "pruned"].includes(result.status)) {
      throw new Error(`finish: status must be done, failed or pruned, got ${JSON.stringify(result.status)}`);
    }
    return this.#tx(() => {
      const now = this.#now();
      const open = this.#db.prepare(
        `SELECT a.n FROM attempts a JOIN trials t ON t.id = a.trial_id
         WHERE a.trial_id = ? AND a.worker = ? AND a.ended_at IS NULL AND t.status = 'running'
         ORDER BY a.n DESC LIMIT 1`,
      ).get(id, worker);
      if (!open) {
        // Not this worker's any more: keep the result on the worker's last attempt, apply nothing.
        const last = this.#db.prepare(
          "SELECT n FROM attempts WHERE trial_id = ? AND worker = ? ORDER BY n DESC LIMIT 1",
        ).get(id, worker);
        if (last) {
          this.#db.prepare(
            `UPDATE attempts SET late_result = ?, ended_at = COALESCE(ended_at, ?)
             WHERE trial_id = ? AND n = ?`,
          ).run(JSON.stringify(result), now, id, Number(last.n));
        }
        return false;
      }
      const t = this.#trialWhere("id = ?", id)!;
      this.#db.prepare(
        `UPDATE trials SET status = ?, scores = ?, costs = ?, loss_history = ?, error = ?, heartbeat_at = NULL
         WHERE id = ?`,
      ).run(
        result.status,
        JSON.stringify({ ...t.scores, ...result.scores }),
        JSON.stringify({ ...t.costs, ...result.costs }),
        JSON.stringify(result.lossHistory ?? []),
        result.error ?? null,
        id,
      );
      this.#db.prepare("UPDATE attempts SET ended_at = ?, error = ? WHERE trial_id = ? AND n = ?").run(
        now,
        result.status === "failed" ? result.error ?? "failed" : null,
        id,
        Number(open.n),
      );
      return true;
    });
  }

  requeueStale(graceMs: number, now?: number, maxAttempts = Infinity): Promise<number[]> {
    return settle(() =>
      this.#tx(() => {
        now ??= this.#now();
        const stale = this.#db.prepare(
          `SELECT id, heartbeat_at, (SELECT COUNT(*) FROM attempts WHERE trial_id = trials.id) AS tries
           FROM trials WHERE status = 'running' AND heartbeat_at < ? ORDER BY id`,
        ).all(now - graceMs);
        for (const r of stale) {
          const id = Number(r.id), silent = (now! - Number(r.heartbeat_at)) / 1000;
          const why = `heartbeat lost: none for ${silent.toFixed(1)} s (grace ${graceMs / 1000} s)`;
          const giveUp = Number(r.tries) >= maxAttempts;
          this.#db.prepare("UPDATE trials SET status = ?, heartbeat_at = NULL, error = ? WHERE id = ?").run(
            giveUp ? "failed" : "queued",
            giveUp ? `${why}; gave up after ${r.tries} attempts` : null,
            id,
          );
          this.#db.prepare(
            "UPDATE attempts SET ended_at = ?, error = ? WHERE trial_id = ? AND ended_at IS NULL",
          ).run(now, why, id);
        }
        return stale.map((r) => Number(r.id));
      })
    );
  }

  getTrial(id: number): Promise<Trial | null> {
    return settle(() => this.#read(() => this.#trialWhere("id = ?", id)));
  }

  getTrialByKey(key: string): Promise<Trial | null> {
    return settle(() => this.#read(() => this.#trialWhere("key = ?", key)));
  }

  listTrials(filter: { status?: TrialStatus[] } = {}): Promise<Trial[]> {
    return settle(() =>
      this.#read(() => {
        const st = filter.status;
        if (st && !st.length) return [];
        const where = st ? `WHERE status IN (${st.map(() => "?").join(", ")})` : "";
        // One read transaction, so the trials and their attempts are one consistent snapshot.
        this.#db.exec("BEGIN");
        try {
          const rows = this.#db.prepare(`SELECT * FROM trials ${where} ORDER BY id`).all(...(st ?? []));
          const attempts = new Map<number, TrialAttempt[]>();
          for (const a of this.#db.prepare("SELECT * FROM attempts ORDER BY trial_id, n").all()) {
            const id = Number(a.trial_id);
            if (!attempts.has(id)) attempts.set(id, []);
            attempts.get(id)!.push(toAttempt(a));
          }
          return rows.map((r) => toTrial(r, attempts.get(Number(r.id)) ?? []));
        } finally {
          this.#db.exec("COMMIT");
        }
      })
    );
  }

  close(): Promise<void> {
    return settle(() => {
      if (this.#open) {
        this.#open = false;
        this.#db.close();
      }
    });
  }

  /** The one trial matching `where` (with its attempts), or null. */
  #trialWhere(where: string, value: SQLInputValue): Trial | null {
    const r = this.#db.prepare(`SELECT * FROM trials WHERE ${where}`).get(value);
    if (!r) return null;
    const attempts = this.#db.prepare("SELECT * FROM attempts WHERE trial_id = ? ORDER BY n").all(r.id)
      .map(toAttempt);
    return toTrial(r, attempts);
  }
}

const json = <T>(v: SQLInputValue): T => JSON.parse(String(v));
const orNull = <T>(v: SQLInputValue, f: (v: SQLInputValue) => T): T | null => (v === null ? null : f(v));

function toAttempt(a: Row): TrialAttempt {
  const out: TrialAttempt = {
    worker: String(a.worker),
    start: Number(a.started_at),
    end: orNull(a.ended_at, Number),
    error: orNull(a.error, String),
  };
  if (a.late_result !== null) out.lateResult = json<TrialResult>(a.late_result);
  return out;
}

function toTrial(r: Row, attempts: TrialAttempt[]): Trial {
  return {
    id: Number(r.id),
    key: String(r.key),
    spec: json(r.spec),
    proposer: String(r.proposer),
    prompt: orNull(r.prompt, String),
    rawReply: orNull(r.raw_reply, String),
    seed: Number(r.seed),
    status: String(r.status) as TrialStatus,
    scores: json(r.scores),
    costs: json(r.costs),
    lossHistory: json(r.loss_history),
    error: orNull(r.error, String),
    attempts,
    createdAt: Number(r.created_at),
    heartbeatAt: orNull(r.heartbeat_at, Number),
    parentId: orNull(r.parent_id, Number),
  };
}
