/**
 * @file DiffNAS (Li et al., ICDM 2023): architecture search by prompting, with a search memory and a proxy FID.
 *
 * The loop, as the paper describes it and as Optuna-style tools run it:
 *
 *     memory ← the trials in the run folder's SQLite file, or in PostgreSQL (empty for a new search)
 *     trial 1 is the default network (the baseline every candidate is compared with)
 *     until the trial or time budget is spent:
 *         if fewer than queue.depth trials are queued: ask the proposer for candidates, reading the memory
 *             each candidate is checked against the space and the cost ceilings before any training:
 *             a bad or over-budget one is recorded as rejected with its reason (the proposer sees it next time)
 *         claim the oldest queued trial; train it briefly in memory (rapid convergence), pruned early by the
 *         median rule; score it with the proxy FID (RFID-n); commit
 *     write report.json and report.html
 *
 * Everything a resumed search needs is in the memory: a search killed at any moment and started again with
 * `--resume` keeps every finished trial, reruns the one that was running from its start, and proposes from the
 * same memory. A lock keeps a second process off the folder while the first lives.
 *
 * With the memory in PostgreSQL (`storage`), workers on other machines (`search/worker.ts`) claim queued
 * trials too: this process proposes (the LLM key stays here), keeps `queue.depth` trials waiting, trains like
 * any worker unless `proposeOnly`, re-queues trials whose worker stopped heart-beating, and waits for the
 * workers' trials before writing the report (whose grids come from the weights stored in the database).
 */

import { Device } from "../engine/mod.ts";
import { type Dataset, openDataset } from "../models/data.ts";
import { DEFAULT_NETWORK } from "../models/train.ts";
import { parseUNetSpec, type UNetSpec } from "../models/unet.ts";
import { checkMemory, defaultMemoryLimitMiB } from "../models/cost.ts";
import { openFeatureExtractor } from "../eval/features.ts";
import { referenceStatistics } from "../eval/proxy.ts";
import { parseUsage } from "../util/config.ts";
import { UsageError } from "../util/errors.ts";
import { hash2 } from "../util/random.ts";
import {
  RESUMABLE_SEARCH_FIELDS,
  type SearchConfig,
  type SearchConfigInput,
  SearchConfigSchema,
} from "./config.ts";
import {
  type Architecture,
  architectureKey,
  canonicalArchitecture,
  checkBudget,
  createSearchSpace,
  describeSpace,
  distance,
  parseArchitecture,
  type SearchSpace,
  toUNetSpec,
} from "./space.ts";
import { LOCK_FILE, lockRunFolder, type RunLock } from "../util/lock.ts";
import { MEMORY_FILE, SqliteStorage } from "./sqlite_storage.ts";
import { isPostgresUrl, PostgresStorage, redactUrl } from "./postgres_storage.ts";
import { EvolutionaryProposer } from "./proposers/evolutionary.ts";
import { RandomProposer } from "./proposers/random.ts";
import { LlmProposer } from "./proposers/llm.ts";
import { type RunnerContext, type TrialEvent, workOnTrial } from "./runner.ts";
import { writeSearchReport } from "./search_report.ts";
import type { NewTrial, Proposal, Proposer, SearchStorage, Trial } from "./types.ts";

/** What a search reports as it goes (the command line draws progress bars from these). */
export type SearchEvent =
  | {
    type: "start";
    dir: string;
    resumed: boolean;
    proposer: string;
    device: string;
    trials: number;
    /** Where the memory is (a connection string without its password). */
    memory: string;
  }
  | { type: "reference"; cached: boolean; seconds: number }
  | { type: "propose"; proposer: string; count: number }
  | { type: "rejected"; trial: Trial }
  | { type: "trial-start"; trial: Trial; index: number; total: number }
  | { type: "trial-progress"; trial: Trial; event: TrialEvent }
  | { type: "trial-end"; trial: Trial; index: number; total: number }
  | { type: "stop"; reason: string }
  | { type: "report"; html: string; json: string };

/** The outcome of a search. */
export interface SearchOutcome {
  dir: string;
  trials: Trial[];
  /** Why the loop ended: "trials", "minutes", "interrupted", "exhausted". */
  stoppedBy: "trials" | "minutes" | "interrupted" | "exhausted";
  reportHtml: string;
  reportJson: string;
  /** The terminal table of the top trials. */
  summary: string;
  seconds: number;
}

/** Options besides the configuration. */
export interface SearchOptions {
  /** Continue the search in `out` (its stored settings win, except those a resume may change). */
  resume?: boolean;
  signal?: AbortSignal;
  onEvent?: (e: SearchEvent) => void;
  /** Use this device instead of creating one. */
  device?: Device;
  /** Use this proposer instead of the configured one (tests). */
  proposer?: Proposer;
  /**
   * The memory: a PostgreSQL connection string (shared with workers on other machines), or absent for
   * memory.sqlite in the run folder. Never stored; printed only without its password.
   */
  storage?: string;
  /** The search's name in a PostgreSQL memory (default "default"). */
  searchName?: string;
  /** Only propose and keep the queue filled: workers train (a shared memory only). */
  proposeOnly?: boolean;
}

/**
 * The base network of a search: the default network at the data's resolution and channels, conditioned on the
 * data's classes (none for unlabelled data), as `deno task train` conditions the default network.
 */
export function baseNetwork(dataset: Dataset): UNetSpec {
  const levels = DEFAULT_NETWORK.channelMult!.length;
  return parseUNetSpec({
    ...DEFAULT_NETWORK,
    imgResolution: dataset.height,
    inChannels: dataset.channels,
    outChannels: dataset.channels,
    labelDim: dataset.numClasses,
    // Attention at the lowest level, whatever the side (8 at 16×16, 14 at Fashion-MNIST's 28×28).
    attnResolutions: [dataset.height >> (levels - 1)],
  });
}

/**
 * The search space of a search on `dataset`: the configured one around the base network. Attention at the
 * full image resolution is left out unless asked for: on lavapipe a 16×16 candidate with attention at 16×16
 * trained ~10× slower than the default network (7 min against 34 s for 1 kimg, measured in a default search),
 * far more than its MACs say, and one such trial would eat the budget.
 */
export function searchSpaceFor(cfg: SearchConfig, dataset: Dataset): SearchSpace {
  return searchSpaceOf(cfg, baseNetwork(dataset));
}

/** `searchSpaceFor` around a given base network. */
function searchSpaceOf(cfg: SearchConfig, base: UNetSpec): SearchSpace {
  return createSearchSpace({ maxAttnResolution: base.imgResolution >> 1, ...(cfg.space ?? {}) }, base);
}

/** The default network as a point of the space (the baseline trial). */
export function baselineArchitecture(base: UNetSpec): Architecture {
  return canonicalArchitecture({
    modelChannels: base.modelChannels,
    channelMult: [...base.channelMult],
    numBlocks: base.numBlocks,
    attnResolutions: [...base.attnResolutions],
    numHeads: base.numHeads ?? 1,
    dropout: base.dropout,
    embedding: base.embedding,
    resampleProj: base.resampleProj,
    adaptiveScale: base.adaptiveScale,
  });
}

/**
 * The default network as a trial. It is trained whatever the space's bounds and the ceilings say (it is the
 * yardstick, not a candidate), with its costs recorded like any other trial's.
 */
export function baselineTrial(base: UNetSpec, cfg: SearchConfig): NewTrial {
  const arch = baselineArchitecture(base);
  const cost = checkBudget(base, {});
  return {
    key: architectureKey(arch),
    spec: arch,
    proposer: "baseline",
    seed: cfg.seed,
    costs: { macs: cost.macs, params: cost.params },
    parentId: null,
  };
}

/** Opens the configured proposer. */
function makeProposer(cfg: SearchConfig, space: SearchSpace): Proposer {
  const kind = cfg.proposer === "auto" ? (cfg.llm ? "llm" : "evolutionary") : cfg.proposer;
  if (kind === "llm") {
    if (!cfg.llm) {
      throw new UsageError(
        "proposer llm needs an endpoint: llm.baseUrl and llm.model (--llm-url, --llm-model)",
      );
    }
    const ceilings = { maxMacs: cfg.maxMacs, maxParams: cfg.maxParams };
    return new LlmProposer(cfg.llm, describeSpace(space, ceilings), space.schema, {
      budget: { ...ceilings, trials: cfg.trials },
    });
  }
  if (kind === "random") return new RandomProposer(space);
  return new EvolutionaryProposer(space);
}

/**
 * Checks one proposal against the space and the cost ceilings and turns it into a new trial: queued, or
 * rejected with the reason (never trained).
 */
export function admitProposal(
  p: Proposal,
  proposer: string,
  space: SearchSpace,
  cfg: SearchConfig,
  memory: readonly Trial[],
  index: number,
): NewTrial {
  const common = { proposer, prompt: p.prompt ?? null, rawReply: p.rawReply ?? null, seed: cfg.seed };
  const reject = (key: string, spec: unknown, error: string): NewTrial => ({
    ...common,
    key,
    spec,
    status: "rejected",
    error,
  });
  const invalidKey = `invalid:${memory.length}:${index}`;
  if (p.spec === null || p.spec === undefined) return reject(invalidKey, null, p.error ?? "no architecture");
  const parsed = parseArchitecture(p.spec, space);
  if (!parsed.ok) return reject(invalidKey, p.spec, parsed.reason);
  const arch = canonicalArchitecture(parsed.value);
  const key = architectureKey(arch);
  const spec = toUNetSpec(arch, space.base);
  if (!spec.ok) return reject(key, arch, spec.reason);
  const cost = checkBudget(spec.value, { maxMacs: cfg.maxMacs, maxParams: cfg.maxParams });
  const costs = { macs: cost.macs, params: cost.params };
  if (!cost.ok) return { ...reject(key, arch, cost.reason!), costs };
  // Its training step must fit in memory too (never allocated to find out).
  try {
    checkMemory(spec.value, {
      what: "candidate",
      mode: "train",
      batch: cfg.training.batch,
      batchField: "training.batch",
      memoryLimitMiB: cfg.memoryLimitMiB ?? defaultMemoryLimitMiB(),
    });
  } catch (e) {
    return { ...reject(key, arch, (e as Error).message), costs };
  }
  return { ...common, key, spec: arch, costs, parentId: p.parentId ?? closestDone(arch, memory) };
}

/** The finished trial closest to `arch` (weight inheritance), or null. */
function closestDone(arch: Architecture, memory: readonly Trial[]): number | null {
  let best: { id: number; d: number } | null = null;
  for (const t of memory) {
    if (t.status !== "done") continue;
    const d = distance(arch, t.spec as Architecture);
    if (!best || d < best.d) best = { id: t.id, d };
  }
  return best?.id ?? null;
}

/** Where a search's memory is: the run folder's SQLite file, or a search in a PostgreSQL database. */
export interface MemoryLocation {
  /** A PostgreSQL connection string; absent: memory.sqlite in the run folder. */
  storage?: string;
  /** The search's name in the database. */
  searchName?: string;
}

/** Opens a memory; `shared` says whether other processes (workers) use it at the same time. */
export async function openStorage(
  dir: string,
  where: MemoryLocation = {},
): Promise<{ storage: SearchStorage; shared: boolean; label: string }> {
  if (where.storage === undefined) {
    if (where.searchName !== undefined) {
      throw new UsageError("--search names a search in --storage postgres://…");
    }
    return { storage: SqliteStorage.inRunFolder(dir), shared: false, label: `${dir}/${MEMORY_FILE}` };
  }
  if (!isPostgresUrl(where.storage)) {
    throw new UsageError(`--storage ${redactUrl(where.storage)}: give a postgres:// connection string`);
  }
  try {
    const storage = await PostgresStorage.open(where.storage, { search: where.searchName });
    return { storage, shared: true, label: `search ${storage.search} in ${storage.label}` };
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

/** Opens the search's storage, checking a resumed search's settings; returns the settings in force. */
export async function openMemory(
  cfg: SearchConfig,
  input: Record<string, unknown>,
  resume: boolean,
  where: MemoryLocation = {},
): Promise<{ storage: SearchStorage; cfg: SearchConfig; resumed: boolean; shared: boolean; label: string }> {
  const { storage, shared, label } = await openStorage(cfg.out, where);
  const holder = shared ? label : cfg.out;
  try {
    const meta = await storage.getMeta();
    if (!meta) {
      await storage.setMeta({ version: 1, config: cfg, createdAt: new Date().toISOString(), ended: null });
      return { storage, cfg, resumed: false, shared, label };
    }
    const count = (await storage.listTrials()).length;
    if (!resume) {
      throw new UsageError(
        `${holder} holds a search (${count} trials): add --resume to continue it, or choose another ` +
          (shared ? "--search" : "--out"),
      );
    }
    const stored = parseUsage(SearchConfigSchema, meta.config, `${label} settings`);
    const changed = Object.keys(input).filter((k) =>
      !RESUMABLE_SEARCH_FIELDS.has(k) &&
      JSON.stringify((stored as Record<string, unknown>)[k]) !==
        JSON.stringify((cfg as Record<string, unknown>)[k])
    );
    if (changed.length) {
      throw new UsageError(
        `${holder} holds a search with other settings (${changed.join(", ")}); resume it without changing ` +
          `them, or choose another ${shared ? "--search" : "--out"}`,
      );
    }
    const merged = { ...stored };
    for (const k of RESUMABLE_SEARCH_FIELDS) {
      if (k in input) (merged as Record<string, unknown>)[k] = (cfg as Record<string, unknown>)[k];
    }
    // The run folder is this machine's (a search resumed elsewhere has its own); workers read the rest.
    merged.out = cfg.out;
    await storage.setMeta({ ...meta, config: merged, ended: null });
    return { storage, cfg: merged, resumed: true, shared, label };
  } catch (e) {
    await storage.close();
    throw e;
  }
}

/** Refuses an output folder that exists, is not empty and is not a search. */
export async function checkOutFolder(out: string): Promise<void> {
  let entries: string[];
  try {
    const info = await Deno.stat(out);
    if (!info.isDirectory) throw new UsageError(`--out ${out} is a file, not a folder`);
    entries = [];
    for await (const e of Deno.readDir(out)) entries.push(e.name);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return;
    throw e;
  }
  const ours = new Set([MEMORY_FILE, LOCK_FILE]);
  if (entries.length && !entries.some((n) => ours.has(n))) {
    throw new UsageError(
      `--out ${out} is a folder that holds no search (${entries.slice(0, 3).join(", ")}` +
        `${entries.length > 3 ? ", …" : ""}); choose an empty or new folder`,
    );
  }
}

/**
 * The first steps of every search method: the settings given (fields left undefined are absent, not reset to
 * their defaults), parsed with `overrides` applied; the run folder checked, created and locked for this process.
 */
export async function claimRunFolder(
  input: SearchConfigInput | Record<string, unknown>,
  overrides: Record<string, unknown> = {},
): Promise<{ raw: Record<string, unknown>; given: SearchConfig; lock: RunLock }> {
  const raw = Object.fromEntries(
    Object.entries({ ...(input ?? {}) as Record<string, unknown>, ...overrides }).filter(([, v]) =>
      v !== undefined
    ),
  );
  const given = parseUsage(SearchConfigSchema, raw, "search config");
  await checkOutFolder(given.out);
  await Deno.mkdir(given.out, { recursive: true });
  return { raw, given, lock: lockRunFolder(given.out) };
}

/** What every trial of a search needs, opened once per process (the search process, each worker). */
export interface TrialSetup {
  ctx: RunnerContext;
  /** The base network (the space is built around it; specs are built from it). */
  base: UNetSpec;
  dataset: Dataset;
  reference: { cached: boolean; seconds: number };
  dispose(): void;
}

/** Opens the data, the feature network and the reference statistics of a search's trials. */
export async function openTrialSetup(
  cfg: SearchConfig,
  device: Device,
  storage: SearchStorage,
  dir: string,
  worker: string,
): Promise<TrialSetup> {
  const dataset = await openDataset(
    cfg.data ?? { kind: "procedural", resolution: DEFAULT_NETWORK.imgResolution },
  );
  const base = baseNetwork(dataset);
  const features = await openFeatureExtractor({ device, data: cfg.data });
  try {
    const ref = await referenceStatistics(dataset, features, Math.min(cfg.refN, dataset.length), {
      cacheDir: cfg.cacheDir,
    });
    const ctx: RunnerContext = {
      config: cfg,
      device,
      dataset,
      features,
      reference: ref.stats,
      storage,
      dir,
      worker,
    };
    return {
      ctx,
      base,
      dataset,
      reference: { cached: ref.cached, seconds: ref.seconds },
      dispose: () => features.dispose(),
    };
  } catch (e) {
    features.dispose();
    throw e;
  }
}

/** This process's worker name: host:pid. */
export function defaultWorkerName(): string {
  return `${Deno.hostname()}:${Deno.pid}`;
}

/** Counts of a memory's trials by what the queue needs to know. */
function queueCounts(memory: readonly Trial[]) {
  const n = (s: Trial["status"][]) => memory.filter((t) => s.includes(t.status)).length;
  return { finished: n(["done", "pruned", "failed"]), running: n(["running"]), queued: n(["queued"]) };
}

/** Runs (or resumes) a DiffNAS search; see the file comment. */
export async function runSearch(
  input: SearchConfigInput | Record<string, unknown>,
  opts: SearchOptions = {},
): Promise<SearchOutcome> {
  const t0 = performance.now();
  if (opts.storage !== undefined && !isPostgresUrl(opts.storage)) {
    // Before the run folder is made: a bad --storage leaves nothing behind.
    throw new UsageError(`--storage ${redactUrl(opts.storage)}: give a postgres:// connection string`);
  }
  const { raw, given, lock } = await claimRunFolder(input);
  using _lock = lock;
  const emit = opts.onEvent ?? (() => {});
  let storage: SearchStorage | undefined;
  let device: Device | undefined;
  let setup: TrialSetup | undefined;
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const opened = await openMemory(given, raw, opts.resume ?? false, {
      storage: opts.storage,
      searchName: opts.searchName,
    });
    storage = opened.storage;
    const { cfg, shared } = opened;
    if (opts.proposeOnly && !shared) {
      throw new UsageError(
        "--propose-only needs workers: put the memory in PostgreSQL (--storage postgres://…)",
      );
    }
    const dir = cfg.out, q = cfg.queue;
    // With the run folder's memory this process is the only worker (it holds the lock): a trial still
    // "running" was left by a process that died. A shared memory's running trials may be alive on other
    // machines: only those silent past the grace period go back.
    const requeue = () =>
      shared
        ? storage!.requeueStale(q.graceSeconds * 1000, undefined, q.maxAttempts)
        : storage!.requeueStale(0);
    await requeue();
    device = opts.device ?? await Device.create({ backend: cfg.backend });
    const worker = defaultWorkerName();
    setup = await openTrialSetup(cfg, device, storage, dir, worker);
    const { ctx, base } = setup;
    const space = searchSpaceOf(cfg, base);
    const proposer = opts.proposer ?? makeProposer(cfg, space);
    emit({
      type: "start",
      dir,
      resumed: opened.resumed,
      proposer: proposer.name,
      device: `${device.info.adapter} (${device.kind})`,
      trials: cfg.trials,
      memory: opened.label,
    });
    emit({ type: "reference", cached: setup.reference.cached, seconds: setup.reference.seconds });

    // The baseline: the default network, trained and scored like every candidate.
    let memory = await storage.listTrials();
    if (!memory.some((t) => t.proposer === "baseline")) {
      await storage.addTrial(baselineTrial(base, cfg));
    }

    let stoppedBy: SearchOutcome["stoppedBy"] = "trials";
    let fruitless = 0;
    const trialSeconds: number[] = [];
    const reported = new Set(
      memory.filter((t) => ["done", "pruned", "failed"].includes(t.status)).map((t) => t.id),
    );
    const deadline = t0 + cfg.minutes * 60_000;
    // The running candidate is stopped at the deadline too (it is rerun from its start on --resume), so the
    // wall-clock budget holds whatever the candidate costs.
    const overtime = new AbortController();
    // (A delay past 2³¹ − 1 ms, ~24.8 days, would fire at once: such a budget has no timer.)
    const budgetMs = Math.max(0, deadline - performance.now());
    if (budgetMs < 2 ** 31 - 1) timer = setTimeout(() => overtime.abort(), budgetMs);
    const trialSignal = opts.signal ? AbortSignal.any([opts.signal, overtime.signal]) : overtime.signal;
    const idle = () => new Promise<void>((r) => setTimeout(r, q.pollSeconds * 1000));
    for (;;) {
      if (shared) await requeue();
      memory = await storage.listTrials();
      const { finished, running, queued } = queueCounts(memory);
      // Trials other processes finished since the last look (this process's own are reported as they end).
      for (const t of memory) {
        if (
          reported.has(t.id) || t.status === "queued" || t.status === "running" || t.status === "rejected"
        ) {
          continue;
        }
        reported.add(t.id);
        emit({ type: "trial-end", trial: t, index: reported.size, total: cfg.trials });
      }
      if (finished >= cfg.trials) break;
      if (opts.signal?.aborted) {
        stoppedBy = "interrupted";
        break;
      }
      const typical = trialSeconds.length ? trialSeconds.reduce((a, b) => a + b, 0) / trialSeconds.length : 0;
      if (performance.now() + typical * 1000 > deadline) {
        stoppedBy = "minutes";
        break;
      }
      // Keep `queue.depth` trials waiting, never more than the budget still needs.
      const open = cfg.trials - finished - running - queued;
      if (queued < q.depth && open > 0) {
        const want = Math.min(cfg.proposeBatch, open);
        emit({ type: "propose", proposer: proposer.name, count: want });
        const proposals = await proposer.propose({
          trials: memory,
          count: want,
          seed: hash2(cfg.seed, memory.length),
        });
        let added = 0;
        for (const [i, p] of proposals.entries()) {
          const t = admitProposal(p, proposer.name, space, cfg, memory, i);
          const r = await storage.addTrial(t);
          if (!r.added) continue;
          if (r.trial.status === "rejected") emit({ type: "rejected", trial: r.trial });
          else added++;
        }
        fruitless = added ? 0 : fruitless + 1;
        if (fruitless >= 10) {
          stoppedBy = "exhausted";
          emit({ type: "stop", reason: `the proposer gave no new valid candidate in ${fruitless} calls` });
          break;
        }
        continue;
      }
      const trial = opts.proposeOnly ? null : await storage.claimNext(worker);
      if (!trial) {
        // Workers hold the rest (a shared memory): wait for them, or for a lost one's trial to come back.
        await idle();
        continue;
      }
      const index = finished + running + 1;
      emit({ type: "trial-start", trial, index, total: cfg.trials });
      const started = performance.now();
      try {
        await workOnTrial(ctx, trial, toUNetSpec(trial.spec as Architecture, base), {
          signal: trialSignal,
          memory,
          onEvent: (event) => emit({ type: "trial-progress", trial, event }),
        });
      } catch (e) {
        if ((e as Error).message === "interrupted") {
          stoppedBy = overtime.signal.aborted && !opts.signal?.aborted ? "minutes" : "interrupted";
          break;
        }
        throw e;
      }
      trialSeconds.push((performance.now() - started) / 1000);
      reported.add(trial.id);
      emit({ type: "trial-end", trial: (await storage.getTrial(trial.id))!, index, total: cfg.trials });
    }
    clearTimeout(timer);
    if (stoppedBy !== "exhausted") emit({ type: "stop", reason: stoppedBy });
    // Workers stop asking for trials once the search says it ended (a resume clears it).
    const meta = await storage.getMeta();
    await storage.setMeta({ ...meta, ended: { at: new Date().toISOString(), stoppedBy } });
    memory = await storage.listTrials();
    const report = await writeSearchReport(ctx, memory, base, {
      started: t0,
      stoppedBy,
    });
    emit({ type: "report", html: report.html, json: report.json });
    return {
      dir,
      trials: memory,
      stoppedBy,
      reportHtml: report.html,
      reportJson: report.json,
      summary: report.summary,
      seconds: (performance.now() - t0) / 1000,
    };
  } finally {
    clearTimeout(timer);
    setup?.dispose();
    await storage?.close();
    if (device && !opts.device) device.destroy();
  }
}
