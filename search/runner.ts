/**
 * @file The runner: takes one claimed trial, trains it in memory with the models layer's `Trainer` (the short
 * schedule, optionally from inherited weights, with the median pruning rule), scores it with the search's
 * proxy (the proxy FID through the generator interface, or the loss proxy of eval/denoising_loss.ts), and
 * commits the result. The same runner serves the search process and
 * workers on other machines (`search/worker.ts`): `workOnTrial` heartbeats while a trial runs (from the
 * memory's heartbeat thread where it has one) and commits its result, which the storage refuses (recording it as a late duplicate) if the trial was re-queued
 * meanwhile.
 *
 * A trial's EMA weights are saved in the run folder (`weights/trial-<id>.safetensors`, written atomically),
 * and in a shared memory (PostgreSQL) too, before its result is committed: a later trial may inherit them and the report draws sample grids from them,
 * also after a restart. A trial that throws is committed as failed with the error; a `NonFiniteLossError` (the
 * candidate diverged) is a failure of the candidate, not of the search.
 */

import { decodeSafetensors, type Device, saveSafetensors, type Tensor } from "../engine/mod.ts";
import type { Dataset } from "../models/data.ts";
import { NetworkGenerator } from "../models/generate.ts";
import { parseTrainerConfig, Trainer, type TrainerConfig } from "../models/trainer.ts";
import { UNet, type UNetSpec } from "../models/unet.ts";
import { type LossProtocol, lossProxy } from "../eval/denoising_loss.ts";
import type { FeatureExtractor } from "../eval/features.ts";
import type { FidStatistics } from "../eval/fid.ts";
import { type FidMeasurement, type FidProtocol, measureFid } from "../eval/proxy.ts";
import { type HostState, hostState, inheritState, stateTensors } from "./inherit.ts";
import { shouldPrune } from "./memory.ts";
import { type SearchConfig, trialSchedule } from "./config.ts";
import { writeFileAtomic } from "../util/files.ts";
import type { HeartbeatStats, SearchStorage, Trial, TrialResult } from "./types.ts";

/** What every trial of a search shares: opened once. */
export interface RunnerContext {
  config: SearchConfig;
  device: Device;
  dataset: Dataset;
  features: FeatureExtractor;
  reference: FidStatistics;
  storage: SearchStorage;
  /** The run folder. */
  dir: string;
  /** This process's worker name (host:pid). */
  worker: string;
}

/** Progress of one trial, for the progress bars. */
export type TrialEvent =
  | { type: "train"; nimg: number; totalNimg: number; loss?: number }
  | { type: "proxy"; done: number; total: number };

/** The file holding a trial's EMA weights. */
export function weightsPath(dir: string, id: number): string {
  return `${dir}/weights/trial-${id}.safetensors`;
}

/** The proxy protocol of a search. */
export function proxyProtocol(c: SearchConfig): FidProtocol {
  return { n: c.proxyN, steps: c.proxySteps, sampler: "heun", seed: c.seed };
}

/** The loss proxy's protocol of a search (same grid and seed as the proxy FID's). */
export function lossProtocol(c: SearchConfig): LossProtocol {
  return { n: c.lossN, steps: c.proxySteps, seed: c.seed };
}

/**
 * Makes sure a trial's weights are in the run folder: a trial trained on another machine has them only in a
 * shared memory (`loadWeights`), from which they are copied once. False when there are none.
 */
export async function fetchTrialWeights(dir: string, id: number, storage?: SearchStorage): Promise<boolean> {
  const path = weightsPath(dir, id);
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  const bytes = await storage?.loadWeights?.(id);
  if (!bytes) return false;
  await Deno.mkdir(`${dir}/weights`, { recursive: true });
  await writeFileAtomic(path, bytes);
  return true;
}

/**
 * Reads a saved trial's weights to the host (decoded from the file, no device round trip; fetched from a
 * shared `storage` first if only it has them); null if missing.
 */
export async function readTrialWeights(
  dir: string,
  id: number,
  storage?: SearchStorage,
): Promise<HostState | null> {
  const path = weightsPath(dir, id);
  if (!(await fetchTrialWeights(dir, id, storage))) return null;
  const bytes = await Deno.readFile(path);
  const out: HostState = {};
  for (const [k, t] of Object.entries(decodeSafetensors(bytes, path).tensors)) {
    out[k] = { shape: t.shape, data: t.data };
  }
  return out;
}

/** Builds a trained trial's network from its saved weights (the caller disposes it). */
export async function loadTrialNetwork(
  dir: string,
  id: number,
  spec: UNetSpec,
  device: Device,
): Promise<UNet> {
  const net = new UNet(spec, { device }).eval();
  try {
    await net.loadSafetensors(weightsPath(dir, id));
  } catch (e) {
    net.dispose();
    throw e;
  }
  return net;
}

/** The trainer settings of a candidate: `spec` trained on the search's data with `schedule` from `seed`. */
export function candidateTrainerConfig(
  spec: UNetSpec,
  c: Pick<SearchConfig, "data">,
  seed: number,
  schedule: ReturnType<typeof trialSchedule>,
): TrainerConfig {
  return parseTrainerConfig({
    network: spec,
    data: c.data ?? { kind: "procedural", resolution: spec.imgResolution },
    seed,
    batch: schedule.batch,
    lr: schedule.lr,
    lrRampupKimg: schedule.lrRampupKimg,
    emaHalfLifeKimg: schedule.emaHalfLifeKimg,
    pMean: schedule.pMean,
    logEvery: schedule.logEvery,
    gradClip: schedule.gradClip,
  });
}

/**
 * The initial weights of a candidate that inherits from `parent`: its fresh initialisation, exactly as the
 * Trainer would draw it from `seed`, with the parent overlaid (the caller disposes the tensors).
 */
export async function inheritedInit(
  spec: UNetSpec,
  seed: number,
  parent: HostState,
  device: Device,
): Promise<Record<string, Tensor>> {
  device.manualSeed(seed);
  const fresh = new UNet(spec, { device });
  try {
    return stateTensors(inheritState(await hostState(fresh), parent).state, device);
  } finally {
    fresh.dispose();
  }
}

/** Measures a trained network's FID (or RFID) under `protocol`, reporting progress as "proxy" events. */
export function scoreNetwork(
  net: UNet,
  sigmaData: number,
  ctx: Pick<RunnerContext, "features" | "reference">,
  kind: "FID" | "RFID",
  protocol: FidProtocol,
  emit: (e: TrialEvent) => void = () => {},
): Promise<FidMeasurement> {
  const gen = new NetworkGenerator(net, { sigmaData });
  return measureFid(kind, gen, ctx.features, ctx.reference, protocol, {
    onProgress: (done, total) => emit({ type: "proxy", done, total }),
  });
}

/**
 * Trains and scores `trial` (already claimed by `ctx.worker`) and commits the result. `spec` is its UNetSpec.
 * Heartbeats go with every logged loss (unless the memory heartbeats from a thread of its own). Returns the committed result.
 */
export async function runTrial(
  ctx: RunnerContext,
  trial: Trial,
  spec: UNetSpec,
  opts: { onEvent?: (e: TrialEvent) => void; signal?: AbortSignal; memory?: readonly Trial[] } = {},
): Promise<TrialResult> {
  const c = ctx.config, emit = opts.onEvent ?? (() => {});
  const schedule = trialSchedule(c.training);
  const cfg = candidateTrainerConfig(spec, c, trial.seed, schedule);
  const totalNimg = Math.round(schedule.kimg * 1000);
  let init: Record<string, Tensor> | undefined;
  let trainer: Trainer | undefined;
  const result: TrialResult = { status: "failed", lossHistory: [], costs: {} };
  try {
    if (c.inherit && trial.parentId !== null) {
      const parent = await readTrialWeights(ctx.dir, trial.parentId, ctx.storage);
      if (parent) init = await inheritedInit(spec, trial.seed, parent, ctx.device);
    }
    trainer = new Trainer(cfg, ctx.device, ctx.dataset, { init });
    const memory = opts.memory ?? [];
    const checkpoints = c.pruning.enabled ? c.pruning.at.map((f) => Math.round(f * totalNimg)) : [];
    const run = await trainer.run({
      untilNimg: totalNimg,
      signal: opts.signal,
      onStep: (p) => emit({ type: "train", nimg: p.nimg, totalNimg }),
      onLog: async (e) => {
        emit({ type: "train", nimg: e.nimg, totalNimg, loss: e.loss });
        // (A memory with a heartbeat thread needs no beat from here.)
        if (!ctx.storage.startHeartbeats) await ctx.storage.heartbeat(trial.id, ctx.worker);
      },
      // Optuna's median rule at the first logged point at or past each checkpoint of the schedule.
      shouldStop: (e) => {
        // Every candidate logs at the same image counts (same batch and logEvery), so the finished trials'
        // losses at e.nimg are logged points, not interpolations.
        const first = checkpoints.some((n) => e.nimg >= n && e.nimg - cfg.batch * cfg.logEvery < n);
        return first && shouldPrune(e.loss, e.nimg, memory, c.pruning.minTrials);
      },
    });
    result.lossHistory = run.lossHistory;
    result.costs = { trainSeconds: run.trainSeconds };
    if (run.stoppedBy === "aborted") throw new Error("interrupted");
    if (run.stoppedBy === "stopped") {
      const last = run.lossHistory[run.lossHistory.length - 1];
      result.status = "pruned";
      result.error = `pruned at ${last.nimg} images: loss ${last.loss.toFixed(4)} is above the median of ` +
        `finished trials there`;
      return result;
    }
    const net = trainer.emaNetwork();
    await Deno.mkdir(`${ctx.dir}/weights`, { recursive: true });
    await saveSafetensors(weightsPath(ctx.dir, trial.id), net.stateDict(), { trial: String(trial.id) });
    // A shared memory keeps them too (other machines inherit from them, the report draws them).
    await ctx.storage.saveWeights?.(
      trial.id,
      ctx.worker,
      await Deno.readFile(weightsPath(ctx.dir, trial.id)),
    );
    const m = c.proxyMetric === "loss"
      ? await lossProxy(net, cfg.sigmaData, ctx.dataset, lossProtocol(c))
      : await scoreNetwork(net, cfg.sigmaData, ctx, "RFID", proxyProtocol(c), emit);
    result.status = "done";
    result.scores = { proxyFid: m.value, proxyName: m.name };
    result.costs = { trainSeconds: run.trainSeconds, proxySeconds: m.seconds };
    return result;
  } catch (e) {
    if ((e as Error).message === "interrupted") throw e;
    result.status = "failed";
    result.error = (e as Error).message;
    return result;
  } finally {
    trainer?.dispose();
    if (init) { for (const t of Object.values(init)) t.dispose(); }
  }
}

/** What became of a claimed trial. */
export interface TrialOutcome {
  result: TrialResult;
  /** False when the storage refused the result (the trial was re-queued meanwhile): recorded as late. */
  applied: boolean;
  /** Heartbeats the storage refused (the trial was no longer this worker's). */
  lostHeartbeats: number;
  /** The heartbeats sent while it ran (from the heartbeat thread, when the memory has one). */
  heartbeats: HeartbeatStats;
}

/**
 * Works on one trial claimed by `ctx.worker`: trains and scores it (`runTrial`) while it heartbeats every
 * `config.queue.heartbeatSeconds` (from the memory's heartbeat thread where it has one: synchronous kernels
 * may hold this thread for seconds), then commits the result with the trial's costs merged. `spec` is its network
 * or, when its architecture does not build, the reason (committed as a failure). An interruption is thrown
 * (message "interrupted") and nothing is committed: the trial is re-queued once its heartbeat is stale, or at
 * once by a search process that resumes.
 */
export async function workOnTrial(
  ctx: RunnerContext,
  trial: Trial,
  spec: { ok: true; value: UNetSpec } | { ok: false; reason: string },
  opts: { onEvent?: (e: TrialEvent) => void; signal?: AbortSignal; memory?: readonly Trial[] } = {},
): Promise<TrialOutcome> {
  if (!spec.ok) {
    const result: TrialResult = { status: "failed", error: spec.reason };
    const heartbeats = { calls: 0, ms: 0, lost: 0 };
    return {
      result,
      applied: await ctx.storage.finish(trial.id, ctx.worker, result),
      lostHeartbeats: 0,
      heartbeats,
    };
  }
  const intervalMs = ctx.config.queue.heartbeatSeconds * 1000;
  const heartbeats = ctx.storage.startHeartbeats
    ? await ctx.storage.startHeartbeats(trial.id, ctx.worker, intervalMs)
    : timerHeartbeats(ctx.storage, trial.id, ctx.worker, intervalMs);
  let result: TrialResult, beats: HeartbeatStats;
  try {
    result = await runTrial(ctx, trial, spec.value, opts);
  } finally {
    beats = await heartbeats.stop();
  }
  const committed = { ...result, costs: { ...trial.costs, ...result.costs } };
  return {
    result: committed,
    applied: await ctx.storage.finish(trial.id, ctx.worker, committed),
    lostHeartbeats: beats.lost,
    heartbeats: beats,
  };
}

/** Heartbeats on a timer of this thread (a memory without a heartbeat thread: SQLite, one process). */
function timerHeartbeats(
  storage: SearchStorage,
  id: number,
  worker: string,
  intervalMs: number,
): { stop(): Promise<HeartbeatStats> } {
  const stats: HeartbeatStats = { calls: 0, ms: 0, lost: 0 };
  let beating = Promise.resolve();
  const timer = setInterval(() => {
    beating = beating.then(async () => {
      const t0 = performance.now();
      try {
        if (!(await storage.heartbeat(id, worker))) stats.lost++;
      } catch {
        // A missed heartbeat is what the grace period allows for.
      } finally {
        stats.calls++;
        stats.ms += performance.now() - t0;
      }
    });
  }, intervalMs);
  return {
    stop: async () => {
      clearInterval(timer);
      await beating;
      return stats;
    },
  };
}
