/**
 * @file DiffNAS (Li et al., ICDM 2023): architecture search by prompting, with a search memory and a proxy FID.
 *
 * The loop, as the paper describes it and as Optuna-style tools run it:
 *
 *     memory ← the trials in the run folder's SQLite file (empty for a new search)
 *     trial 1 is the default network (the baseline every candidate is compared with)
 *     until the trial or time budget is spent:
 *         if no trial is queued: ask the proposer for candidates, reading the memory
 *             each candidate is checked against the space and the cost ceilings before any training:
 *             a bad or over-budget one is recorded as rejected with its reason (the proposer sees it next time)
 *         claim the oldest queued trial; train it briefly in memory (rapid convergence), pruned early by the
 *         median rule; score it with the proxy FID (RFID-n); commit
 *     write report.json and report.html
 *
 * Everything a resumed search needs is in the memory: a search killed at any moment and started again with
 * `--resume` keeps every finished trial, reruns the one that was running from its start, and proposes from the
 * same memory. A lock keeps a second process off the folder while the first lives.
 */

import { Device } from "../engine/mod.ts";
import { type Dataset, openDataset } from "../models/data.ts";
import { DEFAULT_NETWORK } from "../models/train.ts";
import { parseUNetSpec, type UNetSpec } from "../models/unet.ts";
import { type FeatureExtractor, openFeatureExtractor } from "../eval/features.ts";
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
import { EvolutionaryProposer } from "./proposers/evolutionary.ts";
import { RandomProposer } from "./proposers/random.ts";
import { LlmProposer } from "./proposers/llm.ts";
import { type RunnerContext, runTrial, type TrialEvent } from "./runner.ts";
import { writeSearchReport } from "./search_report.ts";
import type { NewTrial, Proposal, Proposer, SearchStorage, Trial } from "./types.ts";

/** What a search reports as it goes (the command line draws progress bars from these). */
export type SearchEvent =
  | { type: "start"; dir: string; resumed: boolean; proposer: string; device: string; trials: number }
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
}

/** Trials that cost (or will cost) training: everything but rejections. */
const trainable = (t: Trial) => t.status !== "rejected";

/** The base network of a search: the default network at the data's resolution and channels. */
export function baseNetwork(dataset: Dataset): UNetSpec {
  const levels = DEFAULT_NETWORK.channelMult!.length;
  return parseUNetSpec({
    ...DEFAULT_NETWORK,
    imgResolution: dataset.height,
    inChannels: dataset.channels,
    outChannels: dataset.channels,
    // Attention at the lowest level, whatever the side (8 at 16×16, 14 at Fashion-MNIST's 28×28).
    attnResolutions: [dataset.height >> (levels - 1)],
  });
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

/** Opens the run folder's storage, checking a resumed search's settings; returns the settings in force. */
export async function openMemory(
  cfg: SearchConfig,
  input: Record<string, unknown>,
  resume: boolean,
): Promise<{ storage: SearchStorage; cfg: SearchConfig; resumed: boolean }> {
  const storage = SqliteStorage.inRunFolder(cfg.out);
  try {
    const meta = await storage.getMeta();
    if (!meta) {
      await storage.setMeta({ version: 1, config: cfg, createdAt: new Date().toISOString() });
      return { storage, cfg, resumed: false };
    }
    const count = (await storage.listTrials()).length;
    if (!resume) {
      throw new UsageError(
        `${cfg.out} holds a search (${count} trials): add --resume to continue it, or choose another --out`,
      );
    }
    const stored = parseUsage(SearchConfigSchema, meta.config, `${cfg.out}/memory.sqlite settings`);
    const changed = Object.keys(input).filter((k) =>
      !RESUMABLE_SEARCH_FIELDS.has(k) &&
      JSON.stringify((stored as Record<string, unknown>)[k]) !==
        JSON.stringify((cfg as Record<string, unknown>)[k])
    );
    if (changed.length) {
      throw new UsageError(
        `${cfg.out} holds a search with other settings (${changed.join(", ")}); resume it without changing ` +
          `them, or choose another --out`,
      );
    }
    const merged = { ...stored };
    for (const k of RESUMABLE_SEARCH_FIELDS) {
      if (k in input) (merged as Record<string, unknown>)[k] = (cfg as Record<string, unknown>)[k];
    }
    return { storage, cfg: merged, resumed: true };
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

/** Runs (or resumes) a DiffNAS search; see the file comment. */
export async function runSearch(
  input: SearchConfigInput | Record<string, unknown>,
  opts: SearchOptions = {},
): Promise<SearchOutcome> {
  const t0 = performance.now();
  const { raw, given, lock } = await claimRunFolder(input);
  using _lock = lock;
  const emit = opts.onEvent ?? (() => {});
  let storage: SearchStorage | undefined;
  let device: Device | undefined;
  let features: FeatureExtractor | undefined;
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const opened = await openMemory(given, raw, opts.resume ?? false);
    storage = opened.storage;
    const cfg = opened.cfg;
    const dir = cfg.out;
    // This process holds the lock: a trial still "running" was left by a process that died.
    await storage.requeueStale(0);
    device = opts.device ?? await Device.create({ backend: cfg.backend });
    const dataset = await openDataset(
      cfg.data ?? { kind: "procedural", resolution: DEFAULT_NETWORK.imgResolution },
    );
    const base = baseNetwork(dataset);
    // Attention at the full image resolution is left out unless asked for: on lavapipe a 16×16 candidate with
    // attention at 16×16 trained ~10× slower than the default network (7 min against 34 s for 1 kimg,
    // measured in a default search), far more than its MACs say, and one such trial would eat the budget.
    const space = createSearchSpace(
      { maxAttnResolution: base.imgResolution >> 1, ...(cfg.space ?? {}) },
      base,
    );
    const proposer = opts.proposer ?? makeProposer(cfg, space);
    const worker = `${Deno.hostname()}:${Deno.pid}`;
    emit({
      type: "start",
      dir,
      resumed: opened.resumed,
      proposer: proposer.name,
      device: `${device.info.adapter} (${device.kind})`,
      trials: cfg.trials,
    });
    features = await openFeatureExtractor({ device, data: cfg.data });
    const ref = await referenceStatistics(dataset, features, Math.min(cfg.refN, dataset.length), {
      cacheDir: cfg.cacheDir,
    });
    emit({ type: "reference", cached: ref.cached, seconds: ref.seconds });
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

    // The baseline: the default network, trained and scored like every candidate.
    let memory = await storage.listTrials();
    if (!memory.some((t) => t.proposer === "baseline")) {
      await storage.addTrial(baselineTrial(base, cfg));
    }

    let stoppedBy: SearchOutcome["stoppedBy"] = "trials";
    let fruitless = 0;
    const trialSeconds: number[] = [];
    const deadline = t0 + cfg.minutes * 60_000;
    // The running candidate is stopped at the deadline too (it is rerun from its start on --resume), so the
    // wall-clock budget holds whatever the candidate costs.
    const overtime = new AbortController();
    // (A delay past 2³¹ − 1 ms, ~24.8 days, would fire at once: such a budget has no timer.)
    const budgetMs = Math.max(0, deadline - performance.now());
    if (budgetMs < 2 ** 31 - 1) timer = setTimeout(() => overtime.abort(), budgetMs);
    const trialSignal = opts.signal ? AbortSignal.any([opts.signal, overtime.signal]) : overtime.signal;
    for (;;) {
      memory = await storage.listTrials();
      const trained = memory.filter((t) => trainable(t) && t.status !== "queued").length;
      if (trained >= cfg.trials) break;
      if (opts.signal?.aborted) {
        stoppedBy = "interrupted";
        break;
      }
      const typical = trialSeconds.length ? trialSeconds.reduce((a, b) => a + b, 0) / trialSeconds.length : 0;
      if (performance.now() + typical * 1000 > deadline) {
        stoppedBy = "minutes";
        break;
      }
      let trial = await storage.claimNext(worker);
      if (!trial) {
        const want = Math.min(cfg.proposeBatch, cfg.trials - trained);
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
      const index = trained + 1;
      emit({ type: "trial-start", trial, index, total: cfg.trials });
      const spec = toUNetSpec(trial.spec as Architecture, base);
      if (!spec.ok) {
        await storage.finish(trial.id, worker, { status: "failed", error: spec.reason });
      } else {
        const started = performance.now();
        const current = trial;
        let result;
        try {
          result = await runTrial(ctx, current, spec.value, {
            signal: trialSignal,
            memory,
            onEvent: (event) => emit({ type: "trial-progress", trial: current, event }),
          });
        } catch (e) {
          if ((e as Error).message === "interrupted") {
            stoppedBy = overtime.signal.aborted && !opts.signal?.aborted ? "minutes" : "interrupted";
            break;
          }
          throw e;
        }
        await storage.finish(trial.id, worker, {
          ...result,
          costs: { ...trial.costs, ...result.costs },
        });
        trialSeconds.push((performance.now() - started) / 1000);
      }
      trial = (await storage.getTrial(trial.id))!;
      emit({ type: "trial-end", trial, index, total: cfg.trials });
    }
    clearTimeout(timer);
    if (stoppedBy !== "exhausted") emit({ type: "stop", reason: stoppedBy });
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
    features?.dispose();
    await storage?.close();
    if (device && !opts.device) device.destroy();
  }
}
