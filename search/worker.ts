/**
 * @file A worker (`deno task worker --storage postgres://… [--search NAME]`): a process on any machine that
 * trains the trials of a search whose memory is in PostgreSQL.
 *
 *     settings ← the search's settings in the memory (what to train, how, the queue's timings)
 *     open the data, the feature network and the reference statistics (cached in cacheDir like the search's)
 *     until the search says it ended, or nothing was queued for `idleMinutes`:
 *         re-queue trials whose worker went silent past the grace period (any process may: the row locks
 *         make it safe), then claim the oldest queued trial (SELECT … FOR UPDATE SKIP LOCKED)
 *         none: sleep queue.pollSeconds and ask again
 *         train and score it while a timer heartbeats; store its weights and commit its result
 *
 * A worker killed at any moment loses nothing: its trial keeps `running` until the grace period passes, then
 * goes back to the queue with its spec and seed (the lost attempt recorded) and another worker runs it; after
 * `queue.maxAttempts` lost attempts it fails instead. A worker that was only slow and commits after its trial
 * was re-queued has its result recorded on its attempt as a late duplicate, not applied.
 *
 * Every call to the memory is timed: the time a trial waits for them (re-queue check, claim, memory read for
 * the pruning rule, starting its heartbeats, weights, commit) is the coordination cost per trial, reported at
 * the end next to the time the trials took; the heartbeat thread's calls, which run beside the trial, are
 * counted apart.
 */

import { Device } from "../engine/mod.ts";
import { parseUsage } from "../util/config.ts";
import { UsageError } from "../util/errors.ts";
import { SearchConfigSchema } from "./config.ts";
import { defaultWorkerName, openStorage, openTrialSetup } from "./diffnas.ts";
import { PostgresStorage } from "./postgres_storage.ts";
import { type TrialEvent, workOnTrial } from "./runner.ts";
import { type Architecture, toUNetSpec } from "./space.ts";
import type { SearchStorage, Trial } from "./types.ts";

/** What a worker reports as it goes. */
export type WorkerEvent =
  | { type: "start"; worker: string; search: string; memory: string; device: string }
  | { type: "reference"; cached: boolean; seconds: number }
  | { type: "claim"; trial: Trial; waitedSeconds: number }
  | { type: "progress"; trial: Trial; event: TrialEvent }
  | {
    type: "end";
    trial: Trial;
    /** False: the trial had been re-queued (heartbeat lost); the result was recorded as late, not applied. */
    applied: boolean;
    lostHeartbeats: number;
    seconds: number;
    /** Milliseconds this trial spent in calls to the memory. */
    coordinationMs: number;
  }
  | { type: "stop"; reason: string };

/** Options of `runWorker`. */
export interface WorkerOptions {
  /** The PostgreSQL connection string of the memory. */
  storage: string;
  /** The search to work for; absent: the only search in the database. */
  searchName?: string;
  /** This worker's name in the attempts (default host:pid). */
  name?: string;
  /** Local folder for trial weights (a cache of the database's); default a temporary folder, removed after. */
  out?: string;
  /** Minutes with nothing to claim after which the worker stops (default 30). */
  idleMinutes?: number;
  /** Stop after this many trials. */
  maxTrials?: number;
  /** The device backend, instead of the search's setting. */
  backend?: "webgpu" | "cpu";
  device?: Device;
  signal?: AbortSignal;
  onEvent?: (e: WorkerEvent) => void;
}

/** Time spent in calls to the memory, by method. */
export type CoordinationStats = Record<string, { calls: number; ms: number }>;

/** What a worker did. */
export interface WorkerOutcome {
  worker: string;
  search: string;
  /** The trials it committed, in order (late ones included). */
  trials: number[];
  stoppedBy: "ended" | "idle" | "interrupted" | "max-trials";
  /**
   * Milliseconds each trial waited for calls to the memory, milliseconds of calls while idle (asking for
   * work), and every call by method (the heartbeat thread's as "heartbeat (thread)").
   */
  coordination: { perTrialMs: number[]; idleMs: number; byMethod: CoordinationStats };
  /** Seconds each trial took from claim to commit. */
  trialSeconds: number[];
}

/** `storage` with every method call timed into `stats`. */
export function timedStorage(storage: SearchStorage, stats: CoordinationStats): SearchStorage {
  return new Proxy(storage, {
    get(target, prop, receiver) {
      const v = Reflect.get(target, prop, receiver);
      if (typeof v !== "function" || prop === "close") return v;
      return async (...args: unknown[]) => {
        const t0 = performance.now();
        try {
          return await v.apply(target, args);
        } finally {
          const s = (stats[String(prop)] ??= { calls: 0, ms: 0 });
          s.calls++;
          s.ms += performance.now() - t0;
        }
      };
    },
  });
}

const totalMs = (stats: CoordinationStats) => Object.values(stats).reduce((a, s) => a + s.ms, 0);

/** The search a worker serves: the one named, or the database's only one. */
async function chooseSearch(url: string, name: string | undefined): Promise<string> {
  let names: string[];
  try {
    names = await PostgresStorage.listSearches(url);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  // (Opening a search that does not exist would create it: a misspelt --search must not.)
  if (name !== undefined && names.includes(name)) return name;
  if (name !== undefined) {
    throw new UsageError(`the database holds no search ${name} (searches: ${names.join(", ") || "none"})`);
  }
  if (names.length === 1) return names[0];
  throw new UsageError(
    names.length
      ? `the database holds ${names.length} searches (${names.join(", ")}): choose one with --search`
      : "the database holds no search: start one with deno task search --storage postgres://…",
  );
}

/** Runs a worker until the search ends, it idles out, or it is interrupted; see the file comment. */
export async function runWorker(opts: WorkerOptions): Promise<WorkerOutcome> {
  const emit = opts.onEvent ?? (() => {});
  const search = await chooseSearch(opts.storage, opts.searchName);
  const opened = await openStorage("", { storage: opts.storage, searchName: search });
  const stats: CoordinationStats = {};
  const storage = timedStorage(opened.storage, stats);
  const worker = opts.name ?? defaultWorkerName();
  const ownDir = opts.out === undefined;
  const dir = opts.out ?? await Deno.makeTempDir({ prefix: "search-worker-" });
  let device: Device | undefined;
  let setup: Awaited<ReturnType<typeof openTrialSetup>> | undefined;
  try {
    const meta = await storage.getMeta();
    if (!meta) throw new UsageError(`${opened.label} has no settings yet: is its search starting?`);
    const cfg = parseUsage(SearchConfigSchema, meta.config, `${opened.label} settings`);
    if (cfg.method !== "diffnas") {
      throw new UsageError(`workers run DiffNAS searches; ${search} is ${cfg.method}`);
    }
    const q = cfg.queue;
    await Deno.mkdir(dir, { recursive: true });
    device = opts.device ?? await Device.create({ backend: opts.backend ?? cfg.backend });
    emit({
      type: "start",
      worker,
      search,
      memory: opened.label,
      device: `${device.info.adapter} (${device.kind})`,
    });
    setup = await openTrialSetup(cfg, device, storage, dir, worker);
    emit({ type: "reference", ...setup.reference });
    const { ctx, base } = setup;
    const out: WorkerOutcome = {
      worker,
      search,
      trials: [],
      stoppedBy: "ended",
      coordination: { perTrialMs: [], idleMs: 0, byMethod: stats },
      trialSeconds: [],
    };
    let idleSince = performance.now();
    const idleLimitMs = (opts.idleMinutes ?? 30) * 60_000;
    for (;;) {
      if (opts.signal?.aborted) {
        out.stoppedBy = "interrupted";
        break;
      }
      if (opts.maxTrials !== undefined && out.trials.length >= opts.maxTrials) {
        out.stoppedBy = "max-trials";
        break;
      }
      const before = totalMs(stats) - (stats["heartbeat (thread)"]?.ms ?? 0);
      await storage.requeueStale(q.graceSeconds * 1000, undefined, q.maxAttempts);
      const trial = await storage.claimNext(worker);
      if (!trial) {
        const ended = (await storage.getMeta())?.ended;
        out.coordination.idleMs += totalMs(stats) - (stats["heartbeat (thread)"]?.ms ?? 0) - before;
        if (ended) break;
        if (performance.now() - idleSince > idleLimitMs) {
          out.stoppedBy = "idle";
          break;
        }
        await new Promise((r) => setTimeout(r, q.pollSeconds * 1000));
        continue;
      }
      const started = performance.now();
      emit({ type: "claim", trial, waitedSeconds: (trial.attempts.at(-1)!.start - trial.createdAt) / 1000 });
      const memory = await storage.listTrials();
      let outcome;
      try {
        outcome = await workOnTrial(ctx, trial, toUNetSpec(trial.spec as Architecture, base), {
          signal: opts.signal,
          memory,
          onEvent: (event) => emit({ type: "progress", trial, event }),
        });
      } catch (e) {
        if ((e as Error).message === "interrupted") {
          out.stoppedBy = "interrupted";
          break;
        }
        throw e;
      }
      const seconds = (performance.now() - started) / 1000;
      // What the trial waited for: every call on its path (the heartbeat thread's run beside it, apart).
      const coordinationMs = totalMs(stats) - (stats["heartbeat (thread)"]?.ms ?? 0) - before;
      const hb = (stats["heartbeat (thread)"] ??= { calls: 0, ms: 0 });
      hb.calls += outcome.heartbeats.calls;
      hb.ms += outcome.heartbeats.ms;
      out.trials.push(trial.id);
      out.trialSeconds.push(seconds);
      out.coordination.perTrialMs.push(coordinationMs);
      emit({
        type: "end",
        trial: (await opened.storage.getTrial(trial.id))!,
        applied: outcome.applied,
        lostHeartbeats: outcome.lostHeartbeats,
        seconds,
        coordinationMs,
      });
      idleSince = performance.now();
    }
    emit({ type: "stop", reason: out.stoppedBy });
    return out;
  } finally {
    setup?.dispose();
    await opened.storage.close();
    if (device && !opts.device) device.destroy();
    if (ownDir) await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}
