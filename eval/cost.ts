/**
 * @file Model cost: parameters and multiply-accumulates (MACs) of one UNet forward at any DDSM width, counted
 * from the spec without allocating anything (models/unet.ts `planLayers`), and measured latency on the current
 * adapter.
 *
 * MAC convention (batch 1, one forward of the denoiser network F):
 *
 * - convolution: Cin·Cout·kh·kw per output pixel (Cin·Cout·k²·Ho·Wo), at the channels the width uses;
 * - linear: in·out;
 * - bias: one MAC per output element of a layer with a bias (the add into the accumulator);
 * - GroupNorm: two MACs per element: one accumulating Σ(x − μ)² for the variance, one applying x·a + b with
 *   a = γ/σ, b = β − μ·a;
 * - attention: QKᵀ and A·V, 2·L²·C for L = H·W positions and C channels, reported separately (`attention`)
 *   and not in `macs`, as DDSM's tables do (their profiler, like most, sees only layers);
 * - free: activations, residual sums, softmax, resampling without weights, embeddings' sines.
 *
 * For DDSM's CIFAR-10 supernet (models/presets.ts `ddsmCifar10`) this gives 6065.5 / 3415.3 / 1521.0 /
 * 382.6 M MACs at widths 1 / 0.75 / 0.5 / 0.25, against the paper's 6.07 G / 3.42 G / 1.52 G / 382.5 M (all
 * within 0.15%, and each of the first three rounds to the published figure). The plain conv + linear count
 * (DDSM's profile.py, which skips norms and biases) gives 6054.0 / 3406.7 / 1515.3 / 379.7 M, and conv + linear
 * + one MAC per GroupNorm element gives 6057.3 / 3409.2 / 1517.0 / 380.6 M (the 0.25 width 0.51% low); neither
 * reaches 6.07 G, hence the convention above. Both alternatives are available through `MacConvention`.
 */

import { z } from "zod";
import { type Device, noGrad, randn, type Tensor, tensor, zeros } from "../engine/mod.ts";
import {
  planLayers,
  type PlannedLayer,
  type UNet,
  type UNetSpec,
  type UNetSpecInput,
} from "../models/unet.ts";
import { parseConfig } from "../util/config.ts";

/** What counts as a MAC beyond the convolution and linear products (see the file comment). */
export const MacConventionSchema = z.strictObject({
  /** Count one MAC per output element of every layer with a bias. */
  bias: z.boolean().default(true),
  /** MACs per GroupNorm element: 2 (variance + normalise), 1 (normalise only), 0 (norms are free). */
  groupNormPerElement: z.number().int().min(0).max(4).default(2),
});
export type MacConvention = z.input<typeof MacConventionSchema>;

/** Parameters and MACs of one forward at one width. */
export interface UNetCost {
  width: number;
  /** Parameters the forward at this width uses (the whole network's at width 1). */
  parameters: number;
  /** conv + linear + bias + GroupNorm MACs (the DDSM-comparable figure, attention excluded). */
  macs: number;
  /** The parts of `macs`, and attention's QKᵀ and A·V, which `macs` leaves out. */
  breakdown: { conv: number; linear: number; bias: number; groupNorm: number; attention: number };
  /** macs + attention. */
  macsWithAttention: number;
}

function parseConvention(c: MacConvention): z.output<typeof MacConventionSchema> {
  return parseConfig(MacConventionSchema, c, "MacConvention");
}

/** Parameters a planned layer uses at its width. */
function layerParameters(l: PlannedLayer): number {
  if (l.kind === "norm") return 2 * l.in;
  const weights = l.in * l.out * l.kernel * l.kernel;
  return weights + (l.bias ? l.out : 0);
}

/**
 * Parameters and MACs of one forward (batch 1) of the UNet described by `spec` at DDSM `width`, from
 * `planLayers` (nothing is allocated).
 */
export function unetCost(
  spec: UNetSpecInput | UNetSpec,
  width = 1,
  convention: MacConvention = {},
): UNetCost {
  return layersCost(planLayers(spec, width), width, convention);
}

/**
 * Parameters and MACs of one forward (batch 1) through `layers` (planned layers with the channels they run at:
 * `planLayers`, or the blocks of a distilled student, models/blocks_cut.ts `studentPlan`).
 */
export function layersCost(
  layers: readonly PlannedLayer[],
  width = 1,
  convention: MacConvention = {},
): UNetCost {
  const conv = parseConvention(convention);
  const b = { conv: 0, linear: 0, bias: 0, groupNorm: 0, attention: 0 };
  let parameters = 0;
  for (const l of layers) {
    parameters += layerParameters(l);
    const pixels = l.res * l.res;
    if (l.kind === "conv") {
      b.conv += l.in * l.out * l.kernel * l.kernel * pixels;
      if (l.bias) b.bias += l.out * pixels;
      // Attention over the L = res² positions of this qkv projection: QKᵀ and A·V, L²·C each.
      if (l.name.endsWith(".qkv")) b.attention += 2 * pixels * pixels * (l.out / 3);
    } else if (l.kind === "linear") {
      b.linear += l.in * l.out;
      if (l.bias) b.bias += l.out;
    } else b.groupNorm += l.in * pixels;
  }
  b.groupNorm *= conv.groupNormPerElement;
  if (!conv.bias) b.bias = 0;
  const macs = b.conv + b.linear + b.bias + b.groupNorm;
  return { width, parameters, macs, breakdown: b, macsWithAttention: macs + b.attention };
}

// ---------------------------------------------------------------------------------------------------------------
// Latency.

/** Latency measurement options. */
export const LatencyOptionsSchema = z.strictObject({
  /** DDSM width multiplier of the forward. */
  width: z.number().gt(0).lte(1).default(1),
  /** Untimed forwards first (pipeline compilation, buffer pool warm-up). */
  warmup: z.number().int().min(0).default(2),
  /** Timed forwards; the median is reported. */
  runs: z.number().int().min(1).default(5),
  /** Images per forward. */
  batch: z.number().int().min(1).default(1),
});
export type LatencyOptions = z.input<typeof LatencyOptionsSchema>;

/** Measured forward latency: the median and every timed run, in milliseconds, and the adapter. */
export interface Latency {
  medianMs: number;
  runsMs: number[];
  adapter: string;
  width: number;
  batch: number;
}

/**
 * Wall-clock time of `model.forward` (noGrad, random input, σ = 1) at a width on the model's device: each run
 * ends when its output has been read back, so it includes one host-device sync, as a sampler step does.
 */
export async function measureLatency(model: UNet, options: LatencyOptions = {}): Promise<Latency> {
  const opts = parseConfig(LatencyOptionsSchema, options, "measureLatency");
  const s = model.spec, device: Device = model.device, N = opts.batch;
  const x = randn([N, s.inChannels, s.imgResolution, s.imgResolution], { device });
  const cNoise = tensor(new Array(N).fill(0), [N], { device });
  const labels = s.labelDim ? zeros([N, s.labelDim], { device }) : null;
  const inputs: Tensor[] = [x, cNoise, ...(labels ? [labels] : [])];
  const once = async () => {
    const t0 = performance.now();
    const y = noGrad(() => model.forward(x, cNoise, labels, { width: opts.width }));
    await y.toArray();
    y.dispose();
    return performance.now() - t0;
  };
  const wasTraining = model.training;
  model.eval();
  try {
    for (let i = 0; i < opts.warmup; i++) await once();
    const runsMs: number[] = [];
    for (let i = 0; i < opts.runs; i++) runsMs.push(await once());
    const sorted = [...runsMs].sort((a, b) => a - b);
    const mid = sorted.length >> 1;
    const medianMs = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
    return { medianMs, runsMs, adapter: device.info.adapter, width: opts.width, batch: N };
  } finally {
    model.train(wasTraining);
    inputs.forEach((t) => t.dispose());
  }
}
