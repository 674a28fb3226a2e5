/**
 * @file The search layer's vocabulary, shared by the storages, the proposers, the runner and the report.
 *
 * A **trial** is one candidate evaluated once: a canonical spec (for DiffNAS a point of the search space, an
 * `Architecture`), a seed, a state and what was measured. States move one way:
 *
 *     queued → running → done | failed | pruned          (rejected: refused before any training)
 *
 * with one exception: a `running` trial whose worker stopped heart-beating goes back to `queued` (its spec and
 * seed kept, the dead attempt recorded), so no trial is lost and none is trained to completion twice. Every
 * state change is one transaction of the storage; a resumed process trusts only what was committed.
 */

/** A trial's state. */
export type TrialStatus = "queued" | "running" | "done" | "failed" | "pruned" | "rejected";

/** One try at running a trial: who, when, and how it ended. */
export interface TrialAttempt {
  /** Worker name (host:pid or a name given to `worker`). */
  worker: string;
  /** Milliseconds since the epoch. */
  start: number;
  /** Milliseconds since the epoch; null while running or when the worker died. */
  end: number | null;
  /** Why the attempt ended without a result ("heartbeat lost after 60 s", an exception's message). */
  error: string | null;
  /**
   * A result the worker committed after the attempt was closed (it was presumed dead and the trial re-queued):
   * recorded here for the record, never applied to the trial.
   */
  lateResult?: TrialResult;
}

/** What a trial's heartbeats cost: how many were sent, milliseconds spent, how many the memory refused. */
export interface HeartbeatStats {
  calls: number;
  ms: number;
  lost: number;
}

/** One logged point of a training run. */
export interface LossPoint {
  step: number;
  nimg: number;
  loss: number;
}

/** What a trial measured. */
export interface TrialScores {
  /** The proxy score, lower is better: the proxy FID (RFID-n) or the loss proxy (loss-n), as `proxyName` says. */
  proxyFid?: number;
  /** Its name with the sample count ("RFID-128", "loss-128"). */
  proxyName?: string;
  /** A full FID if one was measured ("FID-2048" in `fidName`). */
  fid?: number;
  fidName?: string;
}

/** What a trial cost. */
export interface TrialCosts {
  /** MACs per network evaluation (models/cost.ts convention, attention included). */
  macs?: number;
  /** Trainable parameters. */
  params?: number;
  /** Seconds of training. */
  trainSeconds?: number;
  /** Seconds of sampling and features for the proxy. */
  proxySeconds?: number;
}

/** A trial as stored. */
export interface Trial {
  /** Storage-assigned, increasing in creation order from 1. */
  id: number;
  /** Canonical key of the spec: the same candidate always gets the same key (no trial trained twice). */
  key: string;
  /** The canonical spec (JSON-serialisable). */
  spec: unknown;
  /** Which proposer made it ("llm", "evolutionary", "random", "baseline", ...). */
  proposer: string;
  /** The prompt sent, for an LLM proposal (never holds an API key). */
  prompt: string | null;
  /** The raw reply, bounded in size, for an LLM proposal: untrusted text, stored, never evaluated. */
  rawReply: string | null;
  seed: number;
  status: TrialStatus;
  scores: TrialScores;
  costs: TrialCosts;
  lossHistory: LossPoint[];
  /** Why it was rejected, failed or pruned. */
  error: string | null;
  attempts: TrialAttempt[];
  /** Milliseconds since the epoch. */
  createdAt: number;
  /** Last heartbeat of the running attempt (ms since the epoch), null when not running. */
  heartbeatAt: number | null;
  /** The trial it inherited weights from, if any. */
  parentId: number | null;
}

/** A new trial as a proposer hands it over (the storage assigns id, status and times). */
export interface NewTrial {
  key: string;
  spec: unknown;
  proposer: string;
  prompt?: string | null;
  rawReply?: string | null;
  seed: number;
  /** "queued" (default), or "rejected" with `error` saying why. */
  status?: "queued" | "rejected";
  error?: string | null;
  costs?: TrialCosts;
  parentId?: number | null;
}

/** The result a runner commits for a trial it ran. */
export interface TrialResult {
  status: "done" | "failed" | "pruned";
  scores?: TrialScores;
  costs?: TrialCosts;
  lossHistory?: LossPoint[];
  error?: string | null;
}

/**
 * The search memory. SQLite in the run folder by default, PostgreSQL for many machines (`postgres_storage.ts`); both
 * implement this interface and pass the same tests. Every method that changes state is one transaction.
 */
export interface SearchStorage {
  /** Settings of the search (JSON), written once when it starts; `null` for a new storage. */
  getMeta(): Promise<Record<string, unknown> | null>;
  setMeta(meta: Record<string, unknown>): Promise<void>;
  /**
   * Adds a trial. If a trial with the same key exists, nothing is added and that trial is returned with
   * `added: false` (the canonical key is what makes "never trained twice" hold).
   */
  addTrial(t: NewTrial): Promise<{ trial: Trial; added: boolean }>;
  /** Claims the oldest queued trial for `worker` (queued → running, a new attempt); null when none is queued. */
  claimNext(worker: string): Promise<Trial | null>;
  /** Marks the running attempt of `id` by `worker` alive; false if the trial is no longer that worker's. */
  heartbeat(id: number, worker: string): Promise<boolean>;
  /**
   * Commits a result of `worker`'s attempt. Returns false (and changes nothing but the attempt's record) when
   * the trial is no longer running under that worker, e.g. it was re-queued after its heartbeat was lost.
   */
  finish(id: number, worker: string, result: TrialResult): Promise<boolean>;
  /**
   * Running trials whose heartbeat is older than `graceMs` go back to queued (attempt closed with an error),
   * or to failed once they have had `maxAttempts` attempts (the retry limit; default none). Returns their ids.
   */
  requeueStale(graceMs: number, now?: number, maxAttempts?: number): Promise<number[]>;
  /**
   * Stores a trial's weights (safetensors bytes) in the memory itself, for processes on other machines (the
   * memories that are shared have it). Only while the trial runs under `worker`; false (nothing stored) else.
   */
  saveWeights?(id: number, worker: string, bytes: Uint8Array): Promise<boolean>;
  /** A trial's weights stored with `saveWeights`, or null. */
  loadWeights?(id: number): Promise<Uint8Array | null>;
  /**
   * Heartbeats for `worker`'s running trial `id` every `intervalMs` from a thread of their own (a shared
   * memory's: the main thread may be busy in synchronous kernels for seconds) until `stop` is called.
   */
  startHeartbeats?(
    id: number,
    worker: string,
    intervalMs: number,
  ): Promise<{ stop(): Promise<HeartbeatStats> }>;
  /** One trial by id, or by key. */
  getTrial(id: number): Promise<Trial | null>;
  getTrialByKey(key: string): Promise<Trial | null>;
  /** All trials in id order (optionally of some states). */
  listTrials(filter?: { status?: TrialStatus[] }): Promise<Trial[]>;
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------------------------
// Proposers.

/** What a proposer sees when asked for candidates. */
export interface ProposalContext {
  /** The search memory: every trial so far, in id order (done, pruned, failed, rejected, queued, running). */
  trials: readonly Trial[];
  /** How many candidates are wanted now (a proposer may return fewer). */
  count: number;
  /** Seed for this call's random choices (derived from the search seed and the call's index). */
  seed: number;
}

/**
 * One proposal. `spec` is unvalidated (an LLM's reply is untrusted data): the caller checks it against the
 * search space and the budget, and records it as queued or as rejected with the reason. A proposer that could
 * not produce a spec at all (malformed reply, timeout) returns `spec: null` with `error`, which is recorded as a
 * rejection too, so the memory shows the failure and the run goes on.
 */
export interface Proposal {
  spec: unknown;
  /** The trial whose weights this one should start from (weight inheritance), if the proposer has a view. */
  parentId?: number | null;
  prompt?: string | null;
  rawReply?: string | null;
  error?: string | null;
}

/** The search space as a proposer needs to know it. */
export interface SpaceDescription {
  /** A short human-readable statement of the space and its bounds, for prompts and logs. */
  text: string;
  /** The JSON Schema of one candidate spec (for `response_format` and the prompt). */
  jsonSchema: Record<string, unknown>;
}

/** Proposes candidates from the memory: LLM, evolutionary, random, and the other searches' own. */
export interface Proposer {
  /** Stored with each trial ("llm", "evolutionary", "random"). */
  readonly name: string;
  propose(ctx: ProposalContext): Promise<Proposal[]>;
}
