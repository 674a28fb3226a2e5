/**
 * @file Measured model cost: forward latency of a UNet on the current adapter. The counted costs (parameters,
 * MACs, memory) need no device and live in models/cost.ts.
 */

import { z } from "zod";
import { type Device, noGrad, randn, type Tensor, tensor, zeros } from "../engine/mod.ts";
import type { UNet } from "../models/unet.ts";
import { parseConfig } from "../util/config.ts";

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
