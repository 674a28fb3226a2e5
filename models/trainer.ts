/**
 * @file Training in memory: EDM training (Karras et al. 2022; NVlabs/edm `training/training_loop.py`) of any
 * `UNetSpec`, optionally as a DDSM slimmable supernet with the sandwich rule (Yang et al. 2023; the authors'
 * `main.py`). A `Trainer` owns the network, its EMA, the optimizer and the data stream, and touches no file:
 * `deno task train` puts a run folder on top of it (models/train.ts), the architecture search trains dozens of
 * candidates with it briefly and scores their EMA networks.
 *
 * One optimizer step (`step()`), as in EDM's loop:
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
 * Nothing is read back in a step. Each step leaves its per-sample losses and σ as one small device tensor;
 * `flushLog()` concatenates the waiting ones and reads them in one sync (every `logEvery` steps in `run()`),
 * which gives a `LogEntry` (the loss, the loss per σ-bucket and per width) and a NaN/Inf check that names the
 * first bad step (`NonFiniteLossError`).
 *
 * Determinism: every random draw (initialisation, σ, noise, dropout) comes from the device's Philox generator,
 * the data order from (seed, epoch), the sandwich's middle width from (seed, step). The trainer keeps its own
 * copy of the generator's key and counter and puts it on the device for each step, so sampling or another
 * trainer on the same device between steps does not disturb it; `stateDict()` holds that key and counter and
 * the data position, so a trainer restored with `loadState` computes the same numbers as one that never stopped
 * (bit-identical on the CPU backend).
 *
 * The training clock (`trainSeconds`, images per second) runs during steps, loss readbacks and `run()`, and
 * stops while `run()`'s asynchronous callbacks (log writing, checkpoints, sample grids) run.
 */

import { z } from "zod";
import { cat, type Device, noGrad, optim, reshape, scope, type Tensor } from "../engine/mod.ts";
import { parseUNetSpec, UNet, type UNetSpec, type UNetSpecInput } from "./unet.ts";
import { DEFAULT_SIGMA_EDGES, edmLoss, EDMPrecond, lossBySigmaBucket, type SigmaBucket } from "./edm.ts";
import { BatchIterator, DataConfig, type Dataset, openDataset, PROCEDURAL_RESOLUTIONS } from "./data.ts";
import { DDSM_WIDTHS } from "./slimmable.ts";
import type { LossPoint } from "./checkpoint.ts";
import { parseConfig } from "../util/config.ts";
import { UsageError } from "../util/errors.ts";
import { emaBetaFromHalfLife } from "./ema.ts";
import { hash2, Rng } from "../util/random.ts";

// ---------------------------------------------------------------------------------------------------------------
// Configuration.

const positive = z.number().positive().finite();
const nonNeg = z.number().nonnegative().finite();

/** The training options a `Trainer` uses; models/train.ts adds the run folder's to them. */
export const TRAINING_FIELDS = {
  // Training images (models/data.ts; default: the embedded procedural shapes at the network's resolution).
  data: DataConfig.optional(),
  // Images per optimizer step (EDM CIFAR-10: 512; DDSM: 128).
  batch: z.number().int().positive().default(32),
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
};

/** Options of a `Trainer`: the network spec and the training options. */
export const TrainerConfigSchema = z.object({
  // The network: a UNetSpec (models/unet.ts), defaults may be left out.
  network: z.record(z.string(), z.unknown()),
  ...TRAINING_FIELDS,
}).strict();
export type TrainerConfigInput = Omit<z.input<typeof TrainerConfigSchema>, "network"> & {
  network: UNetSpecInput;
};

/** A validated trainer configuration: the network as a full spec and the data source filled in. */
export type TrainerConfig = Omit<z.output<typeof TrainerConfigSchema>, "network" | "data"> & {
  network: UNetSpec;
  data: z.output<typeof DataConfig>;
};

/** The default data of a network: the procedural shapes at its resolution. */
export function defaultData(network: UNetSpec): z.output<typeof DataConfig> {
  const r = network.imgResolution, { min, max } = PROCEDURAL_RESOLUTIONS;
  if (!Number.isInteger(r) || r < min || r > max) {
    // The user set the network's size, not the data's: name the field they wrote.
    throw new Error(
      `network: imgResolution ${r} has no default data: the procedural shapes are drawn at ${min} to ${max} ` +
        `pixels; give data of that size (data: {"kind": "png", "path": DIR})`,
    );
  }
  return DataConfig.parse({ kind: "procedural", resolution: r });
}

/** Validates a trainer configuration (a program's, so a failure is a plain `Error` naming every bad field). */
export function parseTrainerConfig(input: TrainerConfigInput | Record<string, unknown>): TrainerConfig {
  const o = parseConfig(TrainerConfigSchema, input, "trainer config");
  let network: UNetSpec;
  try {
    network = parseUNetSpec(o.network);
  } catch (e) {
    throw new Error(`trainer config: network: ${(e as Error).message}`);
  }
  return { ...o, network, data: o.data ?? defaultData(network) };
}

/** The network spec training uses: the configured one with the dropout override applied. */
export function networkSpec(cfg: Pick<TrainerConfig, "network" | "dropout">): UNetSpec {
  return cfg.dropout === undefined ? cfg.network : parseUNetSpec({ ...cfg.network, dropout: cfg.dropout });
}

/** EDM's learning-rate ramp-up: lr·min(nimg / (lrRampupKimg·1000), 1), nimg counted before the step. */
export function learningRate(cfg: Pick<TrainerConfig, "lr" | "lrRampupKimg">, nimg: number): number {
  return cfg.lr * Math.min(nimg / Math.max(cfg.lrRampupKimg * 1000, 1e-8), 1);
}

/** EDM's EMA β for the step taken after `nimg` images (half-life ramped up by `emaRampupRatio`). */
export function emaBeta(
  cfg: Pick<TrainerConfig, "batch" | "emaHalfLifeKimg" | "emaRampupRatio">,
  nimg: number,
): number {
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

/**
 * Builds the network of `cfg` on `device` from a freshly seeded generator (the initialisation of step 0), and
 * the network that holds the EMA weights for sampling. The generator is left where training starts.
 */
export function buildNetworks(
  cfg: Pick<TrainerConfig, "network" | "dropout" | "seed">,
  device: Device,
): { net: UNet; emaNet: UNet } {
  device.manualSeed(cfg.seed);
  const spec = networkSpec(cfg);
  const net = new UNet(spec, { device }).train();
  const emaNet = new UNet(spec, { device }).eval();
  return { net, emaNet };
}

/** Throws a `UsageError` unless `ds` has images of the network's shape, with labels if it is conditional. */
export function checkData(cfg: Pick<TrainerConfig, "network">, ds: Dataset): void {
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

// ---------------------------------------------------------------------------------------------------------------
// Logs.

/** The logged loss (or a weight) became NaN or ±Inf. */
export class NonFiniteLossError extends Error {
  override name = "NonFiniteLossError";
  /**
   * @param step the first bad step
   * @param what the bare fact ("the loss at step 7 (28 images, width 1) is NaN"), for callers that rephrase
   */
  constructor(message: string, readonly step: number, readonly what: string = message) {
    super(message);
  }
}

/**
 * The error for a loss or weights that stopped being finite at `step`, with the advice; `lastGood` (a run
 * folder's newest checkpoint, null for none) is named when given.
 */
export function divergedError(
  what: string,
  step: number,
  lr: number,
  lastGood?: string | null,
): NonFiniteLossError {
  const good = lastGood === undefined ? "" : `; the last good checkpoint is ${lastGood ?? "(none)"}`;
  return new NonFiniteLossError(
    `training diverged: ${what}${good}. Lower the learning rate (lr ${lr}) or clip the gradients (gradClip); ` +
      `both may be changed when the run resumes from that checkpoint (--lr, --grad-clip).`,
    step,
    what,
  );
}

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
// The trainer.

/** Where training stands, apart from the tensors: what a checkpoint's state.json holds besides the config. */
export interface TrainerProgress {
  /** Optimizer steps taken. */
  step: number;
  /** Training images seen (EDM's cur_nimg). */
  nimg: number;
  /** The batch iterator: images consumed (its resume point) and the epoch of the next image. */
  data: { position: number; epoch: number };
  /** The trainer's Philox key and next unused counter. */
  rng: { seed: number; counter: number };
  /** The logged losses so far. */
  lossHistory: LossPoint[];
  /** Seconds spent training (in steps, their readbacks and `run()`, not in its callbacks) so far. */
  trainSeconds: number;
}

/** Everything a trainer needs to continue exactly; the tensors are live references (read, do not dispose). */
export interface TrainerState {
  /** The network's state dict (parameters and buffers). */
  model: Record<string, Tensor>;
  /** The EMA averages by parameter name. */
  ema: Record<string, Tensor>;
  /** Adam's state. */
  optimizer: optim.OptimizerState;
  progress: TrainerProgress;
}

/** Where a trainer is after a step (host numbers, no sync). */
export interface StepProgress {
  step: number;
  nimg: number;
  /** The image count `run()` trains to. */
  untilNimg: number;
}

/** Options of `Trainer.run`: how long (exactly one of `kimg`, `untilNimg`, `steps`) and the callbacks. */
export interface RunOptions {
  /** Train this many thousand images more (rounded to whole images; the last batch may overshoot). */
  kimg?: number;
  /** Train until this many images have been seen in total (resumable runs: the run's length). */
  untilNimg?: number;
  /** Take exactly this many optimizer steps. */
  steps?: number;
  /** Stops before the next step (the losses so far are still read and logged). */
  signal?: AbortSignal;
  /** Right after each step, before its log readback: progress only (synchronous, no sync happens here). */
  onStep?: (p: StepProgress) => void;
  /** Each log entry (every `logEvery` steps and at the end); awaited, with the training clock stopped. */
  onLog?: (entry: LogEntry) => void | Promise<void>;
  /** Asked after each logged entry; true stops training (early pruning), `stoppedBy` is "stopped". */
  shouldStop?: (entry: LogEntry) => boolean;
  /** After each step and its log: maintenance such as checkpoints; awaited, with the training clock stopped. */
  afterStep?: (p: StepProgress) => void | Promise<void>;
}

/** The outcome of `Trainer.run`. */
export interface RunResult {
  step: number;
  nimg: number;
  /** "done": the length was reached; "aborted": by the signal; "stopped": by `shouldStop`. */
  stoppedBy: "done" | "aborted" | "stopped";
  /** Every logged loss of this trainer (including those restored by `loadState`). */
  lossHistory: LossPoint[];
  /** Training seconds in total (including those restored by `loadState`). */
  trainSeconds: number;
  /** Training images per second in this call. */
  imgPerSec: number;
  /** The last logged loss (NaN if none was logged yet). */
  lastLoss: number;
}

/** Options of a `Trainer` besides its configuration. */
export interface TrainerOptions {
  /**
   * Initial weights, applied after the networks are built and before the EMA and the optimizer take them: a
   * state dict of the same network (loaded strictly), or a function that changes `net` in place (weight
   * inheritance from another architecture). Random draws it makes come from the seeded generator.
   */
  init?: Record<string, Tensor> | ((net: UNet) => void);
}

/** A stopwatch that counts only while started (nested stop/start around callbacks). */
class Clock {
  #seconds = 0;
  #since: number | null = null;
  get seconds(): number {
    return this.#seconds + (this.#since === null ? 0 : (performance.now() - this.#since) / 1000);
  }
  set seconds(s: number) {
    this.#seconds = s;
    if (this.#since !== null) this.#since = performance.now();
  }
  /** Starts the clock; true if it was stopped (so the caller that started it stops it). */
  start(): boolean {
    if (this.#since !== null) return false;
    this.#since = performance.now();
    return true;
  }
  stop(): void {
    this.#seconds = this.seconds;
    this.#since = null;
  }
  /** Runs `fn` with the clock stopped (if it was running, it restarts after). */
  async paused<T>(fn: () => T | Promise<T>): Promise<T> {
    const running = this.#since !== null;
    this.stop();
    try {
      return await fn();
    } finally {
      if (running) this.start();
    }
  }
}

/** A step's log tensor waiting for the next readback, with what the step was. */
interface PendingLog {
  step: number;
  nimg: number;
  widths: number[];
  t: Tensor;
}

/**
 * The losses of a log window read back as `host` (per step and width: B per-sample losses, then B σ): per-width
 * sums, the full width's (σ, loss) pairs for the buckets, or the first loss that is not finite.
 */
function windowLosses(rows: readonly PendingLog[], host: Float32Array, B: number) {
  const sigmas: number[] = [], losses: number[] = [];
  const byWidth = new Map<number, { sum: number; count: number }>();
  let at = 0;
  for (const r of rows) {
    for (const width of r.widths) {
      const per = host.subarray(at, at + B), sig = host.subarray(at + B, at + 2 * B);
      at += 2 * B;
      let sum = 0;
      for (let i = 0; i < B; i++) {
        if (!Number.isFinite(per[i])) {
          const what = `the loss at step ${r.step} (${r.nimg} images, width ${width}) is ${per[i]}`;
          return { byWidth, sigmas, losses, bad: { what, step: r.step } };
        }
        sum += per[i];
      }
      const w = byWidth.get(width) ?? { sum: 0, count: 0 };
      w.sum += sum;
      w.count += B;
      byWidth.set(width, w);
      if (width === 1) {
        losses.push(...per);
        sigmas.push(...sig);
      }
    }
  }
  return { byWidth, sigmas, losses, bad: null };
}

/** Trains one network in memory (see the file comment). */
export class Trainer {
  readonly config: TrainerConfig;
  readonly device: Device;
  readonly dataset: Dataset;
  /** The network being trained (live weights; training mode). */
  readonly network: UNet;
  readonly optimizer: optim.Adam;
  readonly ema: optim.EMA;
  readonly #emaNet: UNet;
  #iterator: BatchIterator;
  #rng: { seed: number; counter: number };
  #step = 0;
  #nimg = 0;
  #lossHistory: LossPoint[] = [];
  #lastLoss = NaN;
  #pending: PendingLog[] = [];
  readonly #clock = new Clock();
  /** The log window: images and clock seconds at the previous readback. */
  #window = { nimg: 0, seconds: 0 };

  /** Opens the dataset of `cfg.data` (unless given) and builds a trainer (see the constructor). */
  static async create(
    cfg: TrainerConfig,
    device: Device,
    opts: TrainerOptions & { dataset?: Dataset } = {},
  ): Promise<Trainer> {
    const dataset = opts.dataset ?? await openDataset(cfg.data);
    return new Trainer(cfg, device, dataset, opts);
  }

  /**
   * Builds the networks from the seeded generator (models are reproducible from `cfg.seed`), applies `init`,
   * and starts the EMA at the resulting weights. `dataset` must match the network (`cfg.data` is not read).
   */
  constructor(cfg: TrainerConfig, device: Device, dataset: Dataset, opts: TrainerOptions = {}) {
    checkData(cfg, dataset);
    this.config = cfg;
    this.device = device;
    this.dataset = dataset;
    const { net, emaNet } = buildNetworks(cfg, device);
    try {
      if (typeof opts.init === "function") opts.init(net);
      else if (opts.init) net.loadStateDict(opts.init);
    } catch (e) {
      net.dispose();
      emaNet.dispose();
      throw new Error(`Trainer: init: ${(e as Error).message}`);
    }
    this.network = net;
    this.#emaNet = emaNet;
    this.#rng = { seed: device.rng.seed, counter: device.rng.counter };
    this.optimizer = new optim.Adam(net, { lr: cfg.lr, betas: cfg.betas, eps: cfg.eps });
    this.ema = new optim.EMA(net);
    // The sampling network starts as an exact copy: parameters (later replaced by the EMA) and buffers.
    emaNet.loadStateDict(net.stateDict());
    this.#iterator = this.#batches(0);
  }

  #batches(position: number): BatchIterator {
    const cfg = this.config;
    return new BatchIterator(this.dataset, {
      batchSize: cfg.batch,
      seed: cfg.seed,
      position,
      device: this.device,
    });
  }

  /** Optimizer steps taken. */
  get stepCount(): number {
    return this.#step;
  }
  /** Training images seen. */
  get nimg(): number {
    return this.#nimg;
  }
  /** The logged losses so far (a copy). */
  get lossHistory(): LossPoint[] {
    return [...this.#lossHistory];
  }
  /** The last logged loss (NaN before the first log). */
  get lastLoss(): number {
    return this.#lastLoss;
  }
  /** Seconds spent training (see the file comment). */
  get trainSeconds(): number {
    return this.#clock.seconds;
  }

  /**
   * The network with the current EMA weights (evaluation mode), for sampling and FID. It belongs to the
   * trainer: it is refreshed by the next call and freed by `dispose()`.
   */
  emaNetwork(): UNet {
    this.ema.copyTo(this.#emaNet);
    return this.#emaNet;
  }

  /** One optimizer step (EDM training_loop.py: accumulate, ramp lr, step, update the EMA); reads nothing back. */
  step(): void {
    const cfg = this.config;
    const rng = this.device.rng;
    rng.seed = this.#rng.seed;
    rng.counter = this.#rng.counter;
    const started = this.#clock.start();
    const widths = cfg.sandwich ? sandwichWidths(cfg.seed, this.#step) : [1];
    this.optimizer.lr = learningRate(cfg, this.#nimg);
    const beta = emaBeta(cfg, this.#nimg);
    const batch = this.#iterator.next();
    const labels = cfg.network.labelDim > 0 ? batch.labels : undefined;
    try {
      const logT = scope(() => {
        const t = accumulateGradients(this.network, batch.images, labels, widths, cfg);
        const coef = cfg.gradClip === null
          ? undefined
          : optim.gradClipCoefficient(this.network, cfg.gradClip).coef;
        // Adam and the EMA in the same few multi-tensor dispatches.
        this.optimizer.step({ gradScale: coef, ema: { average: this.ema, beta } });
        this.optimizer.zeroGrad();
        return t;
      });
      this.#step++;
      this.#nimg += cfg.batch;
      this.#pending.push({ step: this.#step, nimg: this.#nimg, widths, t: logT });
    } finally {
      batch.images.dispose();
      batch.labels?.dispose();
      this.#rng = { seed: rng.seed, counter: rng.counter };
      if (started) this.#clock.stop();
    }
  }

  /**
   * Reads the losses of the steps since the last readback (one sync), checks them (`NonFiniteLossError` names
   * the first bad step) and returns their log entry, or null when no step is waiting.
   */
  async flushLog(): Promise<LogEntry | null> {
    const pending = this.#pending;
    if (!pending.length) return null;
    this.#pending = [];
    const all = noGrad(() => (pending.length === 1 ? pending[0].t : cat(pending.map((p) => p.t))));
    // The readback waits for the steps' device work: training time, even when a checkpoint asks for it.
    const started = this.#clock.start();
    let host: Float32Array;
    try {
      host = await all.toArray();
    } finally {
      if (started) this.#clock.stop();
      if (all !== pending[0].t) all.dispose();
      pending.forEach((r) => r.t.dispose());
    }
    const trainSeconds = this.#clock.seconds;
    const { byWidth, sigmas, losses, bad } = windowLosses(pending, host, this.config.batch);
    if (bad) throw divergedError(bad.what, bad.step, this.config.lr);
    const full = byWidth.get(1)!;
    const last = pending[pending.length - 1];
    const entry: LogEntry = {
      step: last.step,
      nimg: last.nimg,
      loss: full.sum / full.count,
      buckets: lossBySigmaBucket(sigmas, losses, DEFAULT_SIGMA_EDGES),
      imgPerSec: (last.nimg - this.#window.nimg) / Math.max(trainSeconds - this.#window.seconds, 1e-9),
      lr: this.optimizer.lr,
      trainSeconds,
    };
    if (this.config.sandwich) {
      entry.lossByWidth = [...byWidth].sort((a, b) => b[0] - a[0]).map(([width, v]) => ({
        width,
        loss: v.sum / v.count,
        count: v.count,
      }));
    }
    this.#lastLoss = entry.loss;
    this.#lossHistory.push({ step: entry.step, nimg: entry.nimg, loss: entry.loss });
    this.#window = { nimg: last.nimg, seconds: this.#clock.seconds };
    return entry;
  }

  /**
   * Trains for `kimg`, up to `untilNimg` or for `steps` (see `RunOptions`), logging every `logEvery` steps
   * and once at the end. Throws `NonFiniteLossError` when a logged loss is not finite.
   */
  async run(opts: RunOptions): Promise<RunResult> {
    const given = [opts.kimg, opts.untilNimg, opts.steps].filter((v) => v !== undefined).length;
    if (given !== 1) throw new Error("Trainer.run: give exactly one of kimg, untilNimg and steps");
    for (
      const [name, v] of Object.entries({ kimg: opts.kimg, untilNimg: opts.untilNimg, steps: opts.steps })
    ) {
      if (v !== undefined && !(v >= 0 && Number.isFinite(v))) {
        throw new Error(`Trainer.run: ${name} must be a finite number ≥ 0, got ${v}`);
      }
    }
    const startNimg = this.#nimg, startSeconds = this.#clock.seconds, B = this.config.batch;
    const untilNimg = opts.untilNimg ??
      (opts.kimg !== undefined ? startNimg + Math.round(opts.kimg * 1000) : startNimg + opts.steps! * B);
    const log = async (entry: LogEntry | null) => {
      if (entry && opts.onLog) await this.#clock.paused(() => opts.onLog!(entry));
      return entry;
    };
    let stoppedBy: RunResult["stoppedBy"] = "done";
    this.#window = { nimg: this.#nimg, seconds: this.#clock.seconds };
    this.#clock.start();
    try {
      while (this.#nimg < untilNimg) {
        if (opts.signal?.aborted) {
          stoppedBy = "aborted";
          break;
        }
        this.step();
        const p: StepProgress = { step: this.#step, nimg: this.#nimg, untilNimg };
        opts.onStep?.(p);
        if (this.#step % this.config.logEvery === 0) {
          const entry = await log(await this.flushLog());
          if (entry && opts.shouldStop?.(entry)) {
            stoppedBy = "stopped";
            break;
          }
        }
        if (opts.afterStep) await this.#clock.paused(() => opts.afterStep!(p));
      }
      await log(await this.flushLog());
    } finally {
      this.#clock.stop();
    }
    const seconds = this.#clock.seconds - startSeconds;
    return {
      step: this.#step,
      nimg: this.#nimg,
      stoppedBy,
      lossHistory: this.lossHistory,
      trainSeconds: this.#clock.seconds,
      imgPerSec: (this.#nimg - startNimg) / Math.max(seconds, 1e-9),
      lastLoss: this.#lastLoss,
    };
  }

  /** Where training stands (host numbers; see `TrainerProgress`). */
  get progress(): TrainerProgress {
    const it = this.#iterator;
    return {
      step: this.#step,
      nimg: this.#nimg,
      data: { position: it.position, epoch: it.epoch },
      rng: { ...this.#rng },
      lossHistory: this.lossHistory,
      trainSeconds: this.#clock.seconds,
    };
  }

  /**
   * Everything `loadState` needs to continue exactly, for a checkpoint or an in-memory copy. The tensors are
   * the trainer's live ones (the optimizer's moments: copies it frees at its next `stateDict()`): read or copy
   * them before the next step. Losses not yet read back are not part of it (call `flushLog()` first to log
   * them).
   */
  stateDict(): TrainerState {
    return {
      model: this.network.stateDict(),
      ema: this.ema.stateDict(),
      optimizer: this.optimizer.stateDict(),
      progress: this.progress,
    };
  }

  /**
   * Continues from `state` (a `stateDict()` of a trainer of the same configuration, or a checkpoint's): the
   * tensors are copied in (they stay the caller's), the generator, the data position and the counters set.
   */
  loadState(state: TrainerState): void {
    this.network.loadStateDict(state.model);
    this.ema.loadStateDict(state.ema);
    this.optimizer.loadStateDict(state.optimizer);
    this.#emaNet.loadStateDict(this.network.stateDict());
    const p = state.progress;
    this.#rng = { seed: p.rng.seed, counter: p.rng.counter };
    this.#step = p.step;
    this.#nimg = p.nimg;
    this.#iterator = this.#batches(p.data.position);
    this.#lossHistory = [...p.lossHistory];
    this.#clock.seconds = p.trainSeconds;
    for (const r of this.#pending) r.t.dispose();
    this.#pending = [];
  }

  /** Frees the networks, the EMA, the optimizer state and any unread losses (not the device or the dataset). */
  dispose(): void {
    for (const r of this.#pending) r.t.dispose();
    this.#pending = [];
    this.optimizer.dispose();
    this.ema.dispose();
    this.network.dispose();
    this.#emaNet.dispose();
  }
}
