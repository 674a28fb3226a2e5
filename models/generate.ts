/**
 * @file Image generators: a network behind EDM's preconditioning, driven by one of the samplers, batch by batch.
 *
 * `ImageGenerator` is what consumers of images see (`deno task sample` writes a grid, evaluation in
 * eval/proxy.ts streams thousands of images into a feature network). `NetworkGenerator` is one over an in-memory
 * `UNet` (a trainer's EMA network, a search candidate), run at a fixed DDSM width or with a width per sampler
 * step (DDSM's step-aware network, models/slimmable.ts); `CheckpointGenerator` opens a checkpoint into one.
 *
 * Determinism: latents are exact slices of one seeded Philox stream: image i's latent starts at block counter
 * i·C·H·W/4 of `seed`, so an image does not depend on the batch size or on the other images (Heun, Euler;
 * Algorithm 2's extra noise is drawn per batch from (seed, batch index), so it does depend on the batching).
 * The device generator is re-seeded for this; a `Trainer` on the same device keeps its own generator state.
 */

import { z } from "zod";
import { cat, type Device, randn, type Tensor, tensor } from "../engine/mod.ts";
import { UNet, type UNetSpec } from "./unet.ts";
import { EDMPrecond } from "./edm.ts";
import {
  type Denoiser,
  edmTimeSteps,
  eulerSampler,
  heunSampler,
  type StepInfo,
  stochasticSampler,
} from "./samplers.ts";
import { checkWidth, parseWidthSchedule, widthAt, type WidthSchedule } from "./slimmable.ts";
import { disposeCheckpoint, loadCheckpoint, readTrainState, type TrainState } from "./checkpoint.ts";
import { hash2 } from "../util/random.ts";

const positive = z.number().positive().finite();
const nonNeg = z.number().nonnegative().finite();

/** The sampler and its time grid (the fields `deno task sample` and `deno task eval` share). */
export const SamplerSettingsSchema = z.object({
  // Sampler steps N (EDM: 18; Heun and Algorithm 2 use 2N − 1 network evaluations, Euler N).
  steps: z.number().int().min(2).default(18),
  // "heun" (Algorithm 1), "euler", or "stochastic" (Algorithm 2).
  sampler: z.enum(["heun", "euler", "stochastic"]).default("heun"),
  // Algorithm 2's S_churn (0 makes it Algorithm 1).
  sChurn: nonNeg.default(0),
  // Algorithm 2's S_min: noise is added only where t_i ≥ S_min.
  sMin: nonNeg.default(0),
  // Algorithm 2's S_max: noise is added only where t_i ≤ S_max (default: no limit).
  sMax: positive.optional(),
  // Algorithm 2's S_noise.
  sNoise: nonNeg.default(1),
  // σ_min of the time grid (EDM: 0.002).
  sigmaMin: positive.default(0.002),
  // σ_max of the time grid (EDM: 80).
  sigmaMax: positive.default(80),
  // ρ of the time grid (EDM: 7).
  rho: positive.default(7),
});
export type SamplerSettings = z.output<typeof SamplerSettingsSchema>;

/** Network evaluations per image of a sampler with N steps. */
export function samplerNfe(s: Pick<SamplerSettings, "sampler" | "steps">): number {
  return s.sampler === "euler" ? s.steps : 2 * s.steps - 1;
}

/**
 * One-hot labels [n, labelDim] of images start..start+n−1 (image i gets class i mod labelDim, or `only`), or
 * nothing for an unconditional network.
 */
export function classLabels(
  start: number,
  n: number,
  labelDim: number,
  device: Device,
  only?: number,
): Tensor | undefined {
  if (!labelDim) return undefined;
  const data = new Float32Array(n * labelDim);
  for (let i = 0; i < n; i++) data[i * labelDim + (only ?? (start + i) % labelDim)] = 1;
  return tensor(data, [n, labelDim], { device });
}

/** Latents [count, C, H, W] of images start..start+count−1 of `seed` (see the file comment). */
export function seededLatents(
  device: Device,
  seed: number,
  start: number,
  count: number,
  shape: readonly [number, number, number],
): Tensor {
  const per = shape[0] * shape[1] * shape[2];
  const draw = (first: number, n: number) => {
    device.rng.seed = seed >>> 0;
    device.rng.counter = first * Math.ceil(per / 4);
    return randn([n, ...shape], { device });
  };
  // A multiple of 4 per image keeps image boundaries on Philox block boundaries: one draw for the batch.
  if (per % 4 === 0 || count === 1) return draw(start, count);
  const rows = Array.from({ length: count }, (_, i) => draw(start + i, 1));
  const out = cat(rows);
  rows.forEach((r) => r.dispose());
  return out;
}

/** Options of one `generate` call. */
export interface GenerateOptions {
  /** Seed of the latents (and of Algorithm 2's noise). */
  seed: number;
  /** The sampler and its time grid. */
  settings: SamplerSettings;
  /** Class of every image for a class-conditional network (default: image i gets class i mod labelDim). */
  classLabel?: number;
  /** Progress after each sampler step. */
  onStep?: (info: StepInfo) => void;
}

/** Something that generates images: what sampling and evaluation consume. */
export interface ImageGenerator {
  readonly device: Device;
  /** [C, H, W] of one image. */
  readonly imageShape: [number, number, number];
  /** Classes of a class-conditional generator (0: unconditional). */
  readonly labelDim: number;
  /**
   * Images start..start+count−1 of `opts.seed`, [count, C, H, W] in about [−1, 1], on the device (the caller
   * owns the tensor): the same images whatever the batching (see the file comment). Sampling records work
   * without waiting; the caller's readback is the sync.
   */
  generate(start: number, count: number, opts: GenerateOptions): Tensor;
  dispose(): void;
}

/**
 * What a `NetworkGenerator` samples from: a UNet, or any network with its forward and spec (the assembled
 * student of block-wise distillation, models/blocks_cut.ts).
 */
export type SamplingNetwork = Pick<UNet, "device" | "spec" | "forward" | "dispose">;

/** Options of a `NetworkGenerator`. */
export interface NetworkGeneratorOptions {
  /** σ_data of the preconditioning the network was trained with (EDM: 0.5). */
  sigmaData?: number;
  /**
   * The DDSM width: one multiplier in (0, 1] for every evaluation (default 1), or a `WidthSchedule` choosing
   * one per sampler step (by step index, or by the step's noise level t_i).
   */
  width?: number | WidthSchedule;
  /** Free the network on `dispose()` (default false: it stays the caller's, e.g. a trainer's EMA network). */
  ownsNetwork?: boolean;
}

/**
 * A generator over an in-memory network. With a width schedule (as DDSM's `StepAwareUNet` runs it), every
 * network evaluation of sampler step i runs at step i's width: both of Heun's evaluations (the correction is
 * evaluated at t_{i+1} but belongs to step i), and a σ schedule is looked up at the step's grid level t_i.
 */
export class NetworkGenerator<N extends SamplingNetwork = UNet> implements ImageGenerator {
  readonly net: N;
  readonly sigmaData: number;
  /** The fixed width, or the per-step schedule. */
  readonly width: number | WidthSchedule;
  readonly #ownsNetwork: boolean;

  constructor(net: N, opts: NetworkGeneratorOptions = {}) {
    this.net = net;
    this.sigmaData = opts.sigmaData ?? 0.5;
    const width = opts.width ?? 1;
    if (typeof width === "number") checkWidth(width, "NetworkGenerator");
    this.width = typeof width === "number" ? width : parseWidthSchedule(width);
    this.#ownsNetwork = opts.ownsNetwork ?? false;
  }

  get device(): Device {
    return this.net.device;
  }
  get spec(): UNetSpec {
    return this.net.spec;
  }
  get imageShape(): [number, number, number] {
    const R = this.spec.imgResolution;
    return [this.spec.inChannels, R, R];
  }
  get labelDim(): number {
    return this.spec.labelDim;
  }

  /** D(x; σ) of the network at `width`. */
  #denoiserAt(width: number, labels: Tensor | undefined): Denoiser {
    const precond = new EDMPrecond((x, c, l) => this.net.forward(x, c, l ?? null, { width }), {
      sigmaData: this.sigmaData,
    });
    return precond.denoiser(labels);
  }

  /** D(x; σ) at the width of each evaluation (see the class comment). */
  #denoiser(labels: Tensor | undefined, s: SamplerSettings): Denoiser {
    const schedule = this.width;
    if (typeof schedule === "number") return this.#denoiserAt(schedule, labels);
    if (schedule.by === "step" && schedule.widths.length !== s.steps) {
      throw new Error(
        `NetworkGenerator: the width schedule has ${schedule.widths.length} widths, the sampler takes ${s.steps} steps`,
      );
    }
    const grid = edmTimeSteps(s.steps, { sigmaMin: s.sigmaMin, sigmaMax: s.sigmaMax, rho: s.rho });
    const byWidth = new Map<number, Denoiser>();
    return (x, sigma, ctx) => {
      if (!ctx) throw new Error("NetworkGenerator: a width schedule needs the sampler's step context");
      const width = widthAt(schedule, { step: ctx.step, sigma: grid[ctx.step] });
      let D = byWidth.get(width);
      if (!D) byWidth.set(width, D = this.#denoiserAt(width, labels));
      return D(x, sigma, ctx);
    };
  }

  generate(start: number, count: number, opts: GenerateOptions): Tensor {
    const s = opts.settings, device = this.device;
    const latents = seededLatents(device, opts.seed, start, count, this.imageShape);
    const labels = classLabels(start, count, this.labelDim, device, opts.classLabel);
    try {
      const D = this.#denoiser(labels, s);
      // Algorithm 2's noise: its own stream per batch, away from the latents' counters.
      device.manualSeed(hash2(opts.seed >>> 0, 0x9e3779b9 ^ start));
      const grid = {
        steps: s.steps,
        sigmaMin: s.sigmaMin,
        sigmaMax: s.sigmaMax,
        rho: s.rho,
        onStep: opts.onStep,
      };
      return s.sampler === "heun"
        ? heunSampler(D, latents, grid)
        : s.sampler === "euler"
        ? eulerSampler(D, latents, grid)
        : stochasticSampler(D, latents, {
          ...grid,
          sChurn: s.sChurn,
          sMin: s.sMin,
          sMax: s.sMax ?? Infinity,
          sNoise: s.sNoise,
        });
    } finally {
      latents.dispose();
      labels?.dispose();
    }
  }

  dispose(): void {
    if (this.#ownsNetwork) this.net.dispose();
  }
}

/** A checkpoint's network ready to generate images: a `NetworkGenerator` that owns the network it loaded. */
export class CheckpointGenerator extends NetworkGenerator {
  private constructor(
    readonly dir: string,
    readonly state: TrainState,
    net: UNet,
    opts: { sigmaData?: number; width?: number },
  ) {
    super(net, { ...opts, ownsNetwork: true });
  }

  /** Loads the network of checkpoint `dir` (EMA weights unless `ema` is false) onto `device`. */
  static async open(
    dir: string,
    spec: UNetSpec,
    opts: { device: Device; ema?: boolean; width?: number; sigmaData?: number },
  ): Promise<CheckpointGenerator> {
    const state = await readTrainState(dir);
    const net = new UNet(spec, { device: opts.device }).eval();
    try {
      const ema = opts.ema ?? true;
      const ck = await loadCheckpoint(dir, opts.device, { model: true, ema });
      try {
        // The EMA file holds the parameters; buffers (e.g. Fourier frequencies) come from the model file.
        net.loadStateDict(ema ? { ...ck.model, ...ck.ema } : ck.model);
      } finally {
        disposeCheckpoint(ck);
      }
      return new CheckpointGenerator(dir, state, net, { sigmaData: opts.sigmaData, width: opts.width });
    } catch (e) {
      net.dispose();
      throw e;
    }
  }
}
