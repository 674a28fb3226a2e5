/**
 * @file `deno task eval`: everything the search needs to know about trained checkpoints, in one report.
 *
 * For each checkpoint: parameters and MACs from its network spec (models/cost.ts, attention reported apart),
 * measured forward latency on this adapter, the full FID and the proxy RFID against the statistics of the data
 * it was trained on (eval/proxy.ts), and optionally KID. With three or more checkpoints (several runs, or
 * `allCheckpoints`) the report adds Spearman's ρ between RFID and FID: the proxy's validation.
 *
 * Long evaluations survive being killed: each measurement is saved in `<run>/eval/<checkpoint>.json` under a
 * key naming everything that determines it (protocol, feature network fingerprint, reference set), and a later
 * evaluation reads what applies instead of recomputing it (see `MeasurementCache`).
 */

import { z } from "zod";
import { Device } from "../engine/mod.ts";
import { DataConfig, type Dataset, openDataset } from "../models/data.ts";
import { CheckpointGenerator } from "../models/generate.ts";
import { listCheckpoints, type TrainState } from "../models/checkpoint.ts";
import { readStoredConfig, type TrainConfig } from "../models/train.ts";
import { networkSpec } from "../models/trainer.ts";
import type { UNetSpec } from "../models/unet.ts";
import { measureLatency } from "./cost.ts";
import { checkMemory, defaultMemoryLimitMiB, type UNetCost, unetCost } from "../models/cost.ts";
import { kernelInceptionDistance } from "./fid.ts";
import { type FeatureExtractor, openFeatureExtractor } from "./features.ts";
import {
  datasetStatistics,
  type FidMeasurement,
  type FidProtocol,
  FULL_FID,
  measureFid,
  metricName,
  PROXY_FID,
  referenceStatistics,
  spearman,
} from "./proxy.ts";
import { UsageError } from "../util/errors.ts";
import { parseUsage } from "../util/config.ts";
import { writeTextAtomic } from "../util/files.ts";

/** Options of `evaluate` (`deno task eval`). */
export const EvalConfigSchema = z.strictObject({
  // Run directories to evaluate (each its newest checkpoint, or all of them with allCheckpoints).
  runs: z.array(z.string().min(1)).min(1),
  // Checkpoint folders instead (each one's run is the folder two levels up).
  checkpoints: z.array(z.string().min(1)).min(1).optional(),
  // Evaluate every checkpoint of every run (the proxy-validation ladder).
  allCheckpoints: z.boolean().default(false),
  // Full metric: generated images and Heun steps (FID-n).
  n: z.number().int().min(2).default(FULL_FID.n),
  steps: z.number().int().min(2).default(FULL_FID.steps),
  // Proxy metric: generated images and Heun steps (RFID-n); proxyN 0 skips it.
  proxyN: z.number().int().min(0).default(PROXY_FID.n),
  proxySteps: z.number().int().min(2).default(PROXY_FID.steps),
  // Skip the full metric (report only the proxy and the cost).
  proxyOnly: z.boolean().default(false),
  // Real images for the reference statistics (default: min(10000, dataset size)).
  refN: z.number().int().min(2).optional(),
  // Seed of the latents (the same for every checkpoint, so models are compared on the same noise).
  seed: z.number().int().min(0).max(0xffffffff).default(0),
  // The reference data (default: the checkpoints' training data); it also picks the feature network.
  data: DataConfig.optional(),
  // Inception-v3 weights (safetensors, PyTorch names): the literature's FID. Default: the shipped network that
  // matches the data (FashionNet for Fashion-MNIST, else ShapesNet).
  inception: z.string().min(1).optional(),
  // Also compute KID (unbiased, cubic polynomial kernel) for the full metric's samples.
  kid: z.boolean().default(false),
  // Forward latency measurement (batch 1 at width 1); false skips it.
  latency: z.boolean().default(true),
  // Images per network batch while sampling and extracting features.
  batch: z.number().int().positive().default(256),
  // Where reference statistics are cached.
  cacheDir: z.string().min(1).default(".cache/fid"),
  // Recompute measurements (and the cached reference statistics) even where saved ones apply.
  force: z.boolean().default(false),
  // Device: WebGPU or the CPU reference kernels.
  backend: z.enum(["webgpu", "cpu"]).default("webgpu"),
  // Ceiling of the estimated memory of sampling a batch, in MiB (default: the machine's).
  memoryLimitMiB: z.number().positive().finite().optional(),
});
export type EvalConfigInput = z.input<typeof EvalConfigSchema>;
export type EvalConfig = z.output<typeof EvalConfigSchema>;

/** The evaluation of one checkpoint. */
export interface CheckpointEval {
  run: string;
  checkpoint: string;
  step: number;
  /** Training images seen. */
  nimg: number;
  cost: UNetCost;
  /** Median forward latency (batch 1, width 1) in ms and the adapter, if measured. */
  latency?: { medianMs: number; adapter: string };
  fid?: FidMeasurement;
  rfid?: FidMeasurement;
  kid?: { name: string; mean: number; std: number };
  /** How many of the measurements were read from `<run>/eval/<checkpoint>.json` instead of made. */
  reused: number;
}

/** What `evaluate` returns. */
export interface EvalReport {
  features: { name: string; fingerprint: string };
  reference: { dataset: string; n: number; cached: boolean; seconds: number };
  checkpoints: CheckpointEval[];
  /** Spearman's ρ between RFID and FID over the checkpoints (three or more, both metrics measured). */
  rankCorrelation?: { rho: number; count: number; fid: string; rfid: string };
}

/** Progress events for the command line. */
export type EvalEvent =
  | { type: "reference"; done: number; total: number }
  | { type: "warning"; message: string }
  | { type: "checkpoint"; index: number; total: number; dir: string }
  | { type: "metric"; name: string; done: number; total: number }
  | { type: "result"; result: CheckpointEval };

/** The checkpoints to evaluate, with their run directories, oldest first within a run. */
async function selectCheckpoints(cfg: EvalConfig): Promise<{ run: string; dir: string }[]> {
  if (cfg.checkpoints) {
    return cfg.checkpoints.map((c) => {
      const dir = c.replace(/\/+$/, "");
      return { run: dir.split("/").slice(0, -2).join("/") || ".", dir };
    });
  }
  const out: { run: string; dir: string }[] = [];
  for (const run of cfg.runs) {
    const all = await listCheckpoints(run);
    if (!all.length) throw new UsageError(`${run} has no checkpoint (${run}/checkpoints/step-*/ is missing)`);
    for (const c of cfg.allCheckpoints ? all : all.slice(-1)) out.push({ run, dir: c.dir });
  }
  return out;
}

/**
 * The saved measurements of one checkpoint, `<run>/eval/<checkpoint>.json`: each under a key naming everything
 * that determines it, rewritten (atomically) after every new measurement, so a killed evaluation loses at most
 * the measurement in progress and a later one with other settings reuses what still applies.
 */
class MeasurementCache {
  private constructor(readonly path: string, private entries: Record<string, unknown>) {}

  static async open(path: string, ignoreSaved: boolean): Promise<MeasurementCache> {
    let entries: Record<string, unknown> = {};
    if (!ignoreSaved) {
      try {
        const parsed = JSON.parse(await Deno.readTextFile(path));
        if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) entries = parsed;
      } catch { /* missing or unreadable: start empty */ }
    }
    return new MeasurementCache(path, entries);
  }

  /** The saved value of `key`, or `measure()` saved under it. */
  async get<T>(key: string, measure: () => Promise<T>, onReuse: () => void): Promise<T> {
    if (key in this.entries) {
      onReuse();
      return this.entries[key] as T;
    }
    const value = await measure();
    this.entries = { ...this.entries, [key]: value };
    await Deno.mkdir(this.path.split("/").slice(0, -1).join("/"), { recursive: true });
    await writeTextAtomic(this.path, JSON.stringify(this.entries, null, 2) + "\n");
    return value;
  }
}

/**
 * Evaluates checkpoints (see the file comment). All of them must have been trained on the same data, since they
 * are compared against one reference.
 */
export async function evaluate(
  input: EvalConfigInput | Record<string, unknown>,
  opts: { device?: Device; onEvent?: (e: EvalEvent) => void } = {},
): Promise<EvalReport> {
  const cfg: EvalConfig = parseUsage(EvalConfigSchema, input, "eval");
  const emit = opts.onEvent ?? (() => {});
  const targets = await selectCheckpoints(cfg);
  // Every checkpoint's training configuration; they must share the data.
  const states: { run: string; dir: string; state: TrainState; train: TrainConfig }[] = [];
  for (const t of targets) {
    const { state, cfg: train } = await readStoredConfig(t.dir);
    states.push({ ...t, state, train });
  }
  const dataKey = (c: TrainConfig) => JSON.stringify(c.data);
  const other = states.find((s) => dataKey(s.train) !== dataKey(states[0].train));
  if (other) {
    throw new UsageError(
      `eval: ${other.dir} was trained on ${dataKey(other.train)}, ${states[0].dir} on ` +
        `${dataKey(states[0].train)}; checkpoints compared in one evaluation must share their data`,
    );
  }
  // Every checkpoint's network at the sampling batch must fit before anything is allocated.
  const images = Math.max(cfg.proxyN, cfg.proxyOnly ? 0 : cfg.n);
  const memory = (deviceLimits?: Readonly<Record<string, number>>) => {
    for (const s of states) {
      checkMemory(networkSpec(s.train), {
        what: `eval: ${s.dir}`,
        mode: "sample",
        batch: Math.max(1, Math.min(cfg.batch, images)),
        batchField: "batch",
        memoryLimitMiB: cfg.memoryLimitMiB ?? defaultMemoryLimitMiB(),
        deviceLimits,
      });
    }
  };
  memory();
  const device = opts.device ?? await Device.create({ backend: cfg.backend });
  let features: FeatureExtractor | undefined;
  try {
    memory(device.info.limits);
    const data = cfg.data ?? states[0].train.data;
    features = await openFeatureExtractor({ inception: cfg.inception, data, device });
    const dataset = await openDataset(data);
    const refN = cfg.refN ?? Math.min(10000, dataset.length);
    const ref = await referenceStatistics(dataset, features, refN, {
      cacheDir: cfg.cacheDir,
      batch: cfg.batch,
      onProgress: (done, total) => emit({ type: "reference", done, total }),
      // --force recomputes the reference too (a damaged cache file is recomputed anyway, with a warning).
      recompute: cfg.force,
      onWarning: (message) => emit({ type: "warning", message }),
    });
    const full: FidProtocol = { n: cfg.n, steps: cfg.steps, sampler: "heun", seed: cfg.seed };
    const proxy: FidProtocol = { n: cfg.proxyN, steps: cfg.proxySteps, sampler: "heun", seed: cfg.seed };
    // What every Fréchet measurement depends on besides its protocol.
    const against = `features=${features.name}@${features.fingerprint} ref=${dataset.name}/${refN}`;
    const fidKey = (name: string, p: FidProtocol) =>
      `${name} ${p.sampler} steps=${p.steps} seed=${p.seed} ${against}`;
    const results: CheckpointEval[] = [];
    for (const [index, s] of states.entries()) {
      const cache = await MeasurementCache.open(`${s.run}/eval/${s.dir.split("/").pop()}.json`, cfg.force);
      let reused = 0;
      const onReuse = () => reused++;
      emit({ type: "checkpoint", index, total: states.length, dir: s.dir });
      const spec: UNetSpec = networkSpec(s.train);
      const result: CheckpointEval = {
        run: s.run,
        checkpoint: s.dir,
        step: s.state.step,
        nimg: s.state.nimg,
        cost: unetCost(spec),
        reused: 0,
      };
      const gen = await CheckpointGenerator.open(s.dir, spec, { device, sigmaData: s.train.sigmaData });
      try {
        const progress = (metric: string) => (done: number, total: number) =>
          emit({ type: "metric", name: metric, done, total });
        if (cfg.latency) {
          result.latency = await cache.get(`latency ${device.info.adapter}`, async () => {
            const l = await measureLatency(gen.net, { runs: 5 });
            return { medianMs: l.medianMs, adapter: l.adapter };
          }, onReuse);
        }
        /** One Fréchet measurement, read from the cache or made (with the features kept when asked). */
        const fid = (kind: "FID" | "RFID", p: FidProtocol, keepFeatures = false) => {
          const name = metricName(kind, p.n);
          return measureFid(kind, gen, features!, ref.stats, p, {
            batch: cfg.batch,
            keepFeatures,
            onProgress: progress(name),
          });
        };
        const cachedFid = (kind: "FID" | "RFID", p: FidProtocol) =>
          cache.get(fidKey(metricName(kind, p.n), p), async () => {
            const { stats: _, features: __, ...m } = await fid(kind, p);
            return m;
          }, onReuse);
        if (cfg.proxyN > 0) result.rfid = await cachedFid("RFID", proxy);
        if (!cfg.proxyOnly && !cfg.kid) result.fid = await cachedFid("FID", full);
        if (!cfg.proxyOnly && cfg.kid) {
          // KID needs the features themselves: FID and KID come from one pass, saved together.
          const both = await cache.get(`${fidKey(metricName("FID", full.n), full)} +KID`, async () => {
            const { stats: _, features: generated, ...m } = await fid("FID", full, true);
            const real = await referenceFeatures(dataset, features!, Math.min(refN, full.n), cfg.batch);
            const kid = await kernelInceptionDistance(generated!, real, features!.dim, {
              subsets: 20,
              subsetSize: Math.min(1000, full.n),
            });
            return { fid: m, kid: { name: `KID-${full.n}`, mean: kid.mean, std: kid.std } };
          }, onReuse);
          result.fid = both.fid;
          result.kid = both.kid;
        }
      } finally {
        gen.dispose();
      }
      result.reused = reused;
      results.push(result);
      emit({ type: "result", result });
    }
    const report: EvalReport = {
      features: { name: features.name, fingerprint: features.fingerprint },
      reference: { dataset: dataset.name, n: refN, cached: ref.cached, seconds: ref.seconds },
      checkpoints: results,
    };
    const both = results.filter((r) => r.fid && r.rfid);
    if (both.length >= 3) {
      report.rankCorrelation = {
        rho: spearman(both.map((r) => r.fid!.value), both.map((r) => r.rfid!.value)),
        count: both.length,
        fid: both[0].fid!.name,
        rfid: both[0].rfid!.name,
      };
    }
    return report;
  } finally {
    features?.dispose();
    if (!opts.device) device.destroy();
  }
}

/** Features of the first n real images (for KID). */
async function referenceFeatures(
  dataset: Dataset,
  features: FeatureExtractor,
  n: number,
  batch: number,
): Promise<Float32Array> {
  const r = await datasetStatistics(dataset, features, n, { batch, keepFeatures: true });
  return r.features!;
}
