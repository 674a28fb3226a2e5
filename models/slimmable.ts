/**
 * @file Slimmable widths for DDSM (Yang et al. 2023, "Denoising Diffusion Step-aware Models"): one set of UNet
 * weights run at a width multiplier w ∈ {1, 0.75, 0.5, 0.25}, and the width schedules that pick the width per
 * denoising step.
 *
 * At width w every convolution and linear layer uses the leading rows and columns of its full weight: its
 * input count is whatever the incoming activation has, its output count is the scaled count w·c rounded to a
 * multiple of f by the slimmable-networks rule `makeDivisible` (f = 8 for convolutions, 16 for linear layers, as
 * in DDSM's slimmable_ops.py), and never more than the full count c (DDSM slices with Python's `w[:n]`, which
 * stops at c). GroupNorm slices its affine parameters and keeps its full-width group count; where a slimmed
 * channel count is not divisible by it (it always is for the published presets) the largest divisor below it is
 * used. The input convolution keeps its image input channels, the output convolution its image output channels,
 * and the noise embedding its full size. Slicing is done with `narrow`, which is differentiable, so a loss on the
 * slim network trains the shared weights (DDSM §3.2, the slimmable "supernet").
 *
 * A `WidthSchedule` (DDSM §3.3: the width strategy found by the evolutionary search) gives the width per step,
 * by noise level σ or by sampling-step index; `StepAwareUNet` (models/step_aware.ts) runs a UNet by it.
 */

import { z } from "zod";
import { zodMessage } from "../util/config.ts";

/** The width multipliers DDSM trains and searches over (§4.1). */
export const DDSM_WIDTHS: readonly number[] = Object.freeze([1, 0.75, 0.5, 0.25]);

/** Rounding divisor of convolution channel counts (DDSM SlimmableConv2d). */
export const CONV_DIVISOR = 8;
/** Rounding divisor of linear-layer feature counts (DDSM SlimmableLinear). */
export const LINEAR_DIVISOR = 16;

/**
 * The slimmable-networks rounding (MobileNet's `make_divisible`, as in DDSM): v rounded to the nearest multiple
 * of f (at least `minValue`), plus f if that lost more than 10% of v.
 */
export function makeDivisible(v: number, f: number, minValue = 1): number {
  if (!(v > 0) || !Number.isInteger(f) || f < 1) {
    throw new Error(`makeDivisible: needs v > 0 and a positive integer divisor, got v ${v}, f ${f}`);
  }
  let n = Math.max(minValue, Math.floor((v + f / 2) / f) * f);
  if (n < 0.9 * v) n += f;
  return n;
}

/** Throws unless `width` is a multiplier in (0, 1]. */
export function checkWidth(width: number, who = "width"): void {
  if (!(width > 0 && width <= 1)) throw new Error(`${who}: width must be in (0, 1], got ${width}`);
}

/**
 * Channels a layer with `full` output channels uses at `width`: `makeDivisible(width·full, divisor)`, capped at
 * `full`; exactly `full` at width 1.
 */
export function slimChannels(full: number, width: number, divisor: number): number {
  checkWidth(width, "slimChannels");
  if (width === 1) return full;
  return Math.min(full, makeDivisible(width * full, divisor));
}

/** Largest divisor of `channels` that is at most `groups`: GroupNorm's group count on a slimmed input. */
export function slimGroups(groups: number, channels: number): number {
  for (let g = Math.min(groups, channels); g > 1; g--) if (channels % g === 0) return g;
  return 1;
}

// ---------------------------------------------------------------------------------------------------------------
// Width schedules.

/** A width multiplier in (0, 1]. */
export const WidthSchema = z.number().gt(0).lte(1);

/** One noise-level band of a σ schedule. */
const SigmaRangeSchema = z.object({
  /** Lower end of the band (inclusive). */
  sigmaMin: z.number().min(0),
  /** Upper end of the band (exclusive, except for the band with the largest σ, which includes it). */
  sigmaMax: z.number().positive(),
  /** Width multiplier used for σ in this band. */
  width: WidthSchema,
}).refine((r) => r.sigmaMax > r.sigmaMin, { message: "sigmaMax must exceed sigmaMin", path: ["sigmaMax"] });

/**
 * Which width to run at which step: by noise level (bands of σ, for samplers on a continuous σ grid such as
 * EDM's) or by step index (one width per sampling step, DDSM's per-timestep strategy).
 */
export const WidthScheduleSchema = z.discriminatedUnion("by", [
  z.object({
    /** Select by the noise level σ of the step. */
    by: z.literal("sigma"),
    /** Non-overlapping σ bands, each with its width. */
    ranges: z.array(SigmaRangeSchema).min(1),
  }).superRefine((s, ctx) => {
    const order = s.ranges.map((r, i) => ({ r, i })).sort((a, b) => a.r.sigmaMin - b.r.sigmaMin);
    for (let k = 1; k < order.length; k++) {
      if (order[k].r.sigmaMin < order[k - 1].r.sigmaMax) {
        ctx.addIssue({
          code: "custom",
          message: `σ band ${order[k].i} overlaps band ${order[k - 1].i}`,
          path: ["ranges", order[k].i, "sigmaMin"],
        });
      }
    }
  }),
  z.object({
    /** Select by the index of the sampling step (0 = first, noisiest). */
    by: z.literal("step"),
    /** The width of each step. */
    widths: z.array(WidthSchema).min(1),
  }),
]);
export type WidthSchedule = z.infer<typeof WidthScheduleSchema>;

/** Where a sampler is: its noise level σ and/or step index (host numbers; no device sync). */
export interface StepPosition {
  sigma?: number;
  step?: number;
}

/** Parses a width schedule, throwing an error that names the bad field. */
export function parseWidthSchedule(input: unknown): WidthSchedule {
  const r = WidthScheduleSchema.safeParse(input);
  if (!r.success) throw new Error(`WidthSchedule: ${zodMessage(r.error)}`);
  return r.data;
}

/** The width `schedule` assigns to a step at `at`. */
export function widthAt(schedule: WidthSchedule, at: StepPosition): number {
  if (schedule.by === "step") {
    const i = at.step;
    if (i === undefined || !Number.isInteger(i) || i < 0 || i >= schedule.widths.length) {
      throw new Error(
        `widthAt: step ${i} is not an index into the ${schedule.widths.length} scheduled widths`,
      );
    }
    return schedule.widths[i];
  }
  const s = at.sigma;
  if (s === undefined || !(s >= 0)) throw new Error(`widthAt: the σ schedule needs a sigma ≥ 0, got ${s}`);
  const top = Math.max(...schedule.ranges.map((r) => r.sigmaMax));
  for (const r of schedule.ranges) {
    if (s >= r.sigmaMin && (s < r.sigmaMax || (s === top && r.sigmaMax === top))) return r.width;
  }
  throw new Error(`widthAt: σ = ${s} lies in none of the scheduled bands`);
}

/** A schedule that runs every step at `width` (the static baselines of DDSM's tables). */
export function constantSchedule(width: number): WidthSchedule {
  return parseWidthSchedule({ by: "sigma", ranges: [{ sigmaMin: 0, sigmaMax: Number.MAX_VALUE, width }] });
}
