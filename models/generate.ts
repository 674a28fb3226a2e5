/**
 * @file Images from a checkpoint: the network (EMA weights by default) behind EDM's preconditioning, driven by
 * one of the samplers, batch by batch.
 *
 * `deno task sample` writes a grid with it; evaluation (eval/proxy.ts) streams thousands of images through it
 * into a feature network. Latents are exact slices of one seeded Philox stream: image i's latent starts at block
 * counter i·C·H·W/4 of `seed`, so an image does not depend on the batch size or on the other images (Heun, Euler;
 * Algorithm 2's extra noise is drawn per batch from (seed, batch index), so it does depend on the batching).
 */

import { z } from "zod";
import { cat, type Device, randn, type Tensor, tensor } from "../engine/mod.ts";
import { UNet, type UNetSpec } from "./unet.ts";
import { EDMPrecond } from "./edm.ts";
import { hash2 } from "../util/random.ts";
import { eulerSampler, heunSampler, type StepInfo, stochasticSampler } from "./samplers.ts";
import { disposeCheckpoint, loadCheckpoint, readTrainState, type TrainState } from "./checkpoint.ts";

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

/** A checkpoint's network ready to generate images. */
export class CheckpointGenerator {
  private constructor(
    readonly dir: string,
    readonly state: TrainState,
    readonly spec: UNetSpec,
    readonly net: UNet,
    readonly sigmaData: number,
    readonly width: number,
  ) {}

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
    } catch (e) {
      net.dispose();
      throw e;
    }
    return new CheckpointGenerator(dir, state, spec, net, opts.sigmaData ?? 0.5, opts.width ?? 1);
  }

  get device(): Device {
    return this.net.device;
  }
  /** [C, H, W] of one image. */
  get imageShape(): [number, number, number] {
    const R = this.spec.imgResolution;
    return [this.spec.inChannels, R, R];
  }

  /**
   * Images start..start+count−1 of `seed`, [count, C, H, W] in about [−1, 1], on the device (the caller owns
   * the tensor). Sampling records work without waiting; the caller's readback is the sync.
   */
  generate(
    start: number,
    count: number,
    opts: {
      seed: number;
      settings: SamplerSettings;
      classLabel?: number;
      onStep?: (info: StepInfo) => void;
    },
  ): Tensor {
    const s = opts.settings, device = this.device;
    const latents = seededLatents(device, opts.seed, start, count, this.imageShape);
    const labels = classLabels(start, count, this.spec.labelDim, device, opts.classLabel);
    // Algorithm 2's noise: its own stream per batch, away from the latents' counters.
    device.manualSeed(hash2(opts.seed >>> 0, 0x9e3779b9 ^ start));
    const precond = new EDMPrecond(
      (x, c, l) => this.net.forward(x, c, l ?? null, { width: this.width }),
      { sigmaData: this.sigmaData },
    );
    const D = precond.denoiser(labels);
    const grid = {
      steps: s.steps,
      sigmaMin: s.sigmaMin,
      sigmaMax: s.sigmaMax,
      rho: s.rho,
      onStep: opts.onStep,
    };
    try {
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
    this.net.dispose();
  }
}
