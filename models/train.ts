/**
 * @file `deno task train`: a run folder on top of the in-memory `Trainer` (models/trainer.ts), with exact
 * resume.
 *
 * A run folder holds
 *
 * - `config.json`: the resolved configuration (`TrainConfigSchema`: the trainer's options plus the run's length
 *   and what to save when);
 * - `checkpoints/step-NNNNNNNNN/` (models/checkpoint.ts): the trainer's `stateDict()` and the configuration,
 *   written every `checkpointKimg` and at the end, only after the losses before them were read back and checked,
 *   and only if every weight is finite;
 * - `log.jsonl`: one `LogEntry` per line, every `logEvery` steps, and a `SettingsChange` line where a resume
 *   changed options;
 * - `samples/`: EMA sample grids of the initial network, every `sampleKimg` and at the end.
 *
 * `out` must be new, empty, or a run folder (`checkRunFolder`: nothing but these files), and one process at a
 * time trains in it (util/lock.ts: a `lock` file naming the holder's PID; a dead holder's lock is taken over).
 *
 * A folder with a checkpoint is resumed from its newest one: options that would change the run's numbers must
 * match the stored ones (`RESUMABLE_CHANGES` lists those that may differ), log lines written after that
 * checkpoint are dropped, and the trainer continues from the checkpoint's weights, generator and data position,
 * so the resumed run computes the same numbers as one that never stopped (bit-identical on the CPU backend).
 * Sample grids use their own seeded stream and do not disturb training.
 */

import { z } from "zod";
import { Device, randn } from "../engine/mod.ts";
import { parseUNetSpec, type UNet, type UNetSpec, type UNetSpecInput } from "./unet.ts";
import { PRESETS } from "./presets.ts";
import { EDMPrecond } from "./edm.ts";
import { DataConfig, FASHION_MNIST_DEFAULT_RESOLUTION, openDataset, PROCEDURAL_CLASSES } from "./data.ts";
import { FASHION_MNIST_CLASSES } from "./idx.ts";
import { heunSampler } from "./samplers.ts";
import { classLabels } from "./generate.ts";
import { saveImageGrid } from "./images.ts";
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
  type TrainState,
} from "./checkpoint.ts";
import { DDSM_WIDTHS } from "./slimmable.ts";
import {
  checkData,
  defaultData,
  divergedError,
  type LogEntry,
  networkSpec,
  NonFiniteLossError,
  Trainer,
  TRAINING_FIELDS,
} from "./trainer.ts";
import { checkMemory, defaultMemoryLimitMiB } from "./cost.ts";
import { UsageError } from "../util/errors.ts";
import { parseUsage, readJsonFile } from "../util/config.ts";
import { writeTextAtomic } from "../util/files.ts";
import { LOCK_FILE, lockRunFolder, type RunLock } from "../util/lock.ts";

// ---------------------------------------------------------------------------------------------------------------
// Configuration.

/**
 * The default network: a small DDPM++-style SongUNet for 16×16 RGB (16 channels × [1, 2], one block per level,
 * attention at 8×8), conditioned on the five shape classes of the embedded data (189,443 parameters): 60–90
 * images/s on lavapipe with two quiet CPU cores, so `SHAPES_TRAINING`'s 12 kimg take about 2.5 minutes. The
 * class label is what makes a network this small draw shapes: unconditional, it drew one grey blob per image
 * at 6 and 12 kimg (README "The default scene").
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
  labelDim: PROCEDURAL_CLASSES.length,
}) as UNetSpecInput;

/**
 * Training options runs on the embedded shapes default to (any given option wins): 12 kimg with P_mean −0.4
 * instead of EDM's −1.2. The shift puts more of the training at the noise levels where a shape's outline is
 * decided; with it the conditional default drew rings and discs by 12 kimg (FID-2048 15.8 against 28.5 at
 * 6 kimg), where EDM's P_mean at 24 kimg in the PyTorch exploration still drew fragments (README).
 */
export const SHAPES_TRAINING = Object.freeze({ kimg: 12, pMean: -0.4 });

/**
 * The default network for Fashion-MNIST (`data: {"kind": "fashion-mnist"}` without a `network`): the default
 * network made grey at the native 28×28 with a third level (28, 14, 7; attention at 7×7), conditioned on the 10
 * garment classes (317,297 parameters). The third level's 7×7 receptive field gave upright garment silhouettes
 * that the two-level network (attention at 14×14) had not found by 4 kimg; the class label, as for the shapes,
 * is what turns them into clothing: with `FASHION_TRAINING` it drew trousers, long-sleeved tops, dresses,
 * sneakers, ankle boots and bags by 9–10 kimg, where the unconditional network at 6 kimg (P_mean −1.2) drew
 * blocky garment-like masses (README "Fashion-MNIST").
 */
export const FASHION_NETWORK: UNetSpecInput = Object.freeze({
  ...DEFAULT_NETWORK,
  imgResolution: 28,
  inChannels: 1,
  outChannels: 1,
  channelMult: [1, 2, 2],
  attnResolutions: [7],
  labelDim: FASHION_MNIST_CLASSES.length,
}) as UNetSpecInput;

/**
 * Training options Fashion-MNIST runs default to (any given option wins): smaller batches, a longer EMA, and as
 * for the shapes P_mean −0.4 (more of the training where a garment's outline is decided), 10 kimg: FID-2048
 * 7.87 in FashionNet features (FID-256 7.65, against 13.4 for the unconditional 6-kimg default before).
 */
export const FASHION_TRAINING = Object.freeze({
  batch: 16,
  lr: 5e-3,
  emaHalfLifeKimg: 1,
  kimg: 10,
  pMean: -0.4,
});

/**
 * The network a run gets when its configuration names none: `FASHION_NETWORK` for Fashion-MNIST (at the data's
 * side: 32×32 halves to 8 at the third level), else `DEFAULT_NETWORK`.
 */
export function defaultNetwork(data?: { kind: string; resolution?: number }): UNetSpecInput {
  if (data?.kind !== "fashion-mnist") return DEFAULT_NETWORK;
  const r = data.resolution ?? FASHION_MNIST_DEFAULT_RESOLUTION;
  return { ...FASHION_NETWORK, imgResolution: r, attnResolutions: [r >> 2] } as UNetSpecInput;
}

const nonNeg = z.number().nonnegative().finite();
const { data, batch, ...training } = TRAINING_FIELDS;

/** Options of `train` (what `deno task train --config file.json` holds): the trainer's and the run folder's. */
export const TrainConfigSchema = z.object({
  // The network: a preset name (ddpmpp-cifar10, adm-imagenet64, ddsm-cifar10), a UNetSpec, or a .json file with one.
  // Default: DEFAULT_NETWORK, or FASHION_NETWORK for Fashion-MNIST data.
  network: z.union([z.string().min(1), z.record(z.string(), z.unknown())]).optional(),
  data,
  batch,
  // Training length in thousands of images (EDM CIFAR-10: 200000).
  kimg: z.number().positive().finite().default(6),
  // lr … logEvery: the trainer's options (models/trainer.ts).
  ...training,
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
  // Ceiling of the estimated memory of a training step and of a sample grid, in MiB (default: the machine's).
  memoryLimitMiB: z.number().positive().finite().optional(),
}).strict();
export type TrainConfigInput = z.input<typeof TrainConfigSchema>;

/** A resolved configuration: the network as a full spec and the data source filled in. */
export type TrainConfig = Omit<z.output<typeof TrainConfigSchema>, "network" | "data"> & {
  network: UNetSpec;
  data: z.output<typeof DataConfig>;
};

/**
 * Options that may change when a run is resumed; all others must match the run's. `lr` and `gradClip` are the
 * remedies a divergence error advises: changing them changes the numbers from the resumed step on, so the change
 * is written to log.jsonl as a `SettingsChange` at that step.
 */
const RESUMABLE_CHANGES = new Set([
  "lr",
  "gradClip",
  "kimg",
  "logEvery",
  "checkpointKimg",
  "keepCheckpoints",
  "sampleKimg",
  "sampleCount",
  "sampleSteps",
  "out",
  "backend",
  "memoryLimitMiB",
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
  // Anything but an object goes to the schema as it is, to be refused there with its type.
  const isObject = input !== null && typeof input === "object" && !Array.isArray(input);
  const given = isObject ? input as Record<string, unknown> : {};
  const kind = (given.data as { kind?: unknown } | undefined)?.kind;
  const defaults = kind === "fashion-mnist"
    ? FASHION_TRAINING
    : kind === undefined || kind === "procedural"
    ? SHAPES_TRAINING
    : {};
  const o = parseUsage(TrainConfigSchema, isObject ? { ...defaults, ...given } : input, "train config");
  const network = await resolveNetwork(o.network ?? defaultNetwork(o.data));
  let data = o.data;
  try {
    data ??= defaultData(network);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  return { ...o, network, data };
}

/**
 * The state and training configuration stored in checkpoint `dir`. A configuration there that does not parse is
 * a damaged file (a plain Error naming it, exit 1), not something the user typed (a UsageError, exit 2).
 */
export async function readStoredConfig(dir: string): Promise<{ state: TrainState; cfg: TrainConfig }> {
  const state = await readTrainState(dir);
  try {
    return { state, cfg: await parseTrainConfig(state.config) };
  } catch (e) {
    throw new Error(
      `${dir}/state.json: the stored training configuration is invalid (a damaged file?): ${
        (e as Error).message
      }`,
    );
  }
}

/** A log.jsonl line recording options changed when the run was resumed at `step`. */
export interface SettingsChange {
  step: number;
  nimg: number;
  event: "settings";
  /** Each changed option: the run's value and the new one. */
  changed: Record<string, { from: unknown; to: unknown }>;
}

/** The options of `merged` that differ from `stored` (the run folder `out` aside). */
function changedSettings(stored: TrainConfig, merged: TrainConfig): SettingsChange["changed"] {
  const out: SettingsChange["changed"] = {};
  for (const key of RESUMABLE_CHANGES) {
    if (key === "out") continue;
    const from = (stored as Record<string, unknown>)[key], to = (merged as Record<string, unknown>)[key];
    if (JSON.stringify(from) !== JSON.stringify(to)) out[key] = { from, to };
  }
  return out;
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

/**
 * What a run folder may hold besides nothing: the files `train` writes (and the lock's temporaries), and the
 * measurements `eval` saves in it (eval/evaluate.ts: `<run>/eval/`).
 */
const RUN_ENTRIES = new Set(["config.json", "log.jsonl", "checkpoints", "samples", "eval", LOCK_FILE]);
const isRunEntry = (name: string) => RUN_ENTRIES.has(name) || name.startsWith(`${LOCK_FILE}.`);

/**
 * Refuses an `out` that is not a run folder, so that `train` never overwrites someone else's config.json or log:
 * it must be absent, an empty folder, or a folder with only a run's files, whose config.json (if any) is a
 * training configuration.
 */
export async function checkRunFolder(dir: string): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(dir);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return;
    if (e instanceof Deno.errors.NotADirectory) {
      throw new UsageError(`out: ${dir} lies under a file (${(e as Error).message}); give a folder`);
    }
    throw new Error(`out: cannot use ${dir}: ${(e as Error).message}`);
  }
  if (!info.isDirectory) throw new UsageError(`out: ${dir} is a file, not a run folder`);
  const foreign: string[] = [];
  for await (const e of Deno.readDir(dir)) if (!isRunEntry(e.name)) foreign.push(e.name);
  if (foreign.length) {
    foreign.sort();
    const shown = foreign.slice(0, 5).join(", ") +
      (foreign.length > 5 ? `, … (${foreign.length} in all)` : "");
    throw new UsageError(
      `out: ${dir} is not a run folder (it holds ${shown}); give a new or empty folder, or an existing run`,
    );
  }
  let stored: unknown;
  try {
    stored = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return;
    throw new UsageError(`out: ${dir}/config.json is not a training configuration (${(e as Error).message})`);
  }
  if (!TrainConfigSchema.safeParse(stored).success) {
    throw new UsageError(
      `out: ${dir}/config.json is not a training configuration; give a new or empty folder, or an existing run`,
    );
  }
}

/**
 * The configuration of the run in `raw.out` and the checkpoint to resume from: a fresh run's is `raw`'s; a
 * stored run's is its own with `raw` merged in, refused if that changes anything but `RESUMABLE_CHANGES`.
 */
async function openRun(
  raw: Record<string, unknown>,
): Promise<{
  cfg: TrainConfig;
  resumeDir: string | null;
  state: TrainState | null;
  lock: RunLock;
  changed: SettingsChange["changed"];
}> {
  const cfg = await parseTrainConfig(raw);
  checkTrainMemory(cfg);
  const runDir = cfg.out;
  await checkRunFolder(runDir);
  await Deno.mkdir(runDir, { recursive: true });
  // One process per run: a second one would remove the first's half-written checkpoint and interleave logs.
  const lock = lockRunFolder(runDir);
  try {
    await removeStaleTemporaries(runDir);
    const resumeDir = await latestCheckpoint(runDir);
    if (!resumeDir) return { cfg, resumeDir, state: null, lock, changed: {} };
    const { state, cfg: stored } = await readStoredConfig(resumeDir);
    const merged = await parseTrainConfig({ ...state.config, ...raw, out: runDir });
    const bad = incompatibleFields(stored, merged, raw);
    if (bad.length) {
      throw new UsageError(
        `${runDir} holds a run with other settings: ${bad.join("; ")}. Use another --out to start a new run.`,
      );
    }
    checkTrainMemory(merged);
    return { cfg: merged, resumeDir, state, lock, changed: changedSettings(stored, merged) };
  } catch (e) {
    lock.release();
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Progress.

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

/** Options of `train` that are not configuration. */
export interface TrainOptions {
  onProgress?: (e: TrainEvent) => void;
  /** Stops after the current step; a checkpoint is saved first. */
  signal?: AbortSignal;
  /** Train on this device instead of creating one from `backend` (its generator is re-seeded). */
  device?: Device;
}

// ---------------------------------------------------------------------------------------------------------------
// The run folder.

/** The files of one run that a training session writes: the log, checkpoints and sample grids. */
class RunFolder {
  /** The newest checkpoint written or resumed from. */
  lastCheckpoint: string | null;

  constructor(
    readonly cfg: TrainConfig,
    readonly trainer: Trainer,
    resumedFrom: string | null,
    readonly emit: (e: TrainEvent) => void,
  ) {
    this.lastCheckpoint = resumedFrom;
  }

  get dir(): string {
    return this.cfg.out;
  }
  get logPath(): string {
    return `${this.dir}/log.jsonl`;
  }

  /** Creates the folder, writes config.json and drops log lines after the trainer's step. */
  async prepare(): Promise<void> {
    await Deno.mkdir(`${this.dir}/samples`, { recursive: true });
    await writeTextAtomic(`${this.dir}/config.json`, JSON.stringify(this.cfg, null, 1) + "\n");
    await truncateLog(this.logPath, this.trainer.stepCount);
  }

  /** Appends a log entry to log.jsonl and reports it. */
  async log(entry: LogEntry): Promise<void> {
    await Deno.writeTextFile(this.logPath, JSON.stringify(entry) + "\n", { append: true });
    this.emit({ type: "log", entry });
  }

  /** Appends the options changed on resuming to log.jsonl (a `SettingsChange` at the current step). */
  async logSettings(changed: SettingsChange["changed"]): Promise<void> {
    const line: SettingsChange = {
      step: this.trainer.stepCount,
      nimg: this.trainer.nimg,
      event: "settings",
      changed,
    };
    await Deno.writeTextFile(this.logPath, JSON.stringify(line) + "\n", { append: true });
  }

  /** Reads and logs the waiting losses, then saves a checkpoint if every weight is finite. */
  async checkpoint(): Promise<void> {
    const t = this.trainer;
    const entry = await t.flushLog();
    if (entry) await this.log(entry);
    const { progress, ...tensors } = t.stateDict();
    try {
      this.lastCheckpoint = await saveCheckpoint(this.dir, {
        ...tensors,
        state: { ...progress, config: JSON.parse(JSON.stringify(this.cfg)) },
      }, { keep: this.cfg.keepCheckpoints });
    } catch (e) {
      if (e instanceof NonFiniteCheckpointError) {
        throw divergedError(
          `the weights after step ${t.stepCount} are not finite (${e.message})`,
          t.stepCount,
          this.cfg.lr,
        );
      }
      throw e;
    }
    this.emit({ type: "checkpoint", dir: this.lastCheckpoint, step: t.stepCount, nimg: t.nimg });
  }

  /** Writes EMA sample grids of the current step (full width, and the narrowest with the sandwich rule). */
  async grid(): Promise<void> {
    const cfg = this.cfg, t = this.trainer;
    if (!cfg.sampleCount) return;
    const emaNet = t.emaNetwork();
    const widths = cfg.sandwich ? [1, DDSM_WIDTHS[DDSM_WIDTHS.length - 1]] : [1];
    for (const width of widths) {
      const t0 = performance.now();
      const name = `${checkpointName(t.stepCount)}${width === 1 ? "" : `-w${width}`}.png`;
      const path = `${this.dir}/samples/${name}`;
      await sampleGrid(emaNet, path, {
        n: cfg.sampleCount,
        steps: cfg.sampleSteps,
        seed: cfg.seed,
        width,
        sigmaData: cfg.sigmaData,
      });
      const seconds = (performance.now() - t0) / 1000;
      this.emit({ type: "sample", path, step: t.stepCount, nimg: t.nimg, width, seconds });
    }
  }
}

/** Continues `trainer` from checkpoint `dir` (whose state.json is `state`). */
async function resumeFrom(trainer: Trainer, dir: string, state: TrainState): Promise<void> {
  let ck: LoadedCheckpoint | null = null;
  try {
    ck = await loadCheckpoint(dir, trainer.device);
    trainer.loadState({ model: ck.model, ema: ck.ema, optimizer: ck.optimizer, progress: state });
  } catch (e) {
    throw new Error(`cannot resume from ${dir}: ${(e as Error).message}`);
  } finally {
    if (ck) disposeCheckpoint(ck);
  }
}

/** Whether a multiple of `kimg` thousand images lies in (before, after]. */
const crosses = (kimg: number, before: number, after: number) =>
  kimg > 0 && Math.floor(after / (kimg * 1000)) > Math.floor(before / (kimg * 1000));

/**
 * Trains (or resumes) the run in `config.out`. Returns when `kimg` thousand images have been seen or the signal
 * stopped it; throws `NonFiniteLossError` when the loss or the weights stop being finite (the newest checkpoint is
 * the last good one) and `UsageError` for a bad configuration.
 */
export async function train(
  input: TrainConfigInput | Record<string, unknown>,
  opts: TrainOptions = {},
): Promise<TrainResult> {
  // Options left undefined (e.g. CLI flags not given) are absent, not "reset to the default".
  const raw = Object.fromEntries(
    Object.entries((input ?? {}) as Record<string, unknown>).filter(([, v]) => v !== undefined),
  );
  const { cfg, resumeDir, state, lock, changed } = await openRun(raw);
  using _lock = lock;
  const totalNimg = Math.round(cfg.kimg * 1000);
  const dataset = await openDataset(cfg.data);
  checkData(cfg, dataset);
  const device = opts.device ?? await Device.create({ backend: cfg.backend });
  const emit = opts.onProgress ?? (() => {});
  let trainer: Trainer | undefined, folder: RunFolder | undefined;
  try {
    checkTrainMemory(cfg, device.info.limits);
    trainer = new Trainer(cfg, device, dataset);
    if (resumeDir && state) await resumeFrom(trainer, resumeDir, state);
    folder = new RunFolder(cfg, trainer, resumeDir, emit);
    await folder.prepare();
    if (Object.keys(changed).length) await folder.logSettings(changed);
    const startStep = trainer.stepCount;
    emit({
      type: "start",
      runDir: folder.dir,
      resumedFrom: resumeDir,
      step: trainer.stepCount,
      nimg: trainer.nimg,
      totalNimg,
      parameters: trainer.network.parameterCount(),
      config: cfg,
      device: `${device.info.adapter} (${device.kind})`,
    });
    // The loop (EDM training_loop.py), with a grid of the initial network first.
    if (!resumeDir) await folder.grid();
    const run = folder;
    const r = await trainer.run({
      untilNimg: totalNimg,
      signal: opts.signal,
      onStep: ({ step, nimg }) => emit({ type: "step", step, nimg, totalNimg }),
      onLog: (entry) => run.log(entry),
      afterStep: async ({ nimg }) => {
        const before = nimg - cfg.batch;
        if (crosses(cfg.checkpointKimg, before, nimg) && nimg < totalNimg) await run.checkpoint();
        if (crosses(cfg.sampleKimg, before, nimg) && nimg < totalNimg) await run.grid();
      },
    });
    if (folder.lastCheckpoint !== `${checkpointsDir(folder.dir)}/${checkpointName(r.step)}`) {
      await folder.checkpoint();
    }
    if (r.stoppedBy === "done" && r.step > startStep) await folder.grid();
    return {
      runDir: folder.dir,
      step: trainer.stepCount,
      nimg: trainer.nimg,
      stoppedBy: r.stoppedBy === "aborted" ? "aborted" : "done",
      checkpoint: folder.lastCheckpoint,
      lastLoss: trainer.lastLoss,
      lossHistory: trainer.lossHistory,
    };
  } catch (e) {
    // Name the last good checkpoint: nothing was saved after it.
    if (e instanceof NonFiniteLossError) {
      throw divergedError(e.what, e.step, cfg.lr, folder?.lastCheckpoint ?? resumeDir);
    }
    throw e;
  } finally {
    trainer?.dispose();
    if (!opts.device) device.destroy();
  }
}

/**
 * Refuses, before anything is allocated, a network and batch whose training step, or a sample grid of
 * `sampleCount` images, would exceed `memoryLimitMiB` or (given `deviceLimits`) a tensor the device can bind:
 * the error names the field to change (models/cost.ts `checkMemory`).
 */
export function checkTrainMemory(cfg: TrainConfig, deviceLimits?: Readonly<Record<string, number>>): void {
  const spec = networkSpec(cfg), memoryLimitMiB = cfg.memoryLimitMiB ?? defaultMemoryLimitMiB();
  checkMemory(spec, {
    what: "train",
    mode: "train",
    batch: cfg.batch,
    batchField: "batch",
    memoryLimitMiB,
    deviceLimits,
  });
  if (!cfg.sampleCount) return;
  checkMemory(spec, {
    what: "train: sample grids",
    mode: "sample",
    batch: cfg.sampleCount,
    batchField: "sampleCount",
    // The grid's values read back to the host, and its PNG.
    held: {
      images: cfg.sampleCount,
      field: "sampleCount",
      bytesPerImage: 5 * spec.inChannels * spec.imgResolution ** 2,
    },
    memoryLimitMiB,
    deviceLimits,
  });
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
// Sample grids.

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
