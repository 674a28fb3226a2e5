/**
 * @file The training loop and sampling from checkpoints: EDM training (Karras et al. 2022; NVlabs/edm
 * `training/training_loop.py`) of any `UNetSpec`, optionally as a DDSM slimmable supernet with the sandwich
 * rule (Yang et al. 2023; the authors' `main.py`), with exact resume.
 *
 * One optimizer step, as in EDM's loop:
 *
 * - the learning rate ramps up linearly with the images seen before the step, lr·min(nimg / lr_rampup, 1), so
 *   the very first step has lr 0 (as in EDM and in DDSM's warm-up);
 * - the EDM loss (models/edm.ts) of a batch is back-propagated; with the sandwich rule the same images are
 *   used at the full width, at 0.25 and at one middle width drawn from {0.5, 0.75}, each loss with its own σ and
 *   noise draws, and the three gradients add up before the one optimizer step (DDSM §3.2);
 * - optionally the global gradient norm is clipped (DDSM: 1; EDM: none), on the device: the clip coefficient
 *   goes into Adam's fused update as a gradient scale;
 * - Adam updates the weights; the EMA follows with β = 0.5^(batch / half-life), the half-life ramped up as
 *   min(half-life, ratio·nimg) (EDM's ema_halflife_kimg and ema_rampup_ratio).
 *
 * Nothing is read back in a step. Each step returns its per-sample losses and σ as one small device tensor; every
 * `logEvery` steps these are concatenated and read in one sync, which gives the logged loss, the loss per
 * σ-bucket and a NaN/Inf check that names the first bad step. Checkpoints (models/checkpoint.ts) are written
 * only after the losses before them were checked, and only if every weight is finite.
 *
 * Determinism: every random draw (initialisation, σ, noise, dropout) comes from the device's Philox generator,
 * the data order from (seed, epoch), the sandwich's middle width from (seed, step); a checkpoint stores the
 * generator's counter and the data position, so a resumed run computes the same numbers as one that never
 * stopped (bit-identical on the CPU backend). Sample grids use their own seeded stream and do not disturb it.
 */

import { z } from "zod";
import {
  cat,
  Device,
  encodeSafetensors,
  noGrad,
  optim,
  randn,
  reshape,
  scope,
  type Tensor,
} from "../engine/mod.ts";
import { parseUNetSpec, UNet, type UNetSpec, type UNetSpecInput } from "./unet.ts";
import { PRESETS } from "./presets.ts";
import { DEFAULT_SIGMA_EDGES, edmLoss, EDMPrecond, lossBySigmaBucket, type SigmaBucket } from "./edm.ts";
import { BatchIterator, DataConfig, type Dataset, hash2, openDataset, Rng } from "./data.ts";
import { heunSampler, type StepInfo } from "./samplers.ts";
import { CheckpointGenerator, classLabels, SamplerSettingsSchema } from "./generate.ts";
import { saveImageGrid, writeFileAtomic } from "./images.ts";
import {
  checkpointName,
  checkpointsDir,
  disposeCheckpoint,
  latestCheckpoint,
  loadCheckpoint,
  type LoadedCheckpoint,
  type LossPoint,
  NonFiniteCheckpointError,
  readTrainState,
  removeStaleTemporaries,
  saveCheckpoint,
  writeTextAtomic,
} from "./checkpoint.ts";
import { DDSM_WIDTHS } from "./slimmable.ts";
import { emaBetaFromHalfLife } from "./ema.ts";

// ---------------------------------------------------------------------------------------------------------------
// Errors.

/** A problem with what the user asked for (bad option, missing run directory): the CLI exits with 2. */
export class UsageError extends Error {
  override name = "UsageError";
}

/** The logged loss (or a weight) became NaN or ±Inf; nothing was saved after the last good checkpoint. */
export class NonFiniteLossError extends Error {
  override name = "NonFiniteLossError";
  constructor(message: string, readonly step: number) {
    super(message);
  }
}

/** Parses with zod; a failure is a `UsageError` naming every bad field. */
function parseOrThrow<S extends z.ZodType>(schema: S, value: unknown, what: string): z.output<S> {
  const r = schema.safeParse(value ?? {});
  if (r.success) return r.data;
  const issues = r.error.issues.map((i) => `${i.path.length ? i.path.join(".") : "(options)"}: ${i.message}`);
  throw new UsageError(`${what}: ${issues.join("; ")}`);
}

/** Reads a JSON file for a configuration; errors name the file. */
export async function readJsonFile(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new UsageError(`cannot read ${path}: ${(e as Error).message}`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new UsageError(`${path} is not valid JSON: ${(e as Error).message}`);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Configuration.

/**
 * The default network: a small DDPM++-style SongUNet for 16×16 RGB (16 channels × [1, 2], one block per level,
 * attention at 8×8, 189,347 parameters): 20–40 images/s on llvmpipe with two shared CPU cores, so the default
 * 6 kimg take about 3–5 minutes and turn noise into smooth colour fields (shapes need longer runs).
 */
export const DEFAULT_NETWORK: UNetSpecInput = Object.freeze({
  imgResolution: 16,
  inChannels: 3,
  outChannels: 3,
  modelChannels: 16,
  channelMult: [1, 2],
  numBlocks: 1,
  attnResolutions: [8],
  decoderAttention: "last",
  numHeads: 1,
  dropout: 0,
  embeddingLayout: "sin-cos",
  embeddingEndpoint: true,
  resampleProj: true,
  skipScale: Math.SQRT1_2,
  normEps: 1e-6,
}) as UNetSpecInput;

const positive = z.number().positive().finite();
const nonNeg = z.number().nonnegative().finite();

/** Options of `train` (what `deno task train --config file.json` holds). */
export const TrainConfigSchema = z.object({
  // The network: a preset name (ddpmpp-cifar10, adm-imagenet64, ddsm-cifar10), a UNetSpec, or a .json file with one.
  network: z.union([z.string().min(1), z.record(z.string(), z.unknown())]).default(DEFAULT_NETWORK),
  // Training images (models/data.ts; default: the embedded procedural shapes at the network's resolution).
  data: DataConfig.optional(),
  // Images per optimizer step (EDM CIFAR-10: 512; DDSM: 128).
  batch: z.number().int().positive().default(32),
  // Training length in thousands of images (EDM CIFAR-10: 200000).
  kimg: positive.default(6),
  // Adam learning rate after the warm-up (EDM CIFAR-10: 1e-3; DDSM: 2e-4; high here for short runs of small nets).
  lr: positive.default(1e-2),
  // Linear learning-rate warm-up in thousands of images (EDM lr_rampup_kimg: 10000).
  lrRampupKimg: nonNeg.default(0.5),
  // Adam's β1 and β2 (EDM: 0.9, 0.999).
  betas: z.tuple([z.number().min(0).lt(1), z.number().min(0).lt(1)]).default([0.9, 0.999]),
  // Adam's ε (EDM: 1e-8).
  eps: nonNeg.default(1e-8),
  // Maximum global L2 norm of the gradients; null: no clipping (EDM: none; DDSM: 1).
  gradClip: positive.nullable().default(null),
  // EMA half-life in thousands of images (EDM ema_halflife_kimg: 500).
  emaHalfLifeKimg: nonNeg.default(0.5),
  // EMA ramp-up: the half-life is at most this fraction of the images seen; null: no ramp-up (EDM: 0.05).
  emaRampupRatio: positive.nullable().default(0.05),
  // Dropout probability in the residual blocks, overriding the network's (EDM CIFAR-10: 0.13).
  dropout: z.number().min(0).max(1).optional(),
  // Mean of ln σ in the training noise distribution (EDM P_mean: −1.2).
  pMean: z.number().finite().default(-1.2),
  // Standard deviation of ln σ (EDM P_std: 1.2).
  pStd: nonNeg.default(1.2),
  // σ_data of the preconditioning and loss weight (EDM: 0.5).
  sigmaData: positive.default(0.5),
  // Seed of the initialisation, the σ/noise/dropout draws, the data order and the sandwich widths.
  seed: z.number().int().min(0).max(0xffffffff).default(0),
  // DDSM sandwich rule: widths 1, 0.25 and one of {0.5, 0.75} per step, gradients summed.
  sandwich: z.boolean().default(false),
  // Read back and log the loss every this many steps (the only host sync of a step).
  logEvery: z.number().int().positive().default(10),
  // Save a checkpoint every this many thousand images (0: only at the end).
  checkpointKimg: nonNeg.default(1),
  // Checkpoints kept in the run directory (older ones are deleted).
  keepCheckpoints: z.number().int().positive().default(2),
  // Write an EMA sample grid every this many thousand images (0: only at the start and the end).
  sampleKimg: nonNeg.default(0),
  // Images per sample grid (0: no grids).
  sampleCount: z.number().int().nonnegative().default(64),
  // Heun steps of the sample grids (EDM: 18, NFE 35).
  sampleSteps: z.number().int().min(2).default(18),
  // The run directory: checkpoints, log.jsonl, sample grids; a directory with a checkpoint is resumed.
  out: z.string().min(1).default("runs/default"),
  // Device: WebGPU or the CPU reference kernels.
  backend: z.enum(["webgpu", "cpu"]).default("webgpu"),
}).strict();
export type TrainConfigInput = z.input<typeof TrainConfigSchema>;

/** A resolved configuration: the network as a full spec and the data source filled in. */
export type TrainConfig = Omit<z.output<typeof TrainConfigSchema>, "network" | "data"> & {
  network: UNetSpec;
  data: z.output<typeof DataConfig>;
};

/** Options that may change when a run is resumed; all others must match the run's. */
const RESUMABLE_CHANGES = new Set([
  "kimg",
  "logEvery",
  "checkpointKimg",
  "keepCheckpoints",
  "sampleKimg",
  "sampleCount",
  "sampleSteps",
  "out",
  "backend",
]);

async function resolveNetwork(network: string | Record<string, unknown>): Promise<UNetSpec> {
  let spec: unknown = network;
  if (typeof network === "string") {
    const preset = PRESETS[network];
    if (preset) return preset();
    if (!network.endsWith(".json")) {
      throw new UsageError(
        `network: "${network}" is neither a preset (${Object.keys(PRESETS).join(", ")}) nor a .json file`,
      );
    }
    spec = await readJsonFile(network);
  }
  try {
    return parseUNetSpec(spec);
  } catch (e) {
    throw new UsageError(`network: ${(e as Error).message}`);
  }
}

/** Validates a training configuration and fills in the network spec and the data source. */
export async function parseTrainConfig(input: unknown): Promise<TrainConfig> {
  const o = parseOrThrow(TrainConfigSchema, input, "train config");
  const network = await resolveNetwork(o.network);
  const data = o.data ??
    parseOrThrow(DataConfig, { kind: "procedural", resolution: network.imgResolution }, "data");
  return { ...o, network, data };
}

/** The network spec training uses: the configured one with the dropout override applied. */
export function networkSpec(cfg: TrainConfig): UNetSpec {
  return cfg.dropout === undefined ? cfg.network : parseUNetSpec({ ...cfg.network, dropout: cfg.dropout });
}

/** EDM's learning-rate ramp-up: lr·min(nimg / (lrRampupKimg·1000), 1), nimg counted before the step. */
export function learningRate(cfg: Pick<TrainConfig, "lr" | "lrRampupKimg">, nimg: number): number {
  return cfg.lr * Math.min(nimg / Math.max(cfg.lrRampupKimg * 1000, 1e-8), 1);
}

/** EDM's EMA β for the step taken after `nimg` images (half-life ramped up by `emaRampupRatio`). */
export function emaBeta(cfg: TrainConfig, nimg: number): number {
  return emaBetaFromHalfLife(
    cfg.batch,
    cfg.emaHalfLifeKimg,
    cfg.emaRampupRatio === null ? {} : { curNimg: nimg, rampupRatio: cfg.emaRampupRatio },
  );
}

/**
 * The widths of step `step` under DDSM's sandwich rule: the largest (1), the smallest (0.25) and one middle
 * width drawn uniformly from {0.75, 0.5} (DDSM main.py: `random.choice(candidate_width)`), here from a hash of
 * (seed, step) so that a resumed run draws the same.
 */
export function sandwichWidths(seed: number, step: number): number[] {
  const middle = [DDSM_WIDTHS[1], DDSM_WIDTHS[2]];
  const pick = new Rng(hash2(seed ^ 0x5a4d5749, step)).int(middle.length);
  return [DDSM_WIDTHS[0], DDSM_WIDTHS[DDSM_WIDTHS.length - 1], middle[pick]];
}

/** Loss options for `accumulateGradients`. */
export interface LossOptions {
  pMean?: number;
  pStd?: number;
  sigmaData?: number;
}

/**
 * Back-propagates the EDM loss of `images` at each width into the parameters' `.grad` (which accumulate: the
 * gradients of the widths add up, DDSM's sandwich rule). Each width draws its own σ and noise. Returns, for the
 * log, one detached tensor [widths·2·B]: per width the B per-sample losses, then the B noise levels.
 */
export function accumulateGradients(
  net: UNet,
  images: Tensor,
  labels: Tensor | undefined,
  widths: readonly number[],
  loss: LossOptions = {},
): Tensor {
  return scope(() => {
    const parts: Tensor[] = [];
    for (const width of widths) {
      const precond = new EDMPrecond(
        (x, c, l) => net.forward(x, c, l ?? null, { width }),
        { sigmaData: loss.sigmaData ?? 0.5 },
      );
      const r = edmLoss(precond, images, labels, { pMean: loss.pMean, pStd: loss.pStd });
      r.loss.backward();
      parts.push(r.perSample, r.sigma);
    }
    return noGrad(() => cat(parts.map((p) => reshape(p, [p.size]))));
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Progress and logs.

/** The loss of one width in a log window. */
export interface WidthLoss {
  width: number;
  loss: number;
  count: number;
}

/** One log line: the mean over the steps since the previous one. */
export interface LogEntry {
  /** Optimizer steps taken. */
  step: number;
  /** Images seen. */
  nimg: number;
  /** Mean loss at full width over the window. */
  loss: number;
  /** With the sandwich rule: the mean loss of every width trained in the window. */
  lossByWidth?: WidthLoss[];
  /** Full-width loss by σ-bucket over the window. */
  buckets: SigmaBucket[];
  /** Training images per second over the window (sampling and checkpointing excluded). */
  imgPerSec: number;
  /** The learning rate of the window's last step. */
  lr: number;
  /** Seconds of training so far. */
  trainSeconds: number;
}

/** What `train` reports as it goes. */
export type TrainEvent =
  | {
    type: "start";
    runDir: string;
    resumedFrom: string | null;
    step: number;
    nimg: number;
    totalNimg: number;
    parameters: number;
    config: TrainConfig;
    device: string;
  }
  | { type: "step"; step: number; nimg: number; totalNimg: number }
  | { type: "log"; entry: LogEntry }
  | { type: "checkpoint"; dir: string; step: number; nimg: number }
  | { type: "sample"; path: string; step: number; nimg: number; width: number; seconds: number };

/** The outcome of `train`. */
export interface TrainResult {
  runDir: string;
  step: number;
  nimg: number;
  /** "done": reached kimg; "aborted": stopped by the signal (a checkpoint was saved). */
  stoppedBy: "done" | "aborted";
  /** The newest checkpoint. */
  checkpoint: string | null;
  /** The last logged loss (NaN if none was logged in this session). */
  lastLoss: number;
  lossHistory: LossPoint[];
}

/** `σ ∈ [lo, hi)` for a bucket. */
function bucketLabel(b: SigmaBucket): string {
  const f = (v: number) => (Number.isFinite(v) ? String(v) : v > 0 ? "∞" : "0");
  return `[${f(b.lo)}, ${f(b.hi)})`;
}

/** One line for a log entry: step, kimg, loss (per width with the sandwich rule), img/s, lr. */
export function formatLogEntry(e: LogEntry): string {
  const widths = e.lossByWidth?.map((w) => `w${w.width} ${w.loss.toFixed(4)}`).join(" ");
  return [
    `step ${String(e.step).padStart(6)}`,
    `kimg ${(e.nimg / 1000).toFixed(2).padStart(8)}`,
    `loss ${e.loss.toFixed(4)}`,
    widths ? `(${widths})` : "",
    `${e.imgPerSec.toFixed(1)} img/s`,
    `lr ${e.lr.toExponential(2)}`,
  ].filter(Boolean).join("  ");
}

/** The σ-bucket losses as a small table (empty buckets left out). */
export function formatBucketTable(buckets: readonly SigmaBucket[]): string {
  const rows = buckets.filter((b) => b.count > 0).map((b) =>
    `  σ ∈ ${bucketLabel(b).padEnd(14)} n ${String(b.count).padStart(5)}  loss ${b.meanLoss.toFixed(4)}`
  );
  return rows.join("\n");
}

// ---------------------------------------------------------------------------------------------------------------
// Training.

/** Options of `train` that are not configuration. */
export interface TrainOptions {
  onProgress?: (e: TrainEvent) => void;
  /** Stops after the current step; a checkpoint is saved first. */
  signal?: AbortSignal;
  /** Train on this device instead of creating one from `backend` (its generator is re-seeded). */
  device?: Device;
}

/**
 * Builds the network of `cfg` on `device` from a freshly seeded generator (the initialisation of step 0), and
 * the network that holds the EMA weights for sampling. The generator is left where training starts.
 */
export function buildNetworks(cfg: TrainConfig, device: Device): { net: UNet; emaNet: UNet } {
  device.manualSeed(cfg.seed);
  const spec = networkSpec(cfg);
  const net = new UNet(spec, { device }).train();
  const emaNet = new UNet(spec, { device }).eval();
  return { net, emaNet };
}

/** The fields of `input` that would change a run trained with `stored`, and how. */
function incompatibleFields(
  stored: TrainConfig,
  merged: TrainConfig,
  input: Record<string, unknown>,
): string[] {
  const out: string[] = [];
  for (const key of Object.keys(input)) {
    if (RESUMABLE_CHANGES.has(key)) continue;
    const a = JSON.stringify((stored as Record<string, unknown>)[key]);
    const b = JSON.stringify((merged as Record<string, unknown>)[key]);
    if (a !== b) out.push(`${key} (the run has ${a}, asked for ${b})`);
  }
  return out;
}

/** Images per batch at the network's resolution, with labels when the network is class-conditional. */
function checkData(cfg: TrainConfig, ds: Dataset) {
  const s = cfg.network;
  if (ds.channels !== s.inChannels || ds.height !== s.imgResolution || ds.width !== s.imgResolution) {
    throw new UsageError(
      `data: ${ds.name} has ${ds.channels}×${ds.height}×${ds.width} images, the network takes ` +
        `${s.inChannels}×${s.imgResolution}×${s.imgResolution}`,
    );
  }
  if (s.labelDim > 0 && ds.numClasses !== s.labelDim) {
    throw new UsageError(
      `data: the network is conditioned on ${s.labelDim} classes, ${ds.name} has ${
        ds.numClasses || "no"
      } labels`,
    );
  }
}

/**
 * Trains (or resumes) the run in `config.out`. Returns when `kimg` thousand images have been seen or the signal
 * stopped it; throws `NonFiniteLossError` when the loss or the weights stop being finite (the newest checkpoint is
 * the last good one) and `UsageError` for a bad configuration.
 */
export async function train(
  input: TrainConfigInput | Record<string, unknown>,
  opts: TrainOptions = {},
): Promise<
  TrainResult
> {
  // Options left undefined (e.g. CLI flags not given) are absent, not "reset to the default".
  const raw = Object.fromEntries(
    Object.entries((input ?? {}) as Record<string, unknown>).filter(([, v]) => v !== undefined),
  );
  let cfg = await parseTrainConfig(raw);
  const runDir = cfg.out;
  await removeStaleTemporaries(runDir);
  const resumeDir = await latestCheckpoint(runDir);
  const state = resumeDir ? await readTrainState(resumeDir) : null;
  if (state) {
    const stored = await parseTrainConfig(state.config);
    const merged = await parseTrainConfig({ ...state.config, ...raw, out: runDir });
    const bad = incompatibleFields(stored, merged, raw);
    if (bad.length) {
      throw new UsageError(
        `${runDir} holds a run with other settings: ${bad.join("; ")}. Use another --out to start a new run.`,
      );
    }
    cfg = merged;
  }
  const totalNimg = Math.round(cfg.kimg * 1000);
  const dataset = await openDataset(cfg.data);
  checkData(cfg, dataset);
  const device = opts.device ?? await Device.create({ backend: cfg.backend });
  const ownDevice = !opts.device;
  const emit = opts.onProgress ?? (() => {});

  const { net, emaNet } = buildNetworks(cfg, device);
  const optimizer = new optim.Adam(net, { lr: cfg.lr, betas: cfg.betas, eps: cfg.eps });
  const ema = new optim.EMA(net);
  const release = () => {
    optimizer.dispose();
    ema.dispose();
    net.dispose();
    emaNet.dispose();
    if (ownDevice) device.destroy();
  };
  // Per-step log tensors waiting for the next readback, with the widths each step used.
  let pending: { step: number; nimg: number; widths: number[]; t: Tensor }[] = [];
  let stoppedBy: TrainResult["stoppedBy"] = "done";
  try {
    let step = 0, nimg = 0, trainSeconds = 0, position = 0;
    let lossHistory: LossPoint[] = [];
    if (resumeDir && state) {
      let ck: LoadedCheckpoint | null = null;
      try {
        ck = await loadCheckpoint(resumeDir, device);
        net.loadStateDict(ck.model);
        ema.loadStateDict(ck.ema);
        optimizer.loadStateDict(ck.optimizer);
      } catch (e) {
        throw new Error(`cannot resume from ${resumeDir}: ${(e as Error).message}`);
      } finally {
        if (ck) disposeCheckpoint(ck);
      }
      device.rng.seed = state.rng.seed;
      device.rng.counter = state.rng.counter;
      ({ step, nimg, trainSeconds } = state);
      position = state.data.position;
      lossHistory = state.lossHistory;
    }
    // The sampling network starts as an exact copy: parameters (then replaced by the EMA) and buffers.
    emaNet.loadStateDict(net.stateDict());
    const startStep = step;
    const iterator = new BatchIterator(dataset, { batchSize: cfg.batch, seed: cfg.seed, position, device });

    await Deno.mkdir(`${runDir}/samples`, { recursive: true });
    await writeTextAtomic(`${runDir}/config.json`, JSON.stringify(cfg, null, 1) + "\n");
    const logPath = `${runDir}/log.jsonl`;
    await truncateLog(logPath, step);

    emit({
      type: "start",
      runDir,
      resumedFrom: resumeDir,
      step,
      nimg,
      totalNimg,
      parameters: net.parameterCount(),
      config: cfg,
      device: `${device.info.adapter} (${device.kind})`,
    });

    let windowStart = performance.now(), windowNimg = nimg, windowSeconds = trainSeconds;
    let lastLoss = NaN;
    let lastCheckpoint = resumeDir;
    const B = cfg.batch;

    /** The error for a loss or weights that stopped being finite. */
    const diverged = (what: string, at: number) => {
      const good = lastCheckpoint ?? "(none)";
      return new NonFiniteLossError(
        `training diverged: ${what}; the last good checkpoint is ${good}. ` +
          `Lower the learning rate (lr ${cfg.lr}) or clip the gradients (gradClip).`,
        at,
      );
    };

    /** Reads the pending losses (one sync), checks them, logs them. */
    const flushLog = async () => {
      if (!pending.length) return;
      const all = noGrad(() => (pending.length === 1 ? pending[0].t : cat(pending.map((p) => p.t))));
      const host = await all.toArray();
      if (all !== pending[0].t) all.dispose();
      const rows = pending;
      pending = [];
      rows.forEach((r) => r.t.dispose());
      const now = performance.now();
      trainSeconds = windowSeconds + (now - windowStart) / 1000;
      const sigmas: number[] = [], losses: number[] = [];
      const byWidth = new Map<number, { sum: number; count: number }>();
      let at = 0;
      for (const r of rows) {
        for (const width of r.widths) {
          const per = host.subarray(at, at + B), sig = host.subarray(at + B, at + 2 * B);
          at += 2 * B;
          for (let i = 0; i < B; i++) {
            if (!Number.isFinite(per[i])) {
              throw diverged(
                `the loss at step ${r.step} (${r.nimg} images, width ${width}) is ${per[i]}`,
                r.step,
              );
            }
          }
          let s = 0;
          for (let i = 0; i < B; i++) s += per[i];
          const w = byWidth.get(width) ?? { sum: 0, count: 0 };
          w.sum += s;
          w.count += B;
          byWidth.set(width, w);
          if (width === 1) {
            losses.push(...per);
            sigmas.push(...sig);
          }
        }
      }
      const full = byWidth.get(1)!;
      const last = rows[rows.length - 1];
      const entry: LogEntry = {
        step: last.step,
        nimg: last.nimg,
        loss: full.sum / full.count,
        buckets: lossBySigmaBucket(sigmas, losses, DEFAULT_SIGMA_EDGES),
        imgPerSec: (last.nimg - windowNimg) / Math.max((now - windowStart) / 1000, 1e-9),
        lr: optimizer.lr,
        trainSeconds,
      };
      if (cfg.sandwich) {
        entry.lossByWidth = [...byWidth].sort((a, b) => b[0] - a[0]).map(([width, v]) => ({
          width,
          loss: v.sum / v.count,
          count: v.count,
        }));
      }
      lastLoss = entry.loss;
      lossHistory.push({ step: entry.step, nimg: entry.nimg, loss: entry.loss });
      await Deno.writeTextFile(logPath, JSON.stringify(entry) + "\n", { append: true });
      emit({ type: "log", entry });
      windowStart = performance.now();
      windowNimg = last.nimg;
      windowSeconds = trainSeconds;
    };

    /** Pauses the training clock around maintenance (checkpoints, grids). */
    const maintenance = async (fn: () => Promise<void>) => {
      const t0 = performance.now();
      await fn();
      windowStart += performance.now() - t0;
    };

    const checkpoint = async () => {
      await flushLog();
      await maintenance(async () => {
        try {
          lastCheckpoint = await saveCheckpoint(runDir, {
            model: net.stateDict(),
            ema: ema.stateDict(),
            optimizer: optimizer.stateDict(),
            state: {
              step,
              nimg,
              data: { position: iterator.position, epoch: iterator.epoch },
              rng: { seed: device.rng.seed, counter: device.rng.counter },
              lossHistory,
              trainSeconds,
              config: JSON.parse(JSON.stringify(cfg)),
            },
          }, { keep: cfg.keepCheckpoints });
        } catch (e) {
          if (e instanceof NonFiniteCheckpointError) {
            throw diverged(`the weights after step ${step} are not finite (${e.message})`, step);
          }
          throw e;
        }
        emit({ type: "checkpoint", dir: lastCheckpoint!, step, nimg });
      });
    };

    const grid = () =>
      maintenance(async () => {
        if (!cfg.sampleCount) return;
        ema.copyTo(emaNet);
        const widths = cfg.sandwich ? [1, DDSM_WIDTHS[DDSM_WIDTHS.length - 1]] : [1];
        for (const width of widths) {
          const t0 = performance.now();
          const name = `${checkpointName(step)}${width === 1 ? "" : `-w${width}`}.png`;
          const path = `${runDir}/samples/${name}`;
          await sampleGrid(emaNet, path, {
            n: cfg.sampleCount,
            steps: cfg.sampleSteps,
            seed: cfg.seed,
            width,
            sigmaData: cfg.sigmaData,
          });
          emit({ type: "sample", path, step, nimg, width, seconds: (performance.now() - t0) / 1000 });
        }
      });

    const every = (kimg: number, before: number, after: number) =>
      kimg > 0 && Math.floor(after / (kimg * 1000)) > Math.floor(before / (kimg * 1000));

    // The loop (EDM training_loop.py), with a grid of the initial network first.
    if (!resumeDir) await grid();
    windowStart = performance.now();
    while (nimg < totalNimg) {
      if (opts.signal?.aborted) {
        stoppedBy = "aborted";
        break;
      }
      // One optimizer step (EDM training_loop.py: accumulate, ramp lr, step, update the EMA).
      const widths = cfg.sandwich ? sandwichWidths(cfg.seed, step) : [1];
      optimizer.lr = learningRate(cfg, nimg);
      const beta = emaBeta(cfg, nimg);
      const batch = iterator.next();
      const labels = cfg.network.labelDim > 0 ? batch.labels : undefined;
      const logT = scope(() => {
        const t = accumulateGradients(net, batch.images, labels, widths, cfg);
        const coef = cfg.gradClip === null ? undefined : optim.gradClipCoefficient(net, cfg.gradClip).coef;
        optimizer.step({ gradScale: coef });
        optimizer.zeroGrad();
        ema.update(beta);
        return t;
      });
      batch.images.dispose();
      batch.labels?.dispose();
      const before = nimg;
      step++;
      nimg += B;
      pending.push({ step, nimg, widths, t: logT });
      emit({ type: "step", step, nimg, totalNimg });
      if (step % cfg.logEvery === 0) await flushLog();
      if (every(cfg.checkpointKimg, before, nimg) && nimg < totalNimg) await checkpoint();
      if (every(cfg.sampleKimg, before, nimg) && nimg < totalNimg) await grid();
    }
    await flushLog();
    if (lastCheckpoint !== `${checkpointsDir(runDir)}/${checkpointName(step)}`) await checkpoint();
    if (stoppedBy === "done" && step > startStep) await grid();
    return { runDir, step, nimg, stoppedBy, checkpoint: lastCheckpoint, lastLoss, lossHistory };
  } finally {
    for (const p of pending) p.t.dispose();
    release();
  }
}

/** Drops log lines after `step` (written after the checkpoint a run resumes from). */
async function truncateLog(path: string, step: number) {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch {
    return;
  }
  const keep = text.split("\n").filter((line) => {
    if (!line.trim()) return false;
    try {
      return (JSON.parse(line) as { step: number }).step <= step;
    } catch {
      return false;
    }
  });
  await writeTextAtomic(path, keep.map((l) => l + "\n").join(""));
}

// ---------------------------------------------------------------------------------------------------------------
// Sampling.

/** Options of the sample grids `train` writes. */
interface GridOptions {
  n: number;
  steps: number;
  seed: number;
  width: number;
  sigmaData: number;
}

/** Heun-samples `n` images from `net` with latents from their own seeded stream and writes them as a PNG grid. */
async function sampleGrid(net: UNet, path: string, o: GridOptions): Promise<void> {
  const device = net.device, s = net.spec;
  const latents = randn([o.n, s.inChannels, s.imgResolution, s.imgResolution], { device, seed: o.seed });
  const labels = classLabels(0, o.n, s.labelDim, device);
  const precond = new EDMPrecond((x, c, l) => net.forward(x, c, l ?? null, { width: o.width }), {
    sigmaData: o.sigmaData,
  });
  const x = heunSampler(precond.denoiser(labels), latents, { steps: o.steps });
  latents.dispose();
  labels?.dispose();
  try {
    await saveImageGrid(path, x);
  } finally {
    x.dispose();
  }
}

/** Options of `sample` (`deno task sample`): the sampler settings plus what to sample and where to write it. */
export const SampleConfigSchema = SamplerSettingsSchema.extend({
  // The run directory to sample from (its newest checkpoint).
  run: z.string().min(1),
  // A checkpoint folder to use instead of the run's newest.
  checkpoint: z.string().min(1).optional(),
  // Number of images.
  n: z.number().int().positive().default(64),
  // Sample with the EMA weights (as EDM does) rather than the raw network weights.
  ema: z.boolean().default(true),
  // DDSM width multiplier to run the network at.
  width: z.number().gt(0).lte(1).default(1),
  // Seed of the latents and of Algorithm 2's noise.
  seed: z.number().int().min(0).max(0xffffffff).default(0),
  // Images per network batch (default: all n at once).
  batch: z.number().int().positive().optional(),
  // Class of every image for a class-conditional network (default: the classes in turn).
  classLabel: z.number().int().nonnegative().optional(),
  // The PNG grid to write (default: <run>/samples/sample-<checkpoint>.png).
  out: z.string().min(1).optional(),
  // Also write the raw samples [n, C, H, W] in [−1, 1] to this .safetensors file.
  raw: z.string().min(1).optional(),
  // Images per row of the grid (default ⌈√n⌉).
  cols: z.number().int().positive().optional(),
  // Device: WebGPU or the CPU reference kernels.
  backend: z.enum(["webgpu", "cpu"]).default("webgpu"),
}).strict();
export type SampleConfigInput = z.input<typeof SampleConfigSchema>;

/** The outcome of `sample`. */
export interface SampleResult {
  /** The PNG grid written. */
  path: string;
  /** The raw samples' file, if asked for. */
  rawPath?: string;
  /** The checkpoint sampled from and its step. */
  checkpoint: string;
  step: number;
  shape: number[];
  /** Network evaluations per image. */
  nfe: number;
  seconds: number;
}

/**
 * Loads a checkpoint (EMA weights by default), runs the chosen EDM sampler for `n` images and writes a PNG grid
 * (and optionally the raw samples). Latents are drawn at once from the seeded device generator, so the images do
 * not depend on `batch`.
 */
export async function sample(
  input: SampleConfigInput | Record<string, unknown>,
  opts: { device?: Device; onStep?: (info: StepInfo & { batch: number; batches: number }) => void } = {},
): Promise<SampleResult> {
  const o = parseOrThrow(SampleConfigSchema, input, "sample config");
  try {
    if (!(await Deno.stat(o.run)).isDirectory) throw new Error();
  } catch {
    throw new UsageError(`run directory ${o.run} does not exist`);
  }
  const dir = o.checkpoint ?? await latestCheckpoint(o.run);
  if (!dir) throw new UsageError(`${o.run} has no checkpoint yet (${o.run}/checkpoints/step-*/ is missing)`);
  const state = await readTrainState(dir);
  const cfg = await parseTrainConfig(state.config);
  const spec = networkSpec(cfg);
  if (o.classLabel !== undefined && o.classLabel >= spec.labelDim) {
    throw new UsageError(
      `classLabel: ${o.classLabel} is not a class of this ${
        spec.labelDim ? `${spec.labelDim}-class` : "unconditional"
      } network`,
    );
  }
  const device = opts.device ?? await Device.create({ backend: o.backend });
  const t0 = performance.now();
  let gen: CheckpointGenerator | undefined;
  try {
    gen = await CheckpointGenerator.open(dir, spec, {
      device,
      ema: o.ema,
      width: o.width,
      sigmaData: cfg.sigmaData,
    });
    const [C, R] = [spec.inChannels, spec.imgResolution], per = C * R * R;
    const batch = o.batch ?? o.n, batches = Math.ceil(o.n / batch);
    const host = new Float32Array(o.n * per);
    let nfe = 0;
    for (let b = 0; b < batches; b++) {
      const start = b * batch, len = Math.min(batch, o.n - start);
      const x = gen.generate(start, len, {
        seed: o.seed,
        settings: o,
        classLabel: o.classLabel,
        onStep: (info) => {
          nfe = info.nfe;
          opts.onStep?.({ ...info, batch: b, batches });
        },
      });
      host.set(await x.toArray(), start * per);
      x.dispose();
    }
    const shape = [o.n, C, R, R];
    const path = o.out ?? `${o.run}/samples/sample-${dir.split("/").pop()}.png`;
    await Deno.mkdir(path.split("/").slice(0, -1).join("/") || ".", { recursive: true });
    await saveImageGrid(path, { data: host, shape }, { cols: o.cols });
    let rawPath: string | undefined;
    if (o.raw) {
      rawPath = o.raw;
      const bytes = encodeSafetensors({ samples: { shape, data: host } }, {
        checkpoint: dir,
        sampler: o.sampler,
        steps: String(o.steps),
        seed: String(o.seed),
      });
      await writeFileAtomic(rawPath, bytes);
    }
    return {
      path,
      rawPath,
      checkpoint: dir,
      step: state.step,
      shape,
      nfe,
      seconds: (performance.now() - t0) / 1000,
    };
  } finally {
    gen?.dispose();
    if (!opts.device) device.destroy();
  }
}
